"""Steering, ITI head shifts and directional ablation on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_model as _tiny
from transformer_lens import HookedTransformer

from mechlie.control.steering import (
    AddVectors,
    DirectionalAblation,
    HeadSetMean,
    HeadShift,
    Intervention,
    SteeringError,
    head_directions,
    head_write,
    positions_touched,
    random_head_set_mean,
    random_head_shift,
    random_like,
    residual_directions,
    steer,
)


def tiny_model(normalization: str | None = "LN", attn_only: bool = False) -> HookedTransformer:
    return _tiny(n_layers=3, attn_only=attn_only, normalization=normalization, n_ctx=32)


TOKENS = torch.tensor([[1, 5, 9, 13, 2, 7], [4, 4, 8, 30, 11, 3]])


def no_hooks_left(model) -> bool:
    return all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())


@torch.no_grad()
def test_alpha_zero_equals_unsteered_exactly():
    model = tiny_model()
    clean = model(TOKENS)
    with steer(model, AddVectors({0: torch.randn(32), 2: torch.randn(32)}, 0.0)):
        assert torch.equal(model(TOKENS), clean)
    shift = HeadShift(((1, 2), (0, 0)), torch.randn(2, 8), torch.ones(2), 0.0)
    with steer(model, shift):
        assert torch.equal(model(TOKENS), clean)
    assert no_hooks_left(model)


@torch.no_grad()
def test_planted_direction_moves_linear_readout_by_alpha_d_dot_w():
    # No final normalization: logits = resid_post[last] @ W_U + b_U, a linear readout.
    model = tiny_model(normalization=None, attn_only=True)
    d = torch.randn(32, generator=torch.Generator().manual_seed(0))
    alpha, tok = 2.5, 17
    clean = model(TOKENS)
    with steer(model, AddVectors({model.cfg.n_layers - 1: d}, alpha)):
        steered = model(TOKENS)
    expected = alpha * (d @ model.W_U[:, tok])
    torch.testing.assert_close(steered[..., tok] - clean[..., tok], expected.expand(2, 6), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_head_shift_moves_head_write_by_alpha_sigma_u_WO():
    model = tiny_model()
    u = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    sigma, alpha = torch.tensor([0.7]), 3.0
    _, clean = model.run_with_cache(TOKENS, names_filter="blocks.1.hook_attn_out")
    with steer(model, HeadShift(((1, 2),), u, sigma, alpha)):
        _, cache = model.run_with_cache(TOKENS, names_filter="blocks.1.hook_attn_out")
    delta = cache["blocks.1.hook_attn_out"] - clean["blocks.1.hook_attn_out"]
    expected = alpha * sigma * (u[0] @ model.W_O[1, 2])
    torch.testing.assert_close(delta, expected.expand_as(delta), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("where", ["writes", "resid"])
@torch.no_grad()
def test_ablation_leaves_no_component(where):
    model = tiny_model()
    d = torch.randn(32, generator=torch.Generator().manual_seed(2)) * 5
    u = d / d.norm()
    names = lambda n: n.endswith(
        ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
    )
    _, clean = model.run_with_cache(TOKENS, names_filter=names)
    assert max((clean[k] @ u).abs().max().item() for k in clean.keys()) > 1e-2  # there was something to remove
    with steer(model, DirectionalAblation(d, where=where)):
        _, cache = model.run_with_cache(TOKENS, names_filter=names)
    # "resid" cleans resid_pre/resid_post only (resid_mid = clean resid_pre + raw attn_out)
    checked = (
        [k for k in cache.keys() if k.endswith(("resid_pre", "resid_post"))] if where == "resid" else list(cache.keys())
    )
    worst = max((cache[k] @ u).abs().max().item() for k in checked)
    assert worst <= 1e-5


def test_hooks_removed_after_exception():
    model = tiny_model()
    clean = model(TOKENS)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, AddVectors({1: torch.ones(32)}, 2.0), DirectionalAblation(torch.ones(32))):
            model(TOKENS)
            raise RuntimeError("boom")
    assert no_hooks_left(model)
    assert torch.equal(model(TOKENS), clean)


def test_nested_contexts_keep_outer_hooks():
    model = tiny_model()
    with steer(model, AddVectors({1: torch.ones(32)}, 2.0)):
        outer = model(TOKENS)
        with steer(model, AddVectors({0: torch.ones(32)}, 0.0)):
            pass
        assert torch.equal(model(TOKENS), outer)
    assert no_hooks_left(model)


@pytest.mark.parametrize(
    "make",
    [
        lambda: AddVectors({0: torch.ones(31)}, 1.0),  # wrong dimension
        lambda: AddVectors({3: torch.ones(32)}, 1.0),  # layer out of range
        lambda: AddVectors({-1: torch.ones(32)}, 1.0),
        lambda: AddVectors({0: torch.ones(32)}, math.nan),  # alpha not finite
        lambda: AddVectors({0: torch.ones(32)}, math.inf),
        lambda: AddVectors({}, 1.0),
        lambda: AddVectors({0: torch.ones(32)}, 1.0, policy="sometimes"),
        lambda: AddVectors({0: torch.full((32,), math.nan)}, 1.0),
        lambda: HeadShift(((0, 4),), torch.ones(1, 8), torch.ones(1), 1.0),  # head out of range
        lambda: HeadShift(((0, 1),), torch.ones(1, 7), torch.ones(1), 1.0),
        lambda: DirectionalAblation(torch.zeros(32)),
        lambda: DirectionalAblation(torch.ones(16)),
    ],
)
def test_bad_inputs_raise_steering_error(make):
    model = tiny_model()
    with pytest.raises(SteeringError):
        with steer(model, make()):
            pass
    assert no_hooks_left(model)
    assert issubclass(SteeringError, ValueError)


def test_directions_recover_planted_signal():
    g = torch.Generator().manual_seed(0)
    n, L, H, dh, d = 200, 2, 3, 8, 16
    planted = torch.nn.functional.normalize(torch.randn(dh, generator=g), dim=0)
    honest = torch.randn(n, L, H, dh, generator=g)
    lying = torch.randn(n, L, H, dh, generator=g)
    lying[:, 1, 2] += 5 * planted  # only head (1, 2) carries the framing
    train = list(range(150))
    hd = head_directions(honest, lying, train)
    assert torch.nn.functional.cosine_similarity(hd.units[1, 2], planted, dim=0) > 0.95
    shift = hd.top(1, alpha=1.0)
    assert shift.heads == ((1, 2),)
    # residual: planted direction, and the held-out rows are never used
    resid_planted = torch.randn(d, generator=g)
    h = torch.randn(n, L, d, generator=g)
    li = h.clone() + resid_planted
    li[150:] += 1000.0
    dirs = residual_directions(h, li, train)
    torch.testing.assert_close(dirs, resid_planted.expand(L, d))
    r = random_like(dirs, seed=0)
    torch.testing.assert_close(r.norm(dim=-1), dirs.norm(dim=-1))


@torch.no_grad()
def test_random_head_shift_matches_the_write_to_the_residual_stream():
    model = tiny_model()
    g = torch.Generator().manual_seed(100)  # not one of the control seeds below
    units = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    shift = HeadShift(((0, 1), (1, 2), (2, 0)), units, torch.tensor([0.5, 1.0, 2.0]), -2.0)
    real = head_write(shift, model)
    for seed in range(4):
        rnd = random_head_shift(shift, model, seed=seed)
        torch.testing.assert_close(rnd.units.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(head_write(rnd, model), real, atol=1e-4, rtol=1e-4)
        assert rnd.heads == shift.heads and rnd.alpha == shift.alpha
        assert (rnd.units * units).sum(-1).abs().max() < 0.99  # a different direction
    # and the measured change of attn_out has that norm
    tokens = TOKENS[:1]
    _, clean = model.run_with_cache(tokens, names_filter="blocks.1.hook_attn_out")
    one = HeadShift(((1, 2),), units[1:2], torch.tensor([1.0]), -2.0)
    with steer(model, random_head_shift(one, model, seed=7)):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_attn_out")
    moved = (cache["blocks.1.hook_attn_out"] - clean["blocks.1.hook_attn_out"]).norm(dim=-1)
    torch.testing.assert_close(moved, head_write(one, model).expand_as(moved), atol=1e-4, rtol=1e-4)


class Clamp:
    """A user-defined intervention, written outside mechlie: clamp the residual stream's component
    along ``u`` at one layer to ``value`` (as one would clamp an SAE feature)."""

    def __init__(self, layer: int, u: torch.Tensor, value: float):
        self.layer, self.u, self.value = layer, u / u.norm(), value

    def validate(self, model) -> None:
        if self.u.shape != (model.cfg.d_model,):
            raise SteeringError("clamp direction has the wrong width")

    def hooks(self, model, state):
        def fn(act, hook):
            return act + (self.value - act @ self.u)[..., None] * self.u

        return [(f"blocks.{self.layer}.hook_resid_post", fn)]


@torch.no_grad()
def test_user_defined_intervention_plugs_into_steer():
    model = tiny_model()
    u = torch.randn(32, generator=torch.Generator().manual_seed(4))
    clamp = Clamp(1, u, 3.0)
    assert isinstance(clamp, Intervention)
    _, clean = model.run_with_cache(TOKENS, names_filter="blocks.1.hook_resid_post")
    assert ((clean["blocks.1.hook_resid_post"] @ clamp.u) - 3.0).abs().min() > 1e-2
    with steer(model, clamp, AddVectors({0: torch.zeros(32)}, 1.0)):
        _, cache = model.run_with_cache(TOKENS, names_filter="blocks.1.hook_resid_post")
    torch.testing.assert_close(
        cache["blocks.1.hook_resid_post"] @ clamp.u, torch.full((2, 6), 3.0), atol=1e-4, rtol=1e-4
    )
    assert no_hooks_left(model)
    with pytest.raises(SteeringError, match="width"):
        with steer(model, Clamp(1, torch.ones(16), 0.0)):
            pass
    # a clear SteeringError; under pytest's runtime type checks the annotation catches it first
    with pytest.raises((SteeringError, TypeError), match="Intervention"):
        with steer(model, object()):
            pass
    assert no_hooks_left(model)


@torch.no_grad()
def test_head_set_mean_patches_only_the_final_position():
    model = tiny_model()
    heads = ((0, 1), (2, 3), (2, 0))
    honest, lying = torch.randn(3, 8), torch.randn(3, 8)
    _, clean = model.run_with_cache(TOKENS)
    for alpha, target in ((-1.0, honest), (1.0, lying), (-0.5, None)):
        with steer(model, HeadSetMean(heads, honest, lying, alpha)) as state:
            _, cache = model.run_with_cache(TOKENS)
        assert positions_touched(state) == [(0, (TOKENS.shape[1] - 1,))]
        for i, (l, h) in enumerate(heads):
            z, z0 = cache[f"blocks.{l}.attn.hook_z"][:, :, h], clean[f"blocks.{l}.attn.hook_z"][:, :, h]
            if target is not None:
                torch.testing.assert_close(z[:, -1], target[i].expand(2, 8), atol=1e-5, rtol=1e-5)
            elif l == 0:  # halfway from its own unpatched value (the same as clean below any patch)
                torch.testing.assert_close(z[:, -1], (z0[:, -1] + honest[i]) / 2, atol=1e-5, rtol=1e-5)
            if l == 0:  # block 0 runs before any patched head: earlier positions untouched
                torch.testing.assert_close(z[:, :-1], z0[:, :-1])
        # only the final position's residual (and so only its logits) can change
        torch.testing.assert_close(cache["blocks.2.hook_resid_post"][:, :-1], clean["blocks.2.hook_resid_post"][:, :-1])
        assert (cache["blocks.2.hook_resid_post"][:, -1] - clean["blocks.2.hook_resid_post"][:, -1]).abs().max() > 1e-3
    assert no_hooks_left(model)
    with pytest.raises(SteeringError, match="honest means"):
        with steer(model, HeadSetMean(heads, torch.randn(3, 5), torch.randn(3, 5), -1.0)):
            pass
    with pytest.raises(SteeringError, match="head 9 out of range"):
        with steer(model, HeadSetMean(((0, 9),), honest[:1], lying[:1], -1.0)):
            pass
    means_h, means_l = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    draws = [random_head_set_mean(HeadSetMean(heads, honest, lying, -1.0), means_h, means_l, seed) for seed in range(6)]
    for d in draws:
        assert len(set(d.heads)) == 3 and d.alpha == -1.0
        torch.testing.assert_close(d.honest, torch.stack([means_h[l, h] for l, h in d.heads]))
    assert len({d.heads for d in draws}) > 1


# ---------------------------------------------------------------------------------------------
# where is separate from what: scaled, random_control and sites on every intervention


def _z_norms(iv: HeadShift) -> torch.Tensor:
    return (iv.sigmas[:, None] * iv.units).norm(dim=-1)


def test_add_vectors_scaled_random_control_and_sites():
    from steer_fixtures import check_intervention_contract

    from mechlie.core.hooks import Site

    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    iv = AddVectors({0: torch.randn(32, generator=g), 2: torch.randn(32, generator=g)}, alpha=-1.0)
    assert iv.sites == (Site("resid_post", 0), Site("resid_post", 2))
    assert iv.sites[1].hook == "blocks.2.hook_resid_post"
    ctrl = check_intervention_contract(model, iv, TOKENS)
    for layer, v in iv.vectors.items():
        torch.testing.assert_close(ctrl.vectors[layer].norm(), v.norm(), atol=1e-4, rtol=1e-4)


def test_head_shift_scaled_random_control_and_sites():
    from steer_fixtures import check_intervention_contract

    from mechlie.core.hooks import Site

    model = tiny_model()
    g = torch.Generator().manual_seed(11)  # not the control's seed: its draw would be these units
    units = torch.nn.functional.normalize(torch.randn(3, model.cfg.d_head, generator=g), dim=-1)
    iv = HeadShift(((0, 1), (2, 0), (2, 3)), units, torch.tensor([1.0, 2.0, 0.5]), alpha=1.0)
    assert iv.sites == (Site("z", 0, 1), Site("z", 2, 0), Site("z", 2, 3))
    assert {s.hook for s in iv.sites} == {"blocks.0.attn.hook_z", "blocks.2.attn.hook_z"}
    ctrl = check_intervention_contract(model, iv, TOKENS)  # with the model: the write's norm is kept
    torch.testing.assert_close(head_write(ctrl, model), head_write(iv, model), atol=1e-4, rtol=1e-4)
    plain = iv.random_control(seed=1)  # without it: the shift's norm in z-space is kept
    torch.testing.assert_close(_z_norms(plain), _z_norms(iv), atol=1e-5, rtol=1e-5)
    assert plain.heads == iv.heads and (plain.units - iv.units).abs().max() > 1e-3


def test_head_set_mean_scaled_random_control_and_sites():
    from steer_fixtures import check_intervention_contract

    from mechlie.core.hooks import Site

    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    honest, lying = torch.randn(2, model.cfg.d_head, generator=g), torch.randn(2, model.cfg.d_head, generator=g)
    iv = HeadSetMean(((1, 0), (1, 2)), honest, lying, alpha=-1.0)
    assert iv.sites == (Site("z", 1, 0, "final"), Site("z", 1, 2, "final"))
    ctrl = check_intervention_contract(model, iv, TOKENS)
    gap = (honest - lying).norm(dim=-1)  # each head moves as far as the real means are apart
    torch.testing.assert_close((ctrl.honest - lying).norm(dim=-1), gap, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((ctrl.lying - honest).norm(dim=-1), gap, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("where", ["writes", "resid"])
def test_directional_ablation_scaled_random_control_and_sites(where):
    from steer_fixtures import check_intervention_contract

    from mechlie.control.steering import sites_of
    from mechlie.core.hooks import Site

    model = tiny_model()
    d = torch.randn(32, generator=torch.Generator().manual_seed(3))
    iv = DirectionalAblation(d, where=where)
    sites = iv.sites_in(model)
    assert iv.hook_names(model) == [s.hook for s in sites]
    n = model.cfg.n_layers
    assert len(sites) == (3 * n if where == "writes" else n + 1)
    ctrl = check_intervention_contract(model, iv, TOKENS, sites=sites)
    torch.testing.assert_close(ctrl.direction.norm(), d.norm(), atol=1e-4, rtol=1e-4)
    with pytest.raises(SteeringError, match="sites_in"):
        _ = iv.sites
    assert not hasattr(iv, "sites") and sites_of(iv, model) == sites
    assert sites_of(AddVectors({1: d}, 1.0), model) == (Site("resid_post", 1),)
    # alpha = 1 (the default) is the plain projection, bit for bit
    with steer(model, iv):
        a = model(TOKENS)
    with steer(model, iv.scaled(1.0)):
        torch.testing.assert_close(model(TOKENS), a, atol=0, rtol=0)
