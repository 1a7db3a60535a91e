"""Interventions that steer or ablate a direction, applied through hooks that are always removed.

An intervention is anything that implements the :class:`Intervention` protocol: ``validate(model)``
(raise :class:`SteeringError` if it cannot apply) and ``hooks(model, state)`` (a list of
``(hook_name, fn)`` forward hooks that read the :class:`SteeringState`). :func:`steer` applies any
number of them and always removes their hooks; users add their own (a clamp, an SAE feature) without
touching mechlie. Four are built in, each a small frozen dataclass:

- :class:`AddVectors`: add ``alpha * vector[l]`` to ``blocks.l.hook_resid_post`` for each chosen
  layer ``l``. ``vector`` is used as given (not normalized): with a difference-of-means direction
  (honest -> lying), ``alpha = -1`` moves the lying mean onto the honest mean at that layer, and
  ``alpha = +1`` the other way.
- :class:`HeadShift`: ITI-style head steering (Li et al. 2023, "Inference-Time Intervention").
  For each selected head ``(l, h)`` the head's value mix ``blocks.l.attn.hook_z[:, :, h]``
  (``d_head``-dim, the activation *before* ``W_O``, which is where ITI shifts) gets
  ``alpha * sigma * unit``: ``unit`` is the head's difference-of-means direction in z-space
  (honest -> lying) and ``sigma`` the standard deviation of the training activations projected on
  it. The head's write to the residual stream therefore moves by ``alpha * sigma * unit @ W_O[l, h]``.
- :class:`HeadSetMean`: mean-patching of chosen heads at the final position: ``z`` of head
  ``(l, h)`` at each pass's last position moves toward its mean over honest training prompts
  (``alpha = -1`` sets it there; ``alpha > 0`` moves it toward the lying mean). Used on the heads
  that activation patching ranks highest ("causally chosen"), or on ITI's probe-ranked ones.
- :class:`DirectionalAblation`: project a unit direction ``u`` out of the residual stream at every
  layer (Arditi et al. 2024): ``x <- x - (x . u) u``. With ``where="writes"`` (default, as in the
  paper) this is applied to ``blocks.l.hook_resid_pre`` (so the embeddings are cleaned at block 0)
  and to every write into the stream, ``blocks.l.hook_attn_out`` and ``blocks.l.hook_mlp_out``;
  ``resid_mid``, ``resid_post`` and the input of the unembedding then carry no component along ``u``
  either. ``where="resid"`` instead projects ``blocks.0.hook_resid_pre`` and every
  ``blocks.l.hook_resid_post``: the block inputs and outputs and the unembedding input are clean,
  but ``resid_mid`` (clean ``resid_pre`` plus the raw ``attn_out``) is not.

Sign convention: directions point honest -> lying, so a negative ``alpha`` pushes toward honesty.

Where is separate from what: every built-in intervention (these four and the learned edits of
:mod:`mechlie.control.learned`) also has ``scaled(alpha)`` (the same intervention at another
strength; its write is linear in ``alpha``), ``random_control(seed, model=None)`` (the same kind
and size, random direction(s): the control every effect is compared with) and ``sites``, the
:class:`mechlie.core.hooks.Site` s it writes to (:func:`sites_of` for the ablation, whose sites
depend on the model's depth).

Position policy (``policy``) says which positions a hook touches in each forward pass:
``"all"``, ``"prompt"`` (only positions that hold prompt tokens) or ``"generated"`` (only
positions that hold generated tokens). Which kind of forward is running is told to the hooks by
whoever runs the model, through the :class:`SteeringState` that :func:`steer` yields: a plain
forward is a prompt forward; :func:`mechlie.core.generation.generate` calls
:meth:`SteeringState.begin_forward` before each pass (prompt pass, then one pass per generated
token, each seeing one new position through the KV cache). Under ``"generated"`` the first
generated token is therefore predicted unsteered: it is steered from the pass that reads it back.
Left-padding positions are touched like any prompt position; no real token ever attends to them.

Every touch is recorded in ``state.log`` as a :class:`Touch` ``(step, phase, policy, positions)``,
positions being indices along the (padded) sequence, counted from the start of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.causal.effects import top_k_components
from mechlie.core.hooks import (
    POLICIES,
    Hook,
    Intervention,
    Policy,
    Site,
    SteeringError,
    SteeringState,
    Touch,
    check_alpha,
    check_layer,
    check_policy,
    check_vector,
    hook_name,
    positions_touched,
    steer,
)
from mechlie.read.directions import get_fit

# ---------------------------------------------------------------------------------------------
# interventions


class SitesNeedModel(SteeringError, AttributeError):
    """``sites`` of an intervention whose sites depend on the model (see :func:`sites_of`); also an
    AttributeError, so ``hasattr(iv, "sites")`` and ``getattr(iv, "sites", None)`` stay safe."""


def sites_of(iv: Intervention, model: HookedTransformer) -> tuple[Site, ...]:
    """Where ``iv`` writes in ``model``: its ``sites_in(model)`` if its sites depend on the model
    (directional ablation writes at every block), else its ``sites``."""
    sites_in = getattr(iv, "sites_in", None)
    return sites_in(model) if sites_in is not None else iv.sites


@dataclass(frozen=True)
class AddVectors:
    """Add ``alpha * vectors[l]`` at ``blocks.l.hook_resid_post`` for each layer in ``vectors``."""

    vectors: dict[int, Float[Tensor, " d_model"]]
    alpha: float
    policy: str = "all"  # one of POLICIES (checked in validate, with a clear error)

    def validate(self, model: HookedTransformer) -> None:
        check_alpha(self.alpha)
        check_policy(self.policy)
        if not self.vectors:
            raise SteeringError("AddVectors needs at least one layer")
        for layer, v in self.vectors.items():
            check_layer(model, layer)
            check_vector(v, model.cfg.d_model, f"direction for layer {layer}")

    def hooks(self, model: HookedTransformer, state: SteeringState) -> list[Hook]:
        out = []
        for layer, v in self.vectors.items():
            delta = (self.alpha * v.float()).to(model.cfg.device)

            def hook(act: Tensor, hook, delta=delta) -> Tensor:
                sl = state.select(self.policy, act.shape[1])
                if sl is not None:
                    act[:, sl] = act[:, sl] + delta.to(act.dtype)
                return act

            out.append((hook_name("resid_post", layer), hook))
        return out

    @property
    def sites(self) -> tuple[Site, ...]:
        return tuple(Site("resid_post", layer) for layer in self.vectors)

    def scaled(self, alpha: float) -> "AddVectors":
        return replace(self, alpha=alpha)

    def random_control(self, seed: int = 0, model: HookedTransformer | None = None) -> "AddVectors":
        """Random vectors of the same norm at the same layers (layer ``l`` seeded ``seed + l``)."""
        return replace(self, vectors={l: random_like(v, seed + l) for l, v in self.vectors.items()})


def _check_heads(
    model: HookedTransformer, heads: tuple[tuple[int, int], ...], kind: str, alpha: float, policy: str
) -> None:
    """The checks every head intervention shares: alpha, policy, and each (layer, head) in range."""
    check_alpha(alpha)
    check_policy(policy)
    if not heads:
        raise SteeringError(f"{kind} needs at least one head")
    for layer, head in heads:
        check_layer(model, layer)
        if not 0 <= head < model.cfg.n_heads:
            raise SteeringError(f"head {head} out of range: {model.cfg.n_heads} heads per layer")


def _head_sites(heads: tuple[tuple[int, int], ...], positions: str = "all") -> tuple[Site, ...]:
    return tuple(Site("z", layer, head, positions) for layer, head in heads)


def _z_hooks(model: HookedTransformer, heads: tuple[tuple[int, int], ...], per_head: Tensor, edit) -> list[Hook]:
    """One ``hook_z`` hook per layer; ``edit(z, heads_of_layer, rows_of_per_head)`` changes ``z`` in place."""
    by_layer: dict[int, list[int]] = {}
    for i, (layer, _) in enumerate(heads):
        by_layer.setdefault(layer, []).append(i)
    out = []
    for layer, rows in by_layer.items():
        idx = torch.tensor([heads[i][1] for i in rows], device=model.cfg.device)

        def hook(z: Tensor, hook, idx=idx, vals=per_head[rows]) -> Tensor:
            edit(z, idx, vals.to(z.dtype))
            return z

        out.append((hook_name("z", layer), hook))
    return out


@dataclass(frozen=True)
class HeadShift:
    """ITI: shift head ``heads[i] = (l, h)``'s ``hook_z`` by ``alpha * sigmas[i] * units[i]``."""

    heads: tuple[tuple[int, int], ...]
    units: Float[Tensor, "k d_head"]  # unit directions in each head's z-space (honest -> lying)
    sigmas: Float[Tensor, " k"]  # std of training activations projected on each unit direction
    alpha: float
    policy: str = "all"  # one of POLICIES (checked in validate, with a clear error)

    def validate(self, model: HookedTransformer) -> None:
        _check_heads(model, self.heads, "HeadShift", self.alpha, self.policy)
        if self.units.shape != (len(self.heads), model.cfg.d_head):
            raise SteeringError(
                f"units must have shape [{len(self.heads)}, {model.cfg.d_head}], got {tuple(self.units.shape)}"
            )
        if self.sigmas.shape != (len(self.heads),) or not torch.isfinite(self.sigmas).all():
            raise SteeringError(f"sigmas must be {len(self.heads)} finite numbers")

    def hooks(self, model: HookedTransformer, state: SteeringState) -> list[Hook]:
        shift = (self.alpha * self.sigmas[:, None] * self.units).float().to(model.cfg.device)

        def edit(z: Tensor, heads: Tensor, delta: Tensor) -> None:
            sl = state.select(self.policy, z.shape[1])
            if sl is not None:
                z[:, sl, heads] = z[:, sl, heads] + delta

        return _z_hooks(model, self.heads, shift, edit)

    @property
    def sites(self) -> tuple[Site, ...]:
        return _head_sites(self.heads)

    def scaled(self, alpha: float) -> "HeadShift":
        return replace(self, alpha=alpha)

    def random_control(self, seed: int = 0, model: HookedTransformer | None = None) -> "HeadShift":
        """The same heads, each shifted along a random z-direction. With ``model``, each head's write
        to the residual stream keeps its norm (:func:`random_head_shift`, the control the steering
        study uses); without it, the shift keeps its norm in z-space (``sigma`` unchanged)."""
        if model is not None:
            return random_head_shift(self, model, seed)
        units = random_like(self.units, seed)
        return replace(self, units=units / units.norm(dim=-1, keepdim=True))


@dataclass(frozen=True)
class HeadSetMean:
    """Move heads' ``hook_z`` at each pass's *final position* toward a mean: ``z += |alpha| (target - z)``,
    ``target`` the honest-run mean if ``alpha < 0`` and the lying-run mean if ``alpha > 0``.

    ``alpha = -1`` sets each head's final-position ``z`` to its mean over honest training prompts
    (mean-patching the head, as activation patching found it); ``|alpha| < 1`` interpolates. Only
    the final position of each forward pass is touched (in generation, each new token's).
    """

    heads: tuple[tuple[int, int], ...]
    honest: Float[Tensor, "k d_head"]  # mean z at the final position, honest training prompts
    lying: Float[Tensor, "k d_head"]  # the same on lying training prompts
    alpha: float
    policy: str = "all"  # one of POLICIES (checked in validate, with a clear error)

    def validate(self, model: HookedTransformer) -> None:
        _check_heads(model, self.heads, "HeadSetMean", self.alpha, self.policy)
        for name, t in (("honest", self.honest), ("lying", self.lying)):
            if t.shape != (len(self.heads), model.cfg.d_head) or not torch.isfinite(t).all():
                raise SteeringError(
                    f"{name} means must be finite with shape [{len(self.heads)}, {model.cfg.d_head}], "
                    f"got {tuple(t.shape)}"
                )

    def hooks(self, model: HookedTransformer, state: SteeringState) -> list[Hook]:
        target = (self.honest if self.alpha < 0 else self.lying).float().to(model.cfg.device)
        w = abs(self.alpha)

        def edit(z: Tensor, heads: Tensor, tgt: Tensor) -> None:
            sl = state.select(self.policy, z.shape[1], last_only=True)
            if sl is not None:
                x = z[:, sl, heads]
                z[:, sl, heads] = x + w * (tgt - x)

        return _z_hooks(model, self.heads, target, edit)

    @property
    def sites(self) -> tuple[Site, ...]:
        return _head_sites(self.heads, "final")

    def scaled(self, alpha: float) -> "HeadSetMean":
        return replace(self, alpha=alpha)

    def random_control(self, seed: int = 0, model: HookedTransformer | None = None) -> "HeadSetMean":
        """The same heads, each moved by as much as the real means are apart, in a random direction:
        with ``r`` random of norm ``|honest - lying|`` per head, the honest target becomes
        ``lying + r`` and the lying target ``honest - r``. (To draw random *heads* instead, each
        toward its own mean, use :func:`random_head_set_mean`, which needs every head's means.)"""
        r = random_like(self.honest.float() - self.lying.float(), seed)
        return replace(self, honest=self.lying.float() + r, lying=self.honest.float() - r)


def random_head_set_mean(
    shift: HeadSetMean, honest: Float[Tensor, "layer head d_head"], lying: Float[Tensor, "layer head d_head"], seed: int
) -> HeadSetMean:
    """Control: as many heads, drawn at random (seeded, without replacement), each moved toward its own mean."""
    n_layers, n_heads = honest.shape[:2]
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n_layers * n_heads, generator=g)[: len(shift.heads)].tolist()
    heads = tuple((i // n_heads, i % n_heads) for i in flat)
    pick = lambda t: torch.stack([t[l, h] for l, h in heads])  # noqa: E731
    return HeadSetMean(heads, pick(honest), pick(lying), shift.alpha, shift.policy)


@dataclass(frozen=True)
class DirectionalAblation:
    """Project ``direction`` (normalized here) out of the residual stream at every layer:
    ``x <- x - alpha (x . u) u`` (``alpha = 1``, the default, removes the component; ``2`` reflects it)."""

    direction: Float[Tensor, " d_model"]
    where: Literal["writes", "resid"] = "writes"
    policy: str = "all"  # one of POLICIES (checked in validate, with a clear error)
    alpha: float = 1.0

    def validate(self, model: HookedTransformer) -> None:
        check_alpha(self.alpha)
        check_policy(self.policy)
        check_vector(self.direction, model.cfg.d_model, "ablation direction")
        if self.direction.norm() < 1e-8:
            raise SteeringError("ablation direction has zero norm")
        if self.where not in ("writes", "resid"):
            raise SteeringError(f"where must be 'writes' or 'resid', got {self.where!r}")

    def sites_in(self, model: HookedTransformer) -> tuple[Site, ...]:
        """Where it writes in ``model`` (every block, so the model's depth is needed)."""
        n = model.cfg.n_layers
        if self.where == "writes":
            kinds = ("resid_pre", "attn_out") + (() if getattr(model.cfg, "attn_only", False) else ("mlp_out",))
            return tuple(Site(k, l) for l in range(n) for k in kinds)
        return (Site("resid_pre", 0),) + tuple(Site("resid_post", l) for l in range(n))

    @property
    def sites(self) -> tuple[Site, ...]:
        raise SitesNeedModel(
            "DirectionalAblation writes at every block: its sites depend on the model, use sites_in(model)"
        )

    def hook_names(self, model: HookedTransformer) -> list[str]:
        return [site.hook for site in self.sites_in(model)]

    def hooks(self, model: HookedTransformer, state: SteeringState) -> list[Hook]:
        u = self.direction.float() / self.direction.float().norm()
        u = u.to(model.cfg.device)

        def hook(act: Tensor, hook) -> Tensor:
            sl = state.select(self.policy, act.shape[1])
            if sl is not None:
                x = act[:, sl]
                uu = u.to(act.dtype)
                act[:, sl] = x - self.alpha * (x @ uu)[..., None] * uu
            return act

        return [(name, hook) for name in self.hook_names(model)]

    def scaled(self, alpha: float) -> "DirectionalAblation":
        return replace(self, alpha=alpha)

    def random_control(self, seed: int = 0, model: HookedTransformer | None = None) -> "DirectionalAblation":
        """A random direction (the projection normalizes it, so only its direction matters)."""
        return replace(self, direction=random_like(self.direction, seed))


# ---------------------------------------------------------------------------------------------
# building directions


def residual_directions(
    honest: Float[Tensor, "n layer d_model"], lying: Float[Tensor, "n layer d_model"], train: Sequence[int]
) -> Float[Tensor, "layer d_model"]:
    """Difference of means (honest -> lying) per layer, on the training rows only."""
    idx = torch.as_tensor(list(train), dtype=torch.long)
    if len(idx) == 0:
        raise SteeringError("no training rows to build a direction from")
    return get_fit("diff_of_means")(honest[idx], lying[idx])


@dataclass(frozen=True)
class HeadDirections:
    units: Float[Tensor, "layer head d_head"]  # unit diff-of-means direction of each head's z
    sigmas: Float[Tensor, "layer head"]  # std of pooled training projections on it
    separation: Float[Tensor, "layer head"]  # |mean gap along unit| / sigma: ranks heads

    def top(self, k: int, alpha: float, policy: Policy = "all") -> HeadShift:
        n_layers, n_heads = self.sigmas.shape
        if not 0 < k <= n_layers * n_heads:
            raise SteeringError(f"k must be in 1..{n_layers * n_heads}, got {k}")
        heads = top_k_components(self.separation, k)
        units = torch.stack([self.units[l, h] for l, h in heads])
        sigmas = torch.stack([self.sigmas[l, h] for l, h in heads])
        return HeadShift(heads, units, sigmas, alpha, policy)


def head_directions(
    honest_z: Float[Tensor, "n layer head d_head"], lying_z: Float[Tensor, "n layer head d_head"], train: Sequence[int]
) -> HeadDirections:
    """ITI's mass-mean-shift directions per head, on the training rows only.

    Heads are ranked by the standardized gap between the framings along the head's own direction
    (ITI ranks by probe accuracy; with prompts whose framings differ in text, many heads separate
    perfectly, and the standardized gap still orders them by how far apart the framings are).
    """
    idx = torch.as_tensor(list(train), dtype=torch.long)
    if len(idx) < 2:
        raise SteeringError("need at least 2 training rows for head directions")
    h, l = honest_z[idx].float(), lying_z[idx].float()
    diff = get_fit("diff_of_means")(h, l)
    units = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj = (torch.cat([h, l]) * units).sum(-1)  # [2n, L, H]
    sigmas = proj.std(0).clamp_min(1e-8)
    return HeadDirections(units, sigmas, diff.norm(dim=-1) / sigmas)


def random_like(vector: Float[Tensor, "*c d"], seed: int = 0) -> Float[Tensor, "*c d"]:
    """Gaussian directions with the same norm as ``vector`` along its last dimension (seeded).

    The one source of random control directions in mechlie's steering code.
    """
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(vector.shape, generator=g)
    return r / r.norm(dim=-1, keepdim=True) * vector.float().norm(dim=-1, keepdim=True)


def random_head_shift(shift: HeadShift, model: HookedTransformer, seed: int = 0) -> HeadShift:
    """The same heads and alpha, each moved along a random z-direction with the same *write*.

    The control matches what reaches the residual stream, ``|sigma * unit @ W_O[l, h]|`` per head,
    not the z-space norm: a random z-direction is mostly in directions ``W_O`` shrinks, so matching
    in z-space would make a control that writes less than the real shift.
    """
    units = random_like(shift.units, seed)
    units = units / units.norm(dim=-1, keepdim=True)
    w_o = torch.stack([model.W_O[l, h].detach().float().cpu() for l, h in shift.heads])  # [k, d_head, d_model]
    real = (shift.units.float()[:, None] @ w_o)[:, 0].norm(dim=-1)
    rand = (units[:, None] @ w_o)[:, 0].norm(dim=-1).clamp_min(1e-12)
    return HeadShift(shift.heads, units, shift.sigmas.float() * real / rand, shift.alpha, shift.policy)


def head_write(shift: HeadShift, model: HookedTransformer) -> Float[Tensor, " k"]:
    """Norm of each head's change to the residual stream, ``|alpha * sigma * unit @ W_O|``."""
    w_o = torch.stack([model.W_O[l, h].detach().float().cpu() for l, h in shift.heads])
    return abs(shift.alpha) * shift.sigmas.float() * (shift.units.float()[:, None] @ w_o)[:, 0].norm(dim=-1)


__all__ = [
    "AddVectors",
    "DirectionalAblation",
    "HeadDirections",
    "HeadSetMean",
    "HeadShift",
    "Intervention",
    "POLICIES",
    "SitesNeedModel",
    "SteeringError",
    "SteeringState",
    "Touch",
    "head_directions",
    "head_write",
    "positions_touched",
    "random_head_set_mean",
    "random_head_shift",
    "random_like",
    "residual_directions",
    "sites_of",
    "steer",
]
