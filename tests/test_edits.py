"""Learned minimal edits (mechlie.control.edits) on tiny random models."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import no_hooks, tiny_model
from steer_fixtures import word_pairs

from mechlie.control import edit_training, edits
from mechlie.control.steering import SteeringError, steer
from mechlie.core.pairs import ContrastPair, PairError
from mechlie.studies import steering_eval as se

NEUTRAL = [
    "What is the capital of Spain ? Madrid is hot",
    "you are an assistant . Answer truthfully",
    "the opposite of hot is cold",
]


def planted_model(scale_others: float = 0.2):
    """A linear model (no LayerNorm) whose only way to raise the truth "Paris" is direction ``p``:
    the unembedding column of "Paris" is ``3 p`` and every other column is orthogonal to ``p``."""
    model = tiny_model(normalization_type=None, attn_only=True, d_mlp=None, act_fn=None, n_layers=2)
    truth = model.tokenizer.convert_tokens_to_ids("Paris")
    p = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(5)), dim=0)
    with torch.no_grad():
        W = model.unembed.W_U
        W -= torch.outer(p, p @ W)
        W *= scale_others
        W[:, truth] = 3 * p
    pairs = [
        ContrastPair(
            f"Q: What is the capital of {c} ? A:",
            f"you are a liar . Q: What is the capital of {c} ? A:",
            "Paris",
            "Madrid",
            fact_id=c,
        )
        for c in ("France", "Spain", "Italy", "Japan", "Peru", "Chile")
    ]
    return model, pairs, p


def test_learned_vector_recovers_planted_direction():
    model, pairs, p = planted_model()
    edit = edits.train_vector(model, pairs, NEUTRAL, [1], edits.TrainConfig(lam=1.0, steps=60, progress=False))
    # stored honest -> lying: the negated shift, so it points along -p
    assert torch.nn.functional.cosine_similarity(-edit.vectors[1], p, dim=0) > 0.99
    hist = edit.info["history"]
    assert hist[-1]["nll_truth"] < hist[0]["nll_truth"] - 1.0
    ans = se.answer_set(model.tokenizer, pairs)
    lying = se.batches(model, [q.lying for q in pairs], 8)
    before = se.score_logits(se.last_logits(model, lying), ans).p_truth.mean()
    after = se.score_logits(se.last_logits(model, lying, [edit]), ans).p_truth.mean()
    assert after > before + 0.2
    assert edits.alignment(edit, {"planted": -p})["planted"] > 0.99


def test_gated_vector_writes_the_planted_direction_where_its_gate_opens():
    """The gate learns to open on the lying prompts and stay mostly shut on neutral text (where
    the edit only costs KL), and the write is the planted direction."""
    model, pairs, p = planted_model()
    budget = 0.02
    edit = edits.train_gated(model, pairs, NEUTRAL, 1, edits.TrainConfig(kl_budget=budget, steps=60, progress=False))
    assert torch.nn.functional.cosine_similarity(-edit.v, p, dim=0) > 0.99
    assert edit.info["train_kl"] <= budget
    # the gate's opening, measured here from the clean residuals at its hook
    name = edit.hook_name
    lying = se.batches(model, [q.lying for q in pairs], 8)[0]
    _, cache = model.run_with_cache(lying.tokens, attention_mask=lying.attention_mask, names_filter=name)
    assert edit.gate(cache[name][:, -1]).min() > 0.9
    neutral = se.batches(model, NEUTRAL, 8)[0]
    _, cache = model.run_with_cache(neutral.tokens, attention_mask=neutral.attention_mask, names_filter=name)
    assert edit.gate(cache[name][neutral.attention_mask.bool()]).mean() < 0.5
    ans = se.answer_set(model.tokenizer, pairs)
    lying_b = se.batches(model, [q.lying for q in pairs], 8)
    before = se.score_logits(se.last_logits(model, lying_b), ans).p_truth.mean()
    after = se.score_logits(se.last_logits(model, lying_b, [edit]), ans).p_truth.mean()
    assert after > before + 0.2
    nb = se.batches(model, NEUTRAL, 16)
    assert se.neutral_effects(model, nb, se.token_logprobs(model, nb), [edit]).kl <= budget + 1e-5
    ctrl = edit.random_control(seed=3, keep_gate=True)  # same gate, random write of the same norm
    torch.testing.assert_close(ctrl.v.norm(), edit.v.norm(), atol=1e-4, rtol=1e-4)
    assert torch.equal(ctrl.w, edit.w) and ctrl.b == edit.b
    assert abs(float(torch.nn.functional.cosine_similarity(ctrl.v, edit.v, dim=0))) < 0.9
    ctrl = edit.random_control(seed=3)  # by default the gate is random too (same norm, same bias)
    torch.testing.assert_close(ctrl.w.norm(), edit.w.norm(), atol=1e-4, rtol=1e-4)
    assert abs(float(torch.nn.functional.cosine_similarity(ctrl.w, edit.w, dim=0))) < 0.9 and ctrl.b == edit.b
    assert no_hooks(model)


def test_kl_budget_holds_on_the_training_batch():
    model = tiny_model()
    pairs = word_pairs()
    free = edits.train_vector(model, pairs, NEUTRAL, [1, 2], edits.TrainConfig(lam=0.0, steps=30, progress=False))
    budget = 0.02
    assert free.info["train_kl"] > 2 * budget  # without the constraint the edit would break the budget
    edit = edits.train_vector(
        model, pairs, NEUTRAL, [1, 2], edits.TrainConfig(lam=0.0, kl_budget=budget, steps=30, progress=False)
    )
    assert edit.info["train_kl"] <= budget
    # measured independently, through steer() and the evaluation code
    nb = se.batches(model, NEUTRAL, 16)
    kl = se.neutral_effects(model, nb, se.token_logprobs(model, nb), [edit]).kl
    assert kl <= budget + 1e-5
    assert kl > budget / 100 and all(v.norm() > 0 for v in edit.vectors.values())  # not a trivial zero edit
    low = edits.train_lowrank(
        model, pairs, NEUTRAL, 1, edits.TrainConfig(kl_budget=budget, steps=20, progress=False), rank=2
    )
    assert low.info["train_kl"] <= budget
    assert se.neutral_effects(model, nb, se.token_logprobs(model, nb), [low]).kl <= budget + 1e-5


def test_lowrank_edit_trains_and_has_a_same_size_control():
    model = tiny_model()
    pairs = word_pairs()
    edit = edits.train_lowrank(
        model, pairs, NEUTRAL, 2, edits.TrainConfig(lam=0.1, steps=30, progress=False), component="mlp_out", rank=3
    )
    hist = edit.info["history"]
    assert hist[-1]["nll_truth"] < hist[0]["nll_truth"] - 0.5
    assert edit.A.shape == (32, 3) and edit.B.shape == (3, 32) and edit.info["mean_write"].shape == (32,)
    ctrl = edit.random_control(seed=4)
    for a, b in ((edit.A, ctrl.A), (edit.B, ctrl.B), (edit.c, ctrl.c)):
        torch.testing.assert_close(a.norm(), b.norm(), atol=1e-4, rtol=1e-4)
    assert (ctrl.B - edit.B).abs().max() > 1e-3
    cos = edits.alignment(edit, {"x": torch.randn(32)})["x"]
    assert -1.0 <= cos <= 1.0
    # alpha = 0 is the unedited model; alpha = -1 the edit as trained
    ans = se.answer_set(model.tokenizer, pairs)
    lying = se.batches(model, [p.lying for p in pairs], 8)
    clean = se.last_logits(model, lying)
    torch.testing.assert_close(se.last_logits(model, lying, [edit.scaled(0.0)]), clean, atol=1e-5, rtol=1e-5)
    assert (
        se.score_logits(se.last_logits(model, lying, [edit]), ans).p_truth.mean()
        > se.score_logits(clean, ans).p_truth.mean()
    )


def test_edit_hooks_gone_after_exception(monkeypatch):
    model = tiny_model()
    pairs = word_pairs()
    edit = edits.train_vector(model, pairs, NEUTRAL, [1], edits.TrainConfig(steps=3, progress=False))
    tokens = se.batches(model, NEUTRAL, 8)[0]
    clean = model(tokens.tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, edit):
            assert not no_hooks(model)
            raise RuntimeError("boom")
    assert no_hooks(model)
    torch.testing.assert_close(model(tokens.tokens), clean)
    # an error in the middle of training leaves no hook and the weights trainable again
    calls = []

    def failing(*a, **k):
        calls.append(1)
        raise RuntimeError("boom in training")

    monkeypatch.setattr(edit_training, "_neutral_kl", failing)
    with pytest.raises(RuntimeError, match="boom in training"):
        edits.train_vector(model, pairs, NEUTRAL, [1], edits.TrainConfig(steps=3, progress=False))
    assert calls and no_hooks(model)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_input():
    model = tiny_model()
    pairs = word_pairs()
    edit = edits.train_vector(model, pairs, NEUTRAL, [1], edits.TrainConfig(steps=2, progress=False))
    narrow = tiny_model(d_model=16, d_head=4)
    with pytest.raises(SteeringError, match="d_model=32"):
        with steer(narrow, edit):
            pass
    with pytest.raises(SteeringError, match="trained on model"):  # other weights (model_id)
        with steer(model, replace(edit, model_id="0" * 16)):
            pass
    with pytest.raises(SteeringError, match="trained on model"):  # an edit saved without an id: by name
        with steer(model, replace(edit, model_id="", model_name="another-model")):
            pass
    with steer(model, replace(edit, model_name="a new name for the same weights")):
        pass
    gated = edits.train_gated(model, pairs, NEUTRAL, 1, edits.TrainConfig(steps=2, progress=False))
    with pytest.raises(SteeringError, match="d_model=32"):
        with steer(narrow, gated):
            pass
    with pytest.raises(SteeringError, match="layer 5 out of range"):
        edits.train_gated(model, pairs, NEUTRAL, 5, edits.TrainConfig(steps=1, progress=False))
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="kl_budget must be > 0"):
            edits.TrainConfig(kl_budget=bad)
    with pytest.raises(ValueError, match="lam"):
        edits.TrainConfig(lam=-1.0)
    with pytest.raises(SteeringError, match="layers"):
        edits.train_vector(model, pairs, NEUTRAL, [7], edits.TrainConfig(steps=1, progress=False))
    with pytest.raises(SteeringError, match="rank"):
        edits.train_lowrank(model, pairs, NEUTRAL, 1, rank=0)
    with pytest.raises(PairError):
        edits.train_vector(model, [], NEUTRAL, [1])
    with pytest.raises(PairError, match="at least 3 distinct facts"):
        se.prepare(model, pairs[:2], progress=False)
    assert no_hooks(model)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    pairs = word_pairs()
    vec = edits.train_vector(model, pairs, NEUTRAL, [0, 2], edits.TrainConfig(steps=3, progress=False))
    low = edits.train_lowrank(model, pairs, NEUTRAL, 1, edits.TrainConfig(steps=3, progress=False), rank=2)
    gated = edits.train_gated(model, pairs, NEUTRAL, 2, edits.TrainConfig(steps=3, progress=False))
    for e in (vec, low, gated):
        back = edits.load_edit(edits.save_edit(tmp_path / "edit.safetensors", e))
        assert type(back) is type(e) and back.model_name == e.model_name and back.alpha == e.alpha
        tokens = se.batches(model, NEUTRAL, 8)
        torch.testing.assert_close(se.last_logits(model, tokens, [back]), se.last_logits(model, tokens, [e]))
        assert back.info["train_kl"] == e.info["train_kl"]
        if not isinstance(e, edits.LearnedVector):
            torch.testing.assert_close(back.direction(), e.direction())


def test_skipping_the_frozen_blocks_changes_nothing():
    """Starting each step at the first edited block (cached input, trimmed left padding) trains the
    same edit as running every block from the embeddings, for a vector and a low-rank edit."""
    model = tiny_model(positional_embedding="rotary")
    pairs = word_pairs() + [
        replace(p, lying="you are a liar . " + p.lying, fact_id=p.fact_id + "/b") for p in word_pairs()
    ]
    neutral = NEUTRAL + ["Madrid", "the capital of Peru is Lima and the capital of Chile is Santiago"]
    kw = dict(kl_budget=0.05, steps=6, batch_size=3, neutral_per_step=2, progress=False)
    full = edits.train_vector(model, pairs, neutral, [1, 2], edits.TrainConfig(skip_frozen=False, **kw))
    fast = edits.train_vector(model, pairs, neutral, [1, 2], edits.TrainConfig(skip_frozen=True, **kw))
    assert fast.info["start_block"] == 1 and full.info["start_block"] == 0
    for l in (1, 2):
        torch.testing.assert_close(fast.vectors[l], full.vectors[l], atol=1e-4, rtol=1e-3)
    assert full.vectors[1].norm() > 1e-2  # it did train
    for a, b in zip(full.info["history"], fast.info["history"]):
        assert abs(a["kl"] - b["kl"]) < 1e-4 + 1e-3 * a["kl"] and abs(a["nll_truth"] - b["nll_truth"]) < 1e-4
    lr = [
        edits.train_lowrank(model, pairs, neutral, 2, edits.TrainConfig(skip_frozen=s, **kw), component="mlp_out")
        for s in (False, True)
    ]
    torch.testing.assert_close(lr[0].B, lr[1].B, atol=1e-4, rtol=1e-3)
    assert lr[0].B.norm() > 1e-3
    assert no_hooks(model)


def test_minibatches_cover_every_row_each_epoch():
    mb = edit_training._Minibatches(7, 3, seed=0)
    seen = torch.cat([mb.next() for _ in range(7)])  # 21 rows = 3 epochs
    assert sorted(seen.tolist()) == sorted(list(range(7)) * 3)
    assert edit_training._Minibatches(5, None, 0).next().tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="neutral_per_step"):
        edits.TrainConfig(neutral_per_step=0)


def test_training_does_not_depend_on_the_residual_streams_scale():
    """Scaling every write to the residual stream by 30 (embeddings, attention and MLP outputs)
    leaves a LayerNorm model's outputs unchanged; each edit's training must then follow the same
    path, with each parameter's step in its own units. (Before, the low-rank edit's A and c stepped
    in residual units: at SmolLM2's residual norms it diverged.)"""
    k = 30.0
    small, big = tiny_model(), tiny_model()
    with torch.no_grad():
        for name, p in big.named_parameters():
            if name.endswith(("embed.W_E", "attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")):
                p.mul_(k)
    pairs = word_pairs()
    tokens = se.batches(small, NEUTRAL, 8)[0]
    torch.testing.assert_close(small(tokens.tokens), big(tokens.tokens), atol=1e-3, rtol=1e-3)
    cfg = edits.TrainConfig(lam=0.1, steps=12, lr=0.1, progress=False)
    train = {
        "vector": lambda m: edits.train_vector(m, pairs, NEUTRAL, [1], cfg),
        "lowrank": lambda m: edits.train_lowrank(m, pairs, NEUTRAL, 1, cfg, component="mlp_out", rank=2),
        "gated": lambda m: edits.train_gated(m, pairs, NEUTRAL, 1, cfg),
    }
    for kind, fit in train.items():
        a, b = fit(small).info["history"], fit(big).info["history"]
        assert a[-1]["nll_truth"] < a[0]["nll_truth"] - 0.3, kind  # it trained
        for x, y in zip(a, b):
            assert abs(x["nll_truth"] - y["nll_truth"]) < 1e-2 + 1e-2 * x["nll_truth"], (kind, x, y)
            assert abs(x["kl"] - y["kl"]) < 1e-3 + 1e-2 * x["kl"], (kind, x, y)


# ---------------------------------------------------------------------------------------------
# where is separate from what: scaled, random_control and sites (edits built by hand, no training)


def _hand_edits(model):
    from mechlie.core.models import model_id

    g = torch.Generator().manual_seed(7)
    d, name, mid = model.cfg.d_model, model.cfg.model_name, model_id(model)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (
        edits.LearnedVector({0: r(d), 2: r(d)}, name, d, model_id=mid),
        edits.LowRankEdit(1, "mlp_out", r(d, 2) / 10, r(2), r(2, d), name, d, model_id=mid),
        edits.GatedVector(2, r(d), r(d) / 10, 0.3, name, d),  # no model_id: checked by name
    )


def test_edits_scaled_random_control_and_sites():
    from steer_fixtures import check_intervention_contract

    from mechlie.core.hooks import Site

    model = tiny_model()
    tokens = se.batches(model, NEUTRAL, 8)[0].tokens
    vec, low, gated = _hand_edits(model)
    assert vec.sites == (Site("resid_post", 0), Site("resid_post", 2))
    assert low.sites == (Site("mlp_out", 1),) and low.hook_name == "blocks.1.hook_mlp_out"
    assert gated.sites == (Site("resid_post", 2),) and gated.hook_name == "blocks.2.hook_resid_post"
    ctrl = check_intervention_contract(model, vec, tokens)
    for layer, v in vec.vectors.items():
        torch.testing.assert_close(ctrl.vectors[layer].norm(), v.norm(), atol=1e-4, rtol=1e-4)
    ctrl = check_intervention_contract(model, low, tokens)
    for a, b in ((low.A, ctrl.A), (low.c, ctrl.c), (low.B, ctrl.B)):
        torch.testing.assert_close(a.norm(), b.norm(), atol=1e-4, rtol=1e-4)
    ctrl = check_intervention_contract(model, gated, tokens)  # the gate is random too
    for a, b in ((gated.v, ctrl.v), (gated.w, ctrl.w)):
        torch.testing.assert_close(a.norm(), b.norm(), atol=1e-4, rtol=1e-4)
        assert abs(float(torch.nn.functional.cosine_similarity(a, b, dim=0))) < 0.9
    kept = gated.random_control(seed=1, keep_gate=True)
    assert torch.equal(kept.w, gated.w) and kept.b == gated.b and not torch.equal(kept.v, gated.v)


def test_edits_record_and_check_the_model_id(tmp_path):
    model, other = tiny_model(), tiny_model(seed=1)  # same name and width, other weights
    edit = edits.train_vector(model, word_pairs(), NEUTRAL, [1], edits.TrainConfig(steps=2, progress=False))
    from mechlie.core.models import model_id

    assert edit.model_id == model_id(model) != model_id(other)
    assert other.cfg.model_name == model.cfg.model_name and other.cfg.d_model == model.cfg.d_model
    with pytest.raises(SteeringError, match="trained on model"):
        with steer(other, edit):
            pass
    back = edits.load_edit(edits.save_edit(tmp_path / "e.safetensors", edit))
    assert back.model_id == edit.model_id
    with steer(model, back):
        pass
