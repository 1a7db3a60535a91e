"""Effect metrics of steering: bootstrap, gap fraction, KL on text, Pareto frontier (tiny models)."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechlie import steering_eval as se
from mechlie.pairs import Batch
from mechlie.steering import AddVectors


def tiny_model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=50,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary", seed=0,
    )
    m = HookedTransformer(cfg)
    m.eval()
    return m


BATCH = Batch(torch.tensor([[0, 0, 3, 4, 5], [6, 7, 8, 9, 10]]), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))


def test_last_logits_match_full_forward_and_steering_changes_them():
    model = tiny_model()
    with torch.no_grad():
        full = model(BATCH.tokens, attention_mask=BATCH.attention_mask)[:, -1]
    torch.testing.assert_close(se.last_logits(model, [BATCH]), full, atol=1e-5, rtol=1e-5)
    # A zero-mean direction: LayerNorm's mean-centring would cancel a constant one (all ones).
    zero_mean = torch.tensor([1.0, -1.0] * 16)
    assert abs(float(zero_mean.mean())) < 1e-9
    steered = se.last_logits(model, [BATCH], [AddVectors({1: zero_mean}, 3.0)])
    assert (steered - full).abs().max() > 0.1  # float noise is ~1e-6
    # The constant vector really is cancelled: the old test's direction was a no-op.
    const = se.last_logits(model, [BATCH], [AddVectors({1: torch.ones(32)}, 3.0)])
    torch.testing.assert_close(const, full, atol=1e-4, rtol=1e-4)


def test_neutral_effects_zero_for_no_op_and_positive_otherwise():
    model = tiny_model()
    clean = se.token_logprobs(model, [BATCH])
    kl, dce = se.neutral_effects(model, [BATCH], clean, [AddVectors({0: torch.ones(32)}, 0.0)])
    assert len(kl) == 8 and len(dce) == 6  # real tokens; real (t, t+1) pairs
    assert kl.abs().max() < 1e-6 and dce.abs().max() < 1e-6
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    kl, _ = se.neutral_effects(model, [BATCH], clean, [AddVectors({0: v - v.mean()}, 5.0)])
    assert (kl > 1e-3).all()


def test_gap_fraction_and_bootstrap():
    lo, hi = torch.tensor([0.2, 0.4, 0.3]), torch.tensor([0.8, 0.9, 0.7])
    p = lo + 0.5 * (hi - lo)
    est = se.bootstrap(se.gap_fraction(p, lo, hi), 3, n_boot=200)
    assert abs(est.mean - 0.5) < 1e-6 and est.lo <= 0.5 + 1e-6 <= est.hi + 2e-6
    drop = se.bootstrap(se.gap_fraction(lo, lo, hi, toward_hi=False), 3, n_boot=50)
    assert abs(drop.mean - 1.0) < 1e-6
    noisy = se.bootstrap(lambda i: torch.arange(10.0)[i].mean(), 10, n_boot=500, seed=1)
    assert noisy.lo < 4.5 < noisy.hi


def test_pareto_and_choose():
    P = lambda kl, rec: se.SweepPoint("resid", False, 0, 1.0, 0.5, rec, kl)
    pts = [P(0.01, 0.2), P(0.05, 0.1), P(0.08, 0.6), P(0.5, 0.9), P(0.6, 0.7)]
    assert [(p.kl, p.recovered) for p in se.pareto(pts)] == [(0.01, 0.2), (0.08, 0.6), (0.5, 0.9)]
    assert se.choose(pts, 0.1).recovered == 0.6
    assert se.choose(pts, 0.001).kl == 0.01


def test_figures_from_sweep_points():
    pts = [se.SweepPoint("resid", c, l, a, 0.5, 0.1 * l * a, 0.01 * a) for c in (False, True) for l in (3, 5) for a in (1.0, 2.0)]
    pts.append(se.SweepPoint("iti", False, -1, 5.0, 0.6, 0.4, 0.02))
    fig = se.dose_heatmap(pts, "resid", "p_truth")
    assert fig.data[0].z.shape == (2, 2)
    assert len(se.dose_heatmap(pts, "resid", "kl", control=True).data) == 1
    names = [t.name for t in se.frontier_figure(pts).data]
    assert "resid" in names and "resid random" in names and "iti frontier" in names


def test_frontier_figure_with_evaluated_points():
    pts = [se.SweepPoint("resid", False, 3, 1.0, 0.5, 0.4, 0.02)]
    e = {"recovered": se.Estimate(0.4, 0.2, 0.6), "kl": se.Estimate(0.02, 0.01, 0.03)}
    fig = se.frontier_figure(pts, {"resid": {False: e, True: e}})
    assert any("chosen" in (t.name or "") for t in fig.data)
