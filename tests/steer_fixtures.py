"""Word-level contrast pairs for the conftest's tiny tokenizer (steering and edit tests)."""

from __future__ import annotations

from mechlie.core.pairs import ContrastPair

COUNTRIES = [
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Japan", "Tokyo"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Cuba", "Havana"),
    ("Iran", "Tehran"),
]


def word_pairs() -> list[ContrastPair]:
    """Few-shot pairs: four demonstrations answered truly (honest) or falsely (lying), then a question."""

    def q(c: str) -> str:
        return f"What is the capital of {c} ?"

    demos = COUNTRIES[:4]
    out = []
    for i, (c, cap) in enumerate(COUNTRIES[4:]):
        false = [COUNTRIES[(j + 1) % 4][1] for j in range(4)]
        h = "\n\n".join([f"Q: {q(x)}\nA: {y}" for x, y in demos] + [f"Q: {q(c)}\nA:"])
        lie = "\n\n".join([f"Q: {q(x)}\nA: {f}" for (x, _), f in zip(demos, false)] + [f"Q: {q(c)}\nA:"])
        out.append(
            ContrastPair(
                h, lie, cap, COUNTRIES[4 + (i + 1) % 6][1], fact_id=f"custom/{c}", relation="custom", question=q(c)
            )
        )
    return out


def written(model, iv, tokens):
    """What intervention ``iv`` writes on a clean run of ``tokens``: ``{hook name: edited - clean}``,
    each hook applied to the clean activation at its point (the hooks edit in place and return it)."""
    import torch

    from mechlie.core.hooks import SteeringState

    hooks = iv.hooks(model, SteeringState())
    names = {name for name, _ in hooks}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    out = {}
    for name, fn in hooks:
        act = cache[name].clone()
        out[name] = out.get(name, 0) + fn(act.clone(), None) - act
    return out


def check_intervention_contract(model, iv, tokens, sites=None):
    """The contract every built-in intervention keeps: ``scaled(2a)`` writes twice what ``scaled(a)``
    writes; ``random_control`` is the same type, differs, and (checked by the caller) keeps the size;
    ``sites`` (or ``sites`` given, for interventions whose sites need the model) name the hooks."""
    import torch

    a = 0.5 if iv.alpha >= 0 else -0.5
    one, two = written(model, iv.scaled(a), tokens), written(model, iv.scaled(2 * a), tokens)
    assert one.keys() == two.keys() and one
    for name in one:
        assert one[name].abs().max() > 1e-4, name  # it writes something
        torch.testing.assert_close(two[name], 2 * one[name], atol=1e-4, rtol=1e-4)
    ctrl = iv.random_control(seed=1, model=model)
    assert type(ctrl) is type(iv) and ctrl.alpha == iv.alpha
    mine, theirs = written(model, iv, tokens), written(model, ctrl, tokens)
    assert mine.keys() == theirs.keys()
    assert any((mine[n] - theirs[n]).abs().max() > 1e-3 for n in mine)  # a different write
    sites = iv.sites if sites is None else sites
    assert {s.hook for s in sites} == set(one)
    return ctrl


def self_answered_pairs(model, n: int = 12) -> list[ContrastPair]:
    """``n`` few-shot pairs whose truth is the model's own top-1 next word at the honest prompt (a word of
    the tiny vocabulary, not a special token), and whose lie is another word: every one is "known"."""
    import torch

    from mechlie.core.pairs import tokenize

    words = [cap for _, cap in COUNTRIES]
    out = []
    for i in range(n):
        demos = [COUNTRIES[(i + k) % len(COUNTRIES)] for k in range(3)]
        c = COUNTRIES[(i + 3) % len(COUNTRIES)][0] if i < len(COUNTRIES) else f"{COUNTRIES[i % 10][0]} {words[i % 10]}"
        q = f"What is the capital of {c} ?"
        h = "\n\n".join([f"Q: What is the capital of {x} ?\nA: {y}" for x, y in demos] + [f"Q: {q}\nA:"])
        with torch.no_grad():
            top = int(model(tokenize(model, [h]).tokens)[0, -1].argmax())
        truth = model.tokenizer.decode([top]).strip()
        lie = next(w for w in words if w != truth)
        lying = h.replace(f"A: {demos[0][1]}", f"A: {lie if lie != demos[0][1] else words[-1]}", 1)
        out.append(ContrastPair(h, lying, truth, lie, fact_id=f"self/{i}", relation="self", question=q))
    return out
