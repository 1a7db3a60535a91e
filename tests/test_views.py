"""mechlie.report.views on tiny models: demo-answer positions, attention shares, DLA, circuitsvis HTML."""

from __future__ import annotations

import pytest
import torch
from conftest import no_hooks, tiny_model
from steer_fixtures import COUNTRIES as CAPITALS  # noqa: E402  (the shared word list)

from mechlie.core.pairs import Fact, PairError, pairs_from_facts, tokenize
from mechlie.report import views as V


def capital_pairs(model, n_targets: int = 4, n_shots: int = 3):
    facts = [Fact(f"What is the capital of {c} ?", a, fact_id=c) for c, a in CAPITALS]
    return pairs_from_facts(
        facts[:n_targets], facts[n_targets:], "fewshot", relation="capitals", tokenizer=model.tokenizer, n_shots=n_shots
    )


def test_demo_answer_positions_are_the_demo_answers(tiny):
    pair = capital_pairs(tiny)[0]
    for prompt in (pair.honest, pair.lying):
        pos = V.demo_answer_positions(tiny, prompt)
        tokens = tokenize(tiny, [prompt]).tokens[0]
        words = [tiny.tokenizer.decode([int(tokens[i])]).strip() for i in pos]
        demos = [a for part in prompt.split("\n\n")[:-1] for a in [part.split("\nA: ")[1]]]
        assert words == demos and len(words) == 3
    with pytest.raises(PairError):
        V.demo_answer_positions(tiny, "What is the capital of France ?")


def test_attention_share_matches_the_pattern_and_dla_adds_up():
    # One attention-only layer without layer norm: logits are linear in the heads' writes, so
    # the DLA of all heads plus the embedding, b_O and b_U terms is exactly the logit difference.
    model = tiny_model(n_layers=1, attn_only=True, normalization_type=None, d_mlp=None, act_fn=None)
    pairs = capital_pairs(model)
    heads = [(0, h) for h in range(model.cfg.n_heads)]
    r = V.head_readout(model, pairs, heads)
    assert r.share_honest.shape == (len(pairs), 4)
    assert ((r.share_lying >= 0) & (r.share_lying <= 1 + 1e-5)).all()
    tokens, pats = V.head_patterns(model, pairs[0].lying, heads)
    demo = V.demo_answer_positions(model, pairs[0].lying)
    assert torch.allclose(r.share_lying[0], pats[:, -1, demo].sum(-1), atol=1e-5)
    from mechlie.core.pairs import answer_set

    ans = answer_set(model.tokenizer, pairs)
    for i, p in enumerate(pairs):
        b = tokenize(model, [p.honest])
        with torch.no_grad():
            logits, cache = model.run_with_cache(b.tokens)
        t, l = int(ans.truth[i, 0]), int(ans.lie[i, 0])
        direction = model.W_U[:, t] - model.W_U[:, l]
        with torch.no_grad():
            rest = (cache["hook_embed"][0, -1] + model.b_O[0]) @ direction + model.b_U[t] - model.b_U[l]
        ld = logits[0, -1, t] - logits[0, -1, l]
        assert float(r.dla_honest[i].sum() + rest) == pytest.approx(float(ld), abs=1e-3)
    rows = V.readout_summary(r, n_boot=100)
    assert (
        rows[0]["head"] == "L0H0"
        and rows[0]["share_lying"]["lo"] <= rows[0]["share_lying"]["mean"] <= rows[0]["share_lying"]["hi"]
    )
    assert no_hooks(model)


def test_html_holds_both_prompts_patterns(tiny):
    pairs = capital_pairs(tiny)
    heads = [(2, 1), (1, 3)]
    rows = V.readout_summary(V.head_readout(tiny, pairs, heads), n_boot=50)
    page = V.attention_html(tiny, pairs[0], heads, rows)
    for side in ("honest", "lying"):
        _, pats = V.head_patterns(tiny, getattr(pairs[0], side), heads)
        # circuitsvis serializes the pattern as JSON lists: row 3 of head L2H1 appears verbatim
        assert repr(pats[0, 3, 0].item()) in page and repr(pats[1, -1, 2].item()) in page
        assert f"L2H1 ({side})" in page
    assert "share, lying" in page and rows[0]["head"] in page
    with pytest.raises(ValueError, match="not in the model"):
        V.head_readout(tiny, pairs, [(5, 0)])


def test_batched_readout_equals_one_prompt_at_a_time(tiny):
    # Honest and lying prompts differ in length, so batches of 3 are left-padded; each row must equal
    # its prompt run alone (batch_size=1: no padding at all).
    # Pairs with 3 and with 2 demonstrations: prompts of two lengths in one batch.
    pairs = [p for three, two in zip(capital_pairs(tiny, 3), capital_pairs(tiny, 3, n_shots=2)) for p in (three, two)]
    heads = [(2, 1), (0, 3), (1, 0)]
    one = V.head_readout(tiny, pairs, heads, batch_size=1)
    many = V.head_readout(tiny, pairs, heads, batch_size=3)
    lens = {len(tokenize(tiny, [p.lying]).tokens[0]) for p in pairs} | {
        len(tokenize(tiny, [p.honest]).tokens[0]) for p in pairs
    }
    assert len(lens) > 1  # padding really happens
    for k in ("share_honest", "share_lying", "dla_honest", "dla_lying"):
        assert torch.allclose(getattr(one, k), getattr(many, k), atol=1e-4), k
    assert one.share_lying.abs().sum() > 0.01 and one.dla_lying.abs().sum() > 1e-3


def test_write_head_views_writes_the_page_with_the_heads_pattern(tiny, tmp_path):
    pairs = capital_pairs(tiny)
    path = V.write_head_views(tiny, pairs, ["L2H1", (1, 3)], tmp_path / "views", n_boot=50, example=1)
    assert path == tmp_path / "views" / "lying_heads.html" and path.is_file()
    page = path.read_text()
    for side in ("honest", "lying"):
        _, pats = V.head_patterns(tiny, getattr(pairs[1], side), [(2, 1), (1, 3)])
        assert repr(pats[0, -1, 1].item()) in page and repr(pats[1, 2, 1].item()) in page
    import json

    saved = json.loads((tmp_path / "views" / "lying_heads.json").read_text())
    assert [r["head"] for r in saved["rows"]] == ["L2H1", "L1H3"] and saved["n_pairs"] == len(pairs)
    # The page states, per head, the share of attention on the demonstrations' answers.
    share = saved["rows"][0]["share_lying"]["mean"]
    assert f"L2H1: {share:.2f}" in page and "demonstrations' answers in the lying prompt" in page
    with pytest.raises(ValueError, match="not of the form"):
        V.write_head_views(tiny, pairs, ["layer2"], tmp_path / "bad")
    with pytest.raises(ValueError, match="not in the model"):
        V.write_head_views(tiny, pairs, [(2, 9)], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing written on bad input
    assert no_hooks(tiny)
