import numpy as np
import pytest
import scipy.stats
import torch

from mechlie.core import stats


def test_auroc_equals_mann_whitney_u_over_n1_n0_with_ties_and_batches():
    g = torch.Generator().manual_seed(0)
    # Rounded scores so that many ties occur; 3 x 4 components scored at once.
    pos = (torch.randn(23, 3, 4, generator=g) + 0.5).round(decimals=1)
    neg = torch.randn(31, 3, 4, generator=g).round(decimals=1)
    got = stats.auroc(pos, neg)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            u = scipy.stats.mannwhitneyu(pos[:, i, j].numpy(), neg[:, i, j].numpy()).statistic
            assert got[i, j].item() == pytest.approx(u / (23 * 31), abs=1e-6)


def test_auroc_hand_example_and_errors():
    pos = torch.tensor([0.9, 0.8, 0.3])
    neg = torch.tensor([0.1, 0.8, 0.2, 0.4])
    assert stats.auroc(pos, neg).item() == pytest.approx((4 + 3.5 + 2) / 12)
    with pytest.raises(ValueError):
        stats.auroc(torch.zeros(0), neg)


def test_directions_auroc_is_the_stats_auroc():
    from mechlie.read import directions

    assert directions.auroc is stats.auroc


def test_bootstrap_ci_covers_true_mean_at_about_nominal_rate():
    # 200 seeded samples of 40 draws from N(1, 1): a 95% interval should cover 1 about 95% of
    # the time. A broken interval (too narrow, or off-centre) gives far lower coverage.
    rng = np.random.default_rng(0)
    covered = []
    for s in range(200):
        x = torch.from_numpy(rng.normal(1.0, 1.0, 40))
        est = stats.bootstrap(lambda i: x[i].mean(), len(x), n_boot=400, seed=s)
        assert est.lo < est.mean < est.hi and est.n == 40
        covered.append(est.lo <= 1.0 <= est.hi)
    rate = float(np.mean(covered))
    assert 0.85 <= rate <= 0.995, rate


def test_bootstrap_tensor_coverage_shapes_and_draws():
    rng = np.random.default_rng(1)
    true = torch.tensor([[0.0, 1.0, -2.0], [0.5, 3.0, 0.2]])
    covered = []
    for s in range(60):
        x = true + torch.from_numpy(rng.normal(0, 1, (50, 2, 3))).float()
        est = stats.bootstrap_tensor(lambda i: x[i].mean(0), 50, n_boot=300, seed=s)
        assert est.mean.shape == est.lo.shape == est.hi.shape == (2, 3)
        assert est.draws.shape == (300, 2, 3)
        assert torch.allclose(est.mean, x.mean(0))
        covered.append(((est.lo <= true) & (true <= est.hi)).float().mean().item())
    assert 0.85 <= float(np.mean(covered)) <= 0.995
    e = est.at(1, 1)
    assert isinstance(e, stats.Estimate) and e.lo < e.mean < e.hi


def test_bootstrap_percentile_fallback_when_bca_undefined():
    # A constant statistic has a degenerate bootstrap distribution: BCa is undefined.
    est = stats.bootstrap(lambda i: torch.tensor(2.0), 10, n_boot=50)
    assert est.mean == est.lo == est.hi == 2.0


def test_estimate_formatting_and_dict():
    e = stats.Estimate(0.3412, 0.2801, 0.4009, 24)
    assert str(e) == "0.34 [0.28, 0.40]"
    assert f"{e:.3f}" == "0.341 [0.280, 0.401]"
    assert e.to_dict()["n"] == 24 and e.excludes(0.0) and not e.excludes(0.3)


def test_max_null_threshold_on_a_known_array():
    # Draw k has max over components k (k = 1..100): the 95th percentile of 1..100 (linear
    # interpolation) is 95.05.
    null = torch.zeros(100, 3, 4)
    null[:, 1, 2] = torch.arange(1, 101).float()
    null[:, 0, 0] = torch.arange(1, 101).float() - 50  # never the max
    assert stats.max_null_threshold(null, 0.95) == pytest.approx(95.05)
    assert stats.max_null_threshold(null, 0.5) == pytest.approx(50.5)


def test_spearman_matches_scipy():
    rng = np.random.default_rng(2)
    a = rng.normal(size=30)
    b = a + rng.normal(size=30)
    assert stats.spearman(torch.from_numpy(a), b.tolist()) == pytest.approx(scipy.stats.spearmanr(a, b).statistic)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        stats.spearman([1, 2], [1, 2, 3])


def test_paired_swap_masks_are_seeded_and_balanced():
    m = stats.paired_swap_masks(40, 500, seed=3)
    assert m.shape == (500, 40) and m.dtype == torch.bool
    assert torch.equal(m, stats.paired_swap_masks(40, 500, seed=3))
    assert not torch.equal(m, stats.paired_swap_masks(40, 500, seed=4))
    assert (m.sum(1) == 20).all()  # exactly half swapped in every draw
    assert (m.float().mean(0) - 0.5).abs().max() < 0.1  # every pair swapped about half the time
    odd = stats.paired_swap_masks(7, 400, seed=0).sum(1)
    assert set(odd.tolist()) == {3, 4}


def test_rank_stability_counts_top1_and_topk():
    draws = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [3.0, 2.0, 0.0]])
    top1, top2 = stats.rank_stability(draws, k=2)
    assert top1.tolist() == [0.75, 0.25, 0.0]
    assert top2.tolist() == [0.75, 0.75, 0.5]


def test_normalized_effect():
    x = torch.tensor([0.0, 1.0, 2.0])
    assert stats.normalized_effect(x, 0.0, 2.0).tolist() == [0.0, 0.5, 1.0]
