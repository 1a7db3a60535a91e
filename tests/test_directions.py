import pytest
import torch

from mechlie.core import stats
from mechlie.read.directions import (
    FITS,
    DirectionScores,
    auroc,
    diff_of_means,
    get_fit,
    null_directions,
    project,
    register_fit,
    score_directions,
    split_by_fact,
)


def test_planted_direction_is_recovered():
    g = torch.Generator().manual_seed(0)
    d = 64
    planted = torch.randn(d, generator=g)
    planted /= planted.norm()
    honest = torch.randn(2000, 3, d, generator=g)
    lying = torch.randn(2000, 3, d, generator=g) + 3.0 * planted
    direction = diff_of_means(honest, lying)
    cos = torch.nn.functional.cosine_similarity(direction, planted.expand(3, d), dim=-1)
    assert (cos > 0.99).all(), cos


def test_split_never_leaks_a_fact():
    facts = [f"f{i % 37}" for i in range(200)]  # every fact appears several times
    for seed in range(5):
        s = split_by_fact(facts, 0.3, seed)
        assert sorted(s.train + s.test) == list(range(200))
        assert not ({facts[i] for i in s.train} & {facts[i] for i in s.test})
        assert s.test and s.train


def test_auroc_matches_definition():
    pos = torch.tensor([0.9, 0.8, 0.3])
    neg = torch.tensor([0.1, 0.8, 0.2, 0.4])
    # pairs: 0.9>all 4; 0.8>0.1,0.2,0.4 and ties 0.8 -> 3.5; 0.3>0.1,0.2 -> 2
    assert auroc(pos, neg).item() == pytest.approx((4 + 3.5 + 2) / 12)


def test_scores_and_controls_on_separable_data():
    g = torch.Generator().manual_seed(1)
    d = 16
    planted = torch.zeros(d)
    planted[0] = 3.0
    honest = torch.randn(100, d, generator=g)
    lying = torch.randn(100, d, generator=g) + planted
    split = split_by_fact([f"f{i}" for i in range(100)], 0.3, 0)
    s = score_directions(honest, lying, split, n_perm=200, n_random=100)
    assert s.auroc.item() > 0.95 and s.auroc_lo.item() <= s.auroc.item() <= s.auroc_hi.item()
    assert s.auroc_hi.item() - s.auroc_lo.item() < 0.2 and s.n_test_facts == s.n_test == 30
    # With labels swapped within pairs there is nothing to learn: the null sits at chance.
    assert s.null_auroc.shape == (200,) and s.random_auroc.shape == (100,)
    assert abs(s.null_mean.item() - 0.5) < 0.05 and s.null_bar < 0.8 < s.auroc.item()
    assert s.beats_null.item() and s.summary()["null"]["n_pass"] == 1
    assert project(lying, s.direction).mean() > project(honest, s.direction).mean()


def _paired(
    n: int, c: int, d: int, seed: int, signal: torch.Tensor | None = None, fact_sd: float = 2.0, noise_sd: float = 1.0
):
    """Pairs sharing a per-fact component; lying = honest + ``signal`` (per component) + noise."""
    g = torch.Generator().manual_seed(seed)
    fact = fact_sd * torch.randn(n, c, d, generator=g)
    honest = fact + noise_sd * torch.randn(n, c, d, generator=g)
    lying = fact + noise_sd * torch.randn(n, c, d, generator=g) + (0 if signal is None else signal)
    return honest, lying


def test_null_is_centred_at_chance_and_rarely_beaten_without_signal():
    honest, lying = _paired(80, 60, 16, seed=2)
    split = split_by_fact([f"f{i}" for i in range(80)], 0.4, 0)
    s = score_directions(honest, lying, split, n_perm=300, n_random=50)
    assert s.null_auroc.shape == (300, 60)
    assert abs(s.null_auroc.mean().item() - 0.5) < 0.02
    assert (s.null_mean - 0.5).abs().max() < 0.08
    # Family-wise bar: at most a few of 60 signal-free components pass it (expected ~0).
    assert s.beats_null.float().mean() <= 0.05
    # Uncorrected per-component 95th percentile: passed by about 5%.
    assert (s.auroc > s.null_q95).float().mean() <= 0.15
    assert s.null_bar > s.null_q95.mean()


def test_planted_signal_beats_the_max_null_bar_and_random_directions():
    c, d = 40, 64
    signal = torch.zeros(c, d)
    signal[:5, 0] = 3.0  # components 0..4 carry a lying direction
    honest, lying = _paired(80, c, d, seed=3, signal=signal)
    split = split_by_fact([f"f{i}" for i in range(80)], 0.4, 0)
    s = score_directions(honest, lying, split, n_perm=200, n_random=200)
    assert s.beats_null[:5].all() and s.beats_random[:5].all()
    assert s.beats_null[5:].float().mean() <= 0.05
    assert s.summary()["max"]["component"][0] < 5


def test_null_directions_hold_no_copy_of_the_real_one():
    # The old control pooled honest and lying rows and reshuffled them: its fake "lying" group
    # held about half of the real lying rows, so its direction was a scaled copy of the real one
    # (|cos| near 1 when the signal is strong) and its held-out AUROC swung far from 0.5.
    c, d = 1, 32
    true = torch.zeros(c, d)
    true[0, 0] = 5.0
    honest, lying = _paired(100, c, d, seed=4, signal=true, fact_sd=0.3, noise_sd=0.1)
    split = split_by_fact([f"f{i}" for i in range(100)], 0.3, 0)
    tr = torch.tensor(split.train)
    cos = lambda dirs: torch.nn.functional.cosine_similarity(dirs[:, 0], true[0].expand(len(dirs), d), dim=-1)
    swaps = stats.paired_swap_masks(len(tr), 200, seed=0)
    assert cos(null_directions(honest[tr], lying[tr], swaps)).abs().mean() < 0.3
    # The pooled reshuffle, for reference: this is what the test would catch.
    g = torch.Generator().manual_seed(0)
    pooled = torch.cat([honest[tr], lying[tr]])
    old = []
    for _ in range(200):
        p = torch.randperm(len(pooled), generator=g)
        old.append(diff_of_means(pooled[p[: len(tr)]], pooled[p[len(tr) :]]))
    assert cos(torch.stack(old)).abs().mean() > 0.6
    # And the null's held-out AUROC stays near chance even though the signal is strong.
    s = score_directions(honest, lying, split, n_perm=200, n_random=20)
    assert abs(s.null_mean.item() - 0.5) < 0.05 and s.null_q95.item() < 0.75 and s.auroc.item() > 0.99


def test_vectorised_null_equals_refitting_each_draw():
    honest, lying = _paired(30, 4, 8, seed=5)
    swaps = stats.paired_swap_masks(30, 25, seed=1)
    fast = null_directions(honest, lying, swaps)  # diff of means: one matrix product
    slow = null_directions(honest, lying, swaps, fit=lambda h, l: diff_of_means(h, l))
    assert fast.shape == (25, 4, 8) and torch.allclose(fast, slow, atol=1e-5)


def test_custom_fit_is_used_for_the_null_too_and_ci_resamples_facts():
    calls = []

    def first_pair(h, l):
        calls.append(1)
        return l[0] - h[0]

    honest, lying = _paired(40, 3, 8, seed=6, signal=torch.ones(3, 8))
    facts = [f"f{i // 2}" for i in range(40)]  # two pairs per fact
    split = split_by_fact(facts, 0.3, 0)
    s = score_directions(honest, lying, split, fit=first_pair, n_perm=30, n_random=10)
    assert len(calls) == 1 + 30 and s.fit == "first_pair"
    assert s.n_test == 2 * s.n_test_facts
    t, meta = s.to_tensors()
    assert torch.equal(DirectionScores.from_tensors(t, meta).null_auroc, s.null_auroc)


def test_mismatched_shapes_raise():
    # TypeError: jaxtyping's shape check under pytest fires before diff_of_means' own ValueError.
    with pytest.raises((ValueError, TypeError)):
        diff_of_means(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError):
        split_by_fact(["a", "a"])


def test_fit_registry():
    assert get_fit("diff_of_means") is diff_of_means
    own = lambda honest, lying: lying[0] - honest[0]
    assert get_fit(own) is own

    @register_fit("test_scaled_dom")
    def scaled(scale: float = 1.0):
        return lambda honest, lying: scale * diff_of_means(honest, lying)

    try:
        h, l = torch.zeros(4, 2, 3), torch.ones(4, 2, 3)
        assert torch.allclose(get_fit("test_scaled_dom", scale=2.0)(h, l), torch.full((2, 3), 2.0))
        with pytest.raises(ValueError, match="already registered"):
            register_fit("test_scaled_dom")(lambda: own)
    finally:
        FITS.pop("test_scaled_dom")
    with pytest.raises(ValueError, match="unknown fit"):
        get_fit("no_such_fit")
