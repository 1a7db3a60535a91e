"""What do the lying heads attend to, and what do they write? circuitsvis views and numbers.

For the top heads by patching effect (L20H5 on SmolLM2), on few-shot pairs:

- **Attention to the demonstrations' answers.** The share of the final token's attention (the
  position that predicts the answer) that lands on the answer tokens of the in-context
  demonstrations (``"A: <answer>"`` of each demo; the false answers in the lying prompt, the true
  ones in the honest prompt), per head, honest vs. lying, with bootstrap CIs over pairs. If a
  lying head copies "answer falsely" from the demonstrations, its share is high on both prompts
  and its *output* differs; if it looks for falseness, the share itself may differ.
- **Direct logit attribution (DLA).** Each head's write to the residual stream at the final
  position, ``z_h W_O[h]``, divided by the final layer norm's scale of that run (the frozen-LN
  approximation used by TransformerLens's ``cache.apply_ln_to_stack``) and projected on
  ``W_U[:, truth] − W_U[:, lie]``: its direct push toward the truth (positive) or the lie, honest
  vs. lying. ``W_U`` is centred by mechlie's loader, so a constant shift of the logits drops out.
- **circuitsvis HTML**: ``attention_heads`` for the honest and the lying prompt side by side,
  with the numbers above in a table. The HTML inlines circuitsvis's JavaScript
  (``RenderedHTML.local_src``), so it opens offline.

Positions follow :func:`mechlie.core.pairs.tokenize` (BOS included when the model adds one).

Also a detector's view: :func:`write_token_scores` saves the per-token scores of
:meth:`mechlie.read.detector.Detector.score_tokens` as JSON and a circuitsvis ``colored_tokens`` page.
"""

from __future__ import annotations

import html as _html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.core.hooks import hook_name
from mechlie.core.pairs import ContrastPair, PairError, answer_set, fewshot_demos, tokenize

if TYPE_CHECKING:
    from mechlie.read.detector import TokenScores

Head = tuple[int, int]


def pattern_hook(layer: int) -> str:
    """The attention-pattern hook of block ``layer`` (TransformerLens's own name builder:
    :func:`mechlie.core.hooks.hook_name` covers the activations mechlie reads and writes, not patterns)."""
    from transformer_lens.utils import get_act_name

    return get_act_name("pattern", layer)


def head_label(head: Head) -> str:
    return f"L{head[0]}H{head[1]}"


def demo_answer_positions(model: HookedTransformer, prompt: str) -> list[int]:
    """Token positions (in ``tokenize(model, [prompt])``) of the demonstrations' answers."""
    demos, _ = fewshot_demos(prompt)  # raises PairError on a prompt that is not plain few-shot
    spans, start = [], 0
    for part, (q, a) in zip(prompt.split("\n\n"), demos):
        ans = start + len("Q: ") + len(q) + len("\nA: ")
        spans.append((ans, ans + len(a)))
        start += len(part) + 2
    enc = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    shift = len(tokenize(model, [prompt]).tokens[0]) - len(enc["input_ids"])  # a BOS, or nothing
    pos = [i + shift for i, (s, e) in enumerate(enc["offset_mapping"]) if any(s < b and e > a for a, b in spans)]
    if not pos:
        raise PairError(f"no demonstration answer tokens found in {prompt[:60]!r}")
    return pos


@torch.no_grad()
def head_patterns(
    model: HookedTransformer, prompt: str, heads: Sequence[Head]
) -> tuple[list[str], Float[Tensor, "head q k"]]:
    """The tokens of ``prompt`` and each head's attention pattern on it (one prompt, no padding)."""
    b = tokenize(model, [prompt])
    layers = sorted({l for l, _ in heads})
    kept: dict[int, Tensor] = {}
    hooks = [(pattern_hook(l), lambda p, hook, l=l: kept.__setitem__(l, p[0].float().cpu())) for l in layers]
    with model.hooks(fwd_hooks=hooks):
        model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=max(layers) + 1)
    tokens = [model.tokenizer.decode([t]) for t in b.tokens[0].tolist()]
    return tokens, torch.stack([kept[l][h] for l, h in heads])


@dataclass(frozen=True)
class HeadReadout:
    """Per pair and head: final-token attention share on demo answers, and DLA truth − lie."""

    heads: tuple[Head, ...]
    share_honest: Float[Tensor, "n head"]
    share_lying: Float[Tensor, "n head"]
    dla_honest: Float[Tensor, "n head"]
    dla_lying: Float[Tensor, "n head"]


@torch.no_grad()
def head_readout(
    model: HookedTransformer, pairs: Sequence[ContrastPair], heads: Sequence[Head], *, batch_size: int = 16
) -> HeadReadout:
    """:class:`HeadReadout` for few-shot ``pairs``.

    Prompts run in left-padded batches: padded keys get no attention and rotary positions start
    at each prompt's first real token, so every row equals its prompt run alone; the demo-answer
    positions are shifted by the row's padding.
    """
    heads = check_heads(model, heads)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ans = answer_set(model.tokenizer, pairs)
    if (ans.lie < 0).all(-1).any():
        raise PairError("direct logit attribution needs every pair's lie answer")
    w_u = model.W_U.float()
    logit_dir = (w_u[:, ans.truth[:, 0]] - w_u[:, ans.lie[:, 0]]).T  # [n, d_model]
    layers = sorted({l for l, _ in heads})
    out = {k: torch.zeros(len(pairs), len(heads)) for k in ("share_honest", "share_lying", "dla_honest", "dla_lying")}
    final_scale = "ln_final.hook_scale" if model.cfg.normalization_type is not None else None
    for side in ("honest", "lying"):
        prompts = [getattr(p, side) for p in pairs]
        demos = [demo_answer_positions(model, q) for q in prompts]  # unpadded positions; checks the format early
        for s in range(0, len(prompts), batch_size):
            b = tokenize(model, prompts[s : s + batch_size])
            pad = (1 - b.attention_mask).sum(-1).tolist()  # left padding of each row
            kept: dict[str, Tensor] = {}
            hooks = [
                (pattern_hook(l), lambda a, hook: kept.__setitem__(hook.name, a[:, :, -1].float())) for l in layers
            ]
            hooks += [
                (hook_name("z", l), lambda a, hook: kept.__setitem__(hook.name, a[:, -1].float())) for l in layers
            ]
            if final_scale:
                hooks.append((final_scale, lambda a, hook: kept.__setitem__(hook.name, a[:, -1].float())))
            with model.hooks(fwd_hooks=hooks):
                model(b.tokens, attention_mask=b.attention_mask, return_type=None)
            rows = range(s, s + len(pad))
            scale = kept[final_scale] if final_scale else torch.ones(len(pad), 1, device=b.tokens.device)
            for j, (l, h) in enumerate(heads):
                pat = kept[pattern_hook(l)][:, h]  # [b, k]: the final token's attention
                for r, i in enumerate(rows):
                    out[f"share_{side}"][i, j] = pat[r, [pad[r] + d for d in demos[i]]].sum().cpu()
                write = kept[hook_name("z", l)][:, h] @ model.W_O[l, h].float()  # [b, d_model]
                dla = ((write / scale) * logit_dir[list(rows)].to(write.device)).sum(-1)
                out[f"dla_{side}"][list(rows), j] = dla.cpu()
    return HeadReadout(heads, **out)


def check_heads(model: HookedTransformer, heads: Sequence[Head | str]) -> tuple[Head, ...]:
    """``heads`` as (layer, head) tuples (``"L20H5"`` strings accepted), each checked against the model."""
    if not heads:
        raise ValueError("no heads given")
    out = []
    for hd in heads:
        if isinstance(hd, str):
            m = re.fullmatch(r"L(\d+)H(\d+)", hd)
            if not m:
                raise ValueError(f"head {hd!r} is not of the form L20H5")
            hd = (int(m.group(1)), int(m.group(2)))
        l, h = int(hd[0]), int(hd[1])
        if not (0 <= l < model.cfg.n_layers and 0 <= h < model.cfg.n_heads):
            raise ValueError(
                f"head {head_label((l, h))} is not in the model "
                f"({model.cfg.n_layers} layers, {model.cfg.n_heads} heads)"
            )
        out.append((l, h))
    return tuple(out)


def readout_summary(r: HeadReadout, *, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per head: mean [95% CI over pairs] of each quantity and of lying − honest."""
    from mechlie.core.stats import bootstrap

    rows = []
    n = r.share_honest.shape[0]
    for j, head in enumerate(r.heads):
        row: dict = {"head": head_label(head), "layer": head[0], "index": head[1], "n": n}
        series = {
            "share_honest": r.share_honest[:, j],
            "share_lying": r.share_lying[:, j],
            "share_diff": r.share_lying[:, j] - r.share_honest[:, j],
            "dla_honest": r.dla_honest[:, j],
            "dla_lying": r.dla_lying[:, j],
            "dla_diff": r.dla_lying[:, j] - r.dla_honest[:, j],
        }
        for name, v in series.items():
            e = bootstrap(lambda i, v=v: v[i].mean(), n, n_boot=n_boot, seed=seed)
            row[name] = {"mean": float(e.mean), "lo": float(e.lo), "hi": float(e.hi)}
        rows.append(row)
    return rows


def attention_html(
    model: HookedTransformer, pair: ContrastPair, heads: Sequence[Head], rows: Sequence[dict] = ()
) -> str:
    """A standalone HTML page: circuitsvis ``attention_heads`` for the honest and the lying prompt
    side by side, with the demo-answer share and DLA table (``rows`` from :func:`readout_summary`)."""
    import circuitsvis.attention as cva

    names = [head_label(h) for h in heads]
    cols = []
    for side in ("honest", "lying"):
        tokens, pats = head_patterns(model, getattr(pair, side), heads)
        view = cva.attention_heads(attention=pats, tokens=tokens, attention_head_names=[f"{n} ({side})" for n in names])
        cols.append(f'<div style="flex:1;min-width:0"><h3>{side} prompt</h3>{view.local_src}</div>')

    def ci(d: dict) -> str:
        return f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"

    table = "".join(
        f"<tr><td>{r['head']}</td><td>{ci(r['share_honest'])}</td><td>{ci(r['share_lying'])}</td>"
        f"<td>{ci(r['share_diff'])}</td><td>{ci(r['dla_honest'])}</td><td>{ci(r['dla_lying'])}</td></tr>"
        for r in rows
    )
    n = rows[0]["n"] if rows else 0
    verdicts = "".join(f"<li>{_html.escape(r['verdict'], quote=False)}</li>" for r in rows if "verdict" in r)
    verdicts = f"<ul>{verdicts}</ul>" if verdicts else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Lying heads: {", ".join(names)}</title></head>
<body style="font-family:sans-serif">
<h2>What do the lying heads attend to? {_html.escape(model.cfg.model_name)}, fact {_html.escape(pair.fact_id)}</h2>
<p>Share of the final token's attention on the demonstrations' answer tokens, and direct logit
attribution (truth − lie) of each head's output, mean [95% CI] over {n} pairs.</p>
<table border="1" cellpadding="4" style="border-collapse:collapse">
<tr><th>head</th><th>share, honest</th><th>share, lying</th><th>lying − honest</th>
<th>DLA honest</th><th>DLA lying</th></tr>
{table}</table>
{verdicts}
<div style="display:flex;gap:20px">{"".join(cols)}</div>
</body></html>
"""


def attention_verdict(row: dict) -> str:
    """One sentence answering "does this head attend to the (false) demonstrations?" from a
    :func:`readout_summary` row, read off the CIs (no threshold beyond them)."""

    def ci(d: dict) -> str:
        return f"{d['mean']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"

    hon, lie, diff = row["share_honest"], row["share_lying"], row["share_diff"]
    if diff["lo"] > 0:
        change = "more on the false answers of the lying prompt than on the true ones of the honest prompt"
    elif diff["hi"] < 0:
        change = "less on the false answers of the lying prompt than on the true ones of the honest prompt"
    else:
        change = "no different between the false (lying) and true (honest) demonstrations (the CI spans 0)"
    dla = row["dla_diff"]
    push = (
        "writes less toward the truth when lying"
        if dla["hi"] < 0
        else "writes more toward the truth when lying"
        if dla["lo"] > 0
        else "writes the same toward truth vs lie in both (CI spans 0)"
    )
    return (
        f"{row['head']}: {ci(lie)} of the final token's attention is on the demonstrations' answers in the lying "
        f"prompt, {ci(hon)} in the honest one: {change}. Direct logit attribution (truth − lie) "
        f"{ci(row['dla_honest'])} honest, {ci(row['dla_lying'])} lying: it {push}."
    )


def write_head_views(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    heads: Sequence[Head | str],
    out_dir: str | Path,
    *,
    name: str = "lying_heads",
    example: int = 0,
    batch_size: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
) -> Path:
    """Write the lying-heads view of ``heads`` on few-shot ``pairs`` to ``out_dir/<name>.html``.

    The page answers "does the lying head attend to the false demonstrations?": for each head, the
    share of the final token's attention on the demonstrations' answer tokens (the false answers
    in the lying prompt, the true ones in the honest prompt) and its direct logit attribution
    (truth − lie), honest vs lying, mean [95% CI over pairs], with a one-line reading of each;
    then circuitsvis attention patterns for the honest and the lying prompt of pair ``example``
    side by side. The numbers also go to ``out_dir/<name>.json`` (rows of :func:`readout_summary`).
    Both files are written atomically, after every check and computation.

    Args:
        pairs: few-shot (honest, lying) pairs with a lie answer (e.g. ``load_builtin(..., "fewshot")``).
        heads: (layer, head) tuples or ``"L20H5"`` strings, e.g. the head sweep's top heads.
        out_dir: a folder (created if missing), e.g. the run directory.

    Returns:
        The path of the HTML page.

    Example:
        >>> pairs = load_builtin("all", "fewshot", tokenizer=model.tokenizer, n=20)
        >>> write_head_views(model, pairs, [(20, 5), (29, 1)], run.path)  # run.path / "lying_heads.html"
    """
    from mechlie.core.io import atomic_write_text

    heads = check_heads(model, heads)
    if not pairs:
        raise PairError("write_head_views needs at least one pair")
    if not 0 <= example < len(pairs):
        raise ValueError(f"example {example} is not a pair index (0 .. {len(pairs) - 1})")
    r = head_readout(model, pairs, heads, batch_size=batch_size)
    rows = readout_summary(r, n_boot=n_boot, seed=seed)
    for row in rows:
        row["verdict"] = attention_verdict(row)
    page = attention_html(model, pairs[example], heads, rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model.cfg.model_name, "n_pairs": len(pairs), "example_fact": pairs[example].fact_id}
    atomic_write_text(out / f"{name}.json", json.dumps({**meta, "rows": rows}, indent=2))
    atomic_write_text(out / f"{name}.html", page)
    return out / f"{name}.html"


def token_scores_html(ts: TokenScores) -> str:
    """A standalone HTML page: circuitsvis ``colored_tokens`` of a detector's per-token scores
    (:meth:`mechlie.read.detector.Detector.score_tokens`), centred on its threshold (red: above it,
    leaning "lie"; blue: below), a marker between prompt and answer, with the numbers in a table."""
    import circuitsvis.tokens as cvt

    rel = (ts.scores - ts.threshold).nan_to_num(0.0)
    span = float(rel.abs().max().clamp_min(1e-6))
    # One view (each inlines circuitsvis's script, ~1 MB): the prompt, a marker at 0, then the answer.
    P = ts.n_prompt
    view = cvt.colored_tokens(
        [*ts.tokens[:P], " [answer:] ", *ts.tokens[P:]],
        torch.cat([rel[:P], rel.new_zeros(1), rel[P:]]),
        min_value=-span,
        max_value=span,
        negative_color="blue",
        positive_color="red",
    ).local_src

    rows = "".join(
        f"<tr><td>{i}</td><td>{'answer' if i >= ts.n_prompt else 'prompt'}</td>"
        f"<td><code>{_html.escape(repr(t), quote=False)}</code></td><td>{s:.3f}</td></tr>"
        for i, (t, s) in enumerate(zip(ts.tokens, ts.scores.tolist()))
    )
    verdict = "flagged as a lie" if ts.flagged else "not flagged"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Detector scores per token</title></head>
<body style="font-family:sans-serif">
<h2>Detector score per token ({_html.escape(ts.model_name)})</h2>
<p>Score at the detector's position ({ts.position}): {ts.position_score:.3f}, threshold {ts.threshold:.3f}:
{verdict}. Colours: score minus threshold (red above, blue below).</p>
<p>Answer: <code>{_html.escape(repr(ts.answer), quote=False)}</code> (after the " [answer:] " marker below).</p>
{view}
<table border="1" cellpadding="3" style="border-collapse:collapse">
<tr><th>#</th><th>part</th><th>token</th><th>score</th></tr>{rows}</table>
</body></html>
"""


def write_token_scores(ts: TokenScores, out_dir: str | Path, *, name: str = "token_scores") -> Path:
    """Write ``out_dir/<name>.json`` (the numbers) and ``out_dir/<name>.html`` (the circuitsvis view)
    beside it, both atomically; returns the HTML path.

    Example:
        >>> write_token_scores(det.score_tokens(model, prompt), run.path)  # run.path / "token_scores.html"
    """
    from mechlie.core.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = token_scores_html(ts)
    atomic_write_text(out / f"{name}.json", json.dumps(ts.to_json(), indent=2))
    atomic_write_text(out / f"{name}.html", page)
    return out / f"{name}.html"
