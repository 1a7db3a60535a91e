import numpy as np
import pytest
import torch
from torch.nn.functional import cosine_similarity as cos

from mechlie.core.activations import collect
from mechlie.core.metrics import gather_logprob
from mechlie.read.directions import auroc
from mechlie.read.probes import (
    PROBES,
    ProbeError,
    fit_probe,
    grad_features,
    pair_fit,
    pair_rows,
    probe_from_tensors,
)
from tests.tiny_models import random_batch, tiny_model


def planted(n=300, c=(2,), d=16, shift=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    honest = torch.randn(n, *c, d, generator=g)
    lying = torch.randn(n, *c, d, generator=g) + shift * u
    return honest, lying, u


@pytest.mark.parametrize("kind", ["diff_of_means", "mass_mean", "logistic", "lat", "ccs"])
def test_each_probe_recovers_a_planted_direction(kind):
    honest, lying, u = planted()
    X, y, pairs = pair_rows(honest, lying)
    probe = fit_probe(kind, X, y, pairs=pairs)
    c = cos(probe.direction, u.expand_as(probe.direction), dim=-1)
    assert (c > 0.9).all(), (kind, c)  # and it points honest -> lying
    s = probe.score(X)
    assert (auroc(s[y == 1], s[y == 0]) > 0.95).all()


def test_probes_on_tiny_model_activations():
    # Realistic, anisotropic noise: a tiny model's residual stream on random prompts.
    model = tiny_model(n_layers=2, attn_only=False)
    acts = collect(model, random_batch(240, 6, seed=3), kinds=("resid_post",), progress=False)["resid_post"]
    g = torch.Generator().manual_seed(0)
    u = torch.randn(acts.shape[-1], generator=g)
    u = u / u.norm() * acts.norm(dim=-1).mean() * 0.5
    honest, lying = acts[:120], acts[120:] + u
    X, y, pairs = pair_rows(honest, lying)
    for kind in ("diff_of_means", "logistic", "mass_mean"):
        s = fit_probe(kind, X, y, pairs=pairs).score(X)
        assert (auroc(s[y == 1], s[y == 0]) > 0.95).all(), kind
    d = fit_probe("diff_of_means", X, y).direction
    assert (cos(d, u.expand_as(d), dim=-1) > 0.9).all()


def test_mass_mean_corrects_for_covariance():
    # Noise stretched along an axis that overlaps the class direction: the covariance-corrected
    # probe finds the discriminant w, the plain difference of means (Sigma w) does not.
    g = torch.Generator().manual_seed(1)
    d, n = 8, 2000
    A = torch.eye(d)
    A[0, 0], A[1, 0] = 6.0, 5.0  # long axis mixes dims 0 and 1
    w = torch.zeros(d)
    w[1] = 1.0
    sigma = A @ A.T
    honest = torch.randn(n, d, generator=g) @ A.T
    lying = torch.randn(n, d, generator=g) @ A.T + sigma @ w * 0.5
    X, y, _ = pair_rows(honest, lying)
    mm = fit_probe("mass_mean", X, y, shrinkage=0.01).direction
    dm = fit_probe("diff_of_means", X, y).direction
    assert cos(mm, w, dim=0) > 0.9
    assert cos(dm, w, dim=0) < 0.8


def test_logistic_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    honest, lying, _ = planted(n=80, c=(), d=10, shift=1.0, seed=2)
    X, y, _ = pair_rows(honest, lying)
    probe = fit_probe("logistic", X, y, C=0.5)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)).fit(
        X.numpy().astype(np.float64), y.numpy()
    )
    expected = torch.tensor(ref.decision_function(X.numpy().astype(np.float64)), dtype=torch.float32)
    assert torch.allclose(probe.score(X), expected, atol=1e-3, rtol=1e-3)


def test_ccs_finds_a_planted_unsupervised_split():
    # Each pair (a, b) differs along a template direction t (same for every pair, which CCS must
    # ignore) and along u with a random per-pair sign (which member is "true").
    g = torch.Generator().manual_seed(4)
    m, d = 200, 12
    u, t = torch.zeros(d), torch.zeros(d)
    u[0], t[1] = 1.0, 1.0
    s = torch.randint(0, 2, (m,), generator=g).float() * 2 - 1
    base = torch.randn(m, d, generator=g)
    a = base + 3 * s[:, None] * u + 5 * t + 0.3 * torch.randn(m, d, generator=g)
    b = base - 3 * s[:, None] * u - 5 * t + 0.3 * torch.randn(m, d, generator=g)
    X = torch.cat([a, b])
    y = torch.cat([(s > 0).float(), (s < 0).float()])  # used only for the sign
    pairs = torch.stack([torch.arange(m), torch.arange(m, 2 * m)], 1)
    probe = fit_probe("ccs", X, y, pairs=pairs, randomize_slots=False)  # the slots are a template here
    assert cos(probe.direction, u, dim=0) > 0.9
    assert abs(cos(probe.direction, t, dim=0)) < 0.3
    # Diff of means on the slots (a vs b) would find the template instead.
    dm = fit_probe("diff_of_means", X, torch.cat([torch.zeros(m), torch.ones(m)])).direction
    assert abs(cos(dm, t, dim=0)) > 0.9


def test_ensemble_over_layers():
    honest, lying, _ = planted(n=100, c=(3,), d=8, shift=2.0)
    honest[:, 0], lying[:, 0] = torch.randn(100, 8), torch.randn(100, 8)  # layer 0 carries nothing
    X, y, pairs = pair_rows(honest, lying)
    probe = fit_probe("ensemble", X, y, base="logistic")
    s = probe.score(X)
    assert s.shape == (200,)
    assert auroc(s[y == 1], s[y == 0]) > 0.95


@pytest.mark.parametrize("kind", PROBES)
def test_save_load_roundtrip(kind):
    honest, lying, _ = planted(n=40, c=(2,), d=6)
    X, y, pairs = pair_rows(honest, lying)
    probe = fit_probe(kind, X, y, pairs=pairs, **({"n_steps": 50} if kind == "ccs" else {}))
    again = probe_from_tensors(*probe.to_tensors())
    assert torch.equal(again.score(X), probe.score(X))
    assert again.kind == probe.kind


def test_bad_input():
    honest, lying, _ = planted(n=10, c=(), d=4)
    X, y, pairs = pair_rows(honest, lying)
    with pytest.raises(ProbeError, match="both classes"):
        fit_probe("logistic", X, torch.zeros(len(X)))
    with pytest.raises(ProbeError, match="too few"):
        fit_probe("diff_of_means", X[9:11], y[9:11])
    with pytest.raises(ProbeError, match="pairs"):
        fit_probe("lat", X, y)
    with pytest.raises(ProbeError, match="unknown probe"):
        fit_probe("svm", X, y)
    probe = fit_probe("diff_of_means", X, y)
    with pytest.raises(ProbeError, match="shape"):
        probe.score(torch.zeros(3, 5))
    X[0, 0] = float("nan")
    with pytest.raises(ProbeError, match="NaN"):
        fit_probe("diff_of_means", X, y)


def test_pair_fit_gives_a_direction_for_directions_module():
    from mechlie.read.directions import get_fit, score_directions, split_by_fact

    honest, lying, u = planted(n=200, c=(2,), d=8)
    d = pair_fit("lat")(honest, lying)
    assert d.shape == (2, 8)
    assert (cos(d, u.expand_as(d), dim=-1) > 0.9).all()
    d2 = get_fit("logistic", C=0.1)(honest, lying)
    assert (cos(d2, u.expand_as(d2), dim=-1) > 0.9).all()
    split = split_by_fact([f"f{i}" for i in range(200)], 0.3, 0)
    s = score_directions(honest, lying, split, fit="mass_mean", n_perm=20, n_random=20, n_boot=50)
    assert (s.auroc > 0.95).all()


def test_grad_features_match_a_manual_gradient():
    model = tiny_model(n_layers=2)
    b = random_batch(3, 5, seed=1)
    ans = torch.tensor([[7, -1], [8, 9], [10, -1]])
    feats = grad_features(model, b.tokens, b.attention_mask, ans, kinds=("z", "resid_post"), batch_size=2)
    assert feats["z"].shape == (3, 2, 4, 8) and feats["resid_post"].shape == (3, 2, 32)
    # Row 1 alone, by hand.
    store = {}

    def keep(act, hook):
        act.retain_grad()
        store["z"] = act

    with torch.enable_grad(), model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", keep)]):
        logits = model(b.tokens[1:2])[:, -1]
        gather_logprob(logits.log_softmax(-1), ans[1:2]).sum().backward()
    manual = (store["z"] * store["z"].grad)[0, -1]
    assert torch.allclose(feats["z"][1, 1], manual, atol=1e-5)
    assert manual.abs().max() > 1e-3


def test_a_new_probe_is_one_decorated_function():
    from mechlie.read.directions import FITS, get_fit
    from mechlie.read.fits import register_probe
    from mechlie.read.probes import Probe, probe_kinds

    @register_probe("test_first_pair")
    def fit_first_pair(X, y, pairs=None, seed=0, scale: float = 1.0):
        return Probe("test_first_pair", scale * (X[y == 1][0] - X[y == 0][0]), torch.zeros(X.shape[1:-1]))

    try:
        honest, lying = torch.zeros(4, 2, 3), torch.ones(4, 2, 3)
        X, y, pairs = pair_rows(honest, lying)
        assert "test_first_pair" in probe_kinds() and "test_first_pair" not in PROBES
        assert torch.equal(fit_probe("test_first_pair", X, y, scale=2.0).direction, torch.full((2, 3), 2.0))
        assert torch.equal(get_fit("test_first_pair", scale=2.0)(honest, lying), torch.full((2, 3), 2.0))
        with pytest.raises(ValueError, match="already registered"):
            register_probe("test_first_pair")(lambda *a: None)
    finally:
        FITS.pop("test_first_pair")
    assert "test_first_pair" not in probe_kinds()
    assert PROBES == ("diff_of_means", "mass_mean", "logistic", "lat", "ccs", "ensemble")
