import pytest
import torch

from mechlie.directions import FITS, auroc, diff_of_means, get_fit, project, register_fit, score_directions, split_by_fact


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
    s = score_directions(honest, lying, split)
    assert s.auroc.item() > 0.95
    # With labels shuffled there is nothing to learn: the control falls to near chance.
    assert abs(s.auroc_shuffled.item() - 0.5) < 0.3 and s.auroc_shuffled.item() < s.auroc.item() - 0.2
    assert project(lying, s.direction).mean() > project(honest, s.direction).mean()


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
