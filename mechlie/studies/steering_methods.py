"""The steering methods: a registry where adding an intervention to the study is one class.

A *setting* (:class:`Setting`) is ``(kind, layer, alpha, param)``. ``alpha`` is signed, with one
convention everywhere: directions point honest -> lying, so ``alpha < 0`` steers toward honesty and
``alpha > 0`` toward lying. ``param`` is K heads for head kinds, or the key of a learned edit.

A :class:`Method` says, for its kind, which intervention a setting builds (``build``), its random
control of the same size (``control``; by default the intervention's own ``random_control``), and
which settings the study sweeps (``grid``, from the study's flags). Register it with
:func:`method` and the study sweeps it, chooses its setting on validation and evaluates it on test::

    @method
    class TwiceResid(Method):
        name = "twice_resid"
        def build(self, model, data, s):
            return AddVectors({s.layer: 2 * data.resid_dirs[s.layer]}, s.alpha)
        def grid(self, ctx):
            return [Setting(self.name, l, a) for l in ctx.layers for a in ctx.cfg.resid_alphas]

Built-in kinds, with their controls:

- ``resid``: ``alpha * d_l`` at ``blocks.l.hook_resid_post``, ``d_l`` the diff-of-means direction;
  control: a Gaussian direction of the same norm.
- ``iti``: the top-``K`` heads by standardized gap, shifted by ``alpha * sigma * unit`` (ITI);
  control: the same heads along random z-directions whose *write* ``|shift @ W_O|`` matches.
- ``causal``: the same head shift on the ``K`` heads that activation patching ranked highest on the
  training pairs (:func:`mechlie.causal.patching.patch_final_position`), not the probe-ranked ones.
- ``causal_mean``: the ``K`` patching-ranked heads' final-position ``z`` moved toward their
  honest-run mean (:class:`mechlie.control.steering.HeadSetMean`; ``alpha = -1`` sets it to the mean);
  control: ``K`` random heads moved toward their own means.
- ``probe_mean``: the same on ITI's probe-ranked top-``K`` heads (head choice compared at equal
  intervention).
- ``ablation``: project ``d_l`` out everywhere; control: a random direction projected out.
- ``fv``: a function vector (:func:`mechlie.studies.steering_data.attach_function_vector`); not swept
  by the study.
- ``learned`` / ``learned_kl`` / ``honest_only`` / ``lowrank`` / ``gated``: a learned edit
  (:mod:`mechlie.control.edits`) at scale ``-alpha`` of its trained size (``alpha = -1`` is the
  edit as trained); control: a random edit of the same size (for ``gated``: a random gate, ``w``
  of the same norm and the bias kept, writing a random vector of the same norm). ``learned_kl`` is
  trained on the KL-to-honest-run objective, ``honest_only`` (the honest-only control) on the
  honest prompts; ``reft`` (:class:`Reft`) is a low-rank ``resid_post`` edit trained to map lying-run
  residuals onto honest-run ones (representation level, as ReFT).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.control import edits
from mechlie.control.steering import (
    AddVectors,
    DirectionalAblation,
    HeadSetMean,
    HeadShift,
    Intervention,
    SteeringError,
    random_head_set_mean,
    random_like,
)
from mechlie.studies.steering_data import SteeringData, attach_causal_heads

log = logging.getLogger("mechlie")


@dataclass(frozen=True)
class Setting:
    kind: str
    layer: int  # -1 for kinds that span layers (head kinds, learned edits)
    alpha: float  # signed: < 0 toward honesty, > 0 toward lying
    param: str = ""  # K heads for head kinds; the edit's name for learned kinds

    def flipped(self) -> "Setting":
        return replace(self, alpha=-self.alpha)


@dataclass
class GridContext:
    """What a method's grid may read: the model, the split data (edits are added to ``data.edits``),
    the study's flags, its run folder (learned edits are saved there as stages), the sweep layers and
    the layer of the cached SAE (None: none in range)."""

    model: HookedTransformer
    data: SteeringData
    cfg: Any  # mechlie.studies.steering.Config
    run: Any  # mechlie.core.cli.RunDir
    layers: tuple[int, ...]
    sae_layer: int | None
    done: set[str] = field(default_factory=set)  # one-off setup steps already run (e.g. ranking heads)


# The order in which the study sweeps method families; learned edits (trained last) are evaluated first.
FAMILIES = ("layer", "heads", "edit")


class Method:
    """One way to steer (see the module docstring). Subclasses set ``name`` and override ``build``;
    ``control`` defaults to the built intervention's own ``random_control(seed, model)``, and
    ``grid`` (the study's sweep) to nothing."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = "layer"  # one of FAMILIES: where the study sweeps it

    def build(self, model: HookedTransformer, data: SteeringData, s: Setting) -> Intervention:
        raise NotImplementedError

    def control(self, model: HookedTransformer, data: SteeringData, s: Setting, seed: int) -> Intervention:
        """A random intervention of the same size (seeded)."""
        return self.build(model, data, s).random_control(seed, model)

    def grid(self, ctx: GridContext) -> list[Setting]:
        """The settings the study sweeps on validation for this method."""
        return []


KINDS: dict[str, Method] = {}
Kind = Method  # the registry's entries (older name)


def method(cls: type[Method]) -> type[Method]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if not cls.name or cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__} needs a name and a family in {FAMILIES}")
    KINDS[cls.name] = cls()
    return cls


Build = Callable[[HookedTransformer, SteeringData, Setting], Intervention]
Control = Callable[[HookedTransformer, SteeringData, Setting, int], Intervention]


@dataclass(frozen=True)
class _Functions(Method):
    build_fn: Build
    control_fn: Control

    def build(self, model, data, s):
        return self.build_fn(model, data, s)

    def control(self, model, data, s, seed):
        return self.control_fn(model, data, s, seed)


def register_kind(name: str, build: Build, control: Control) -> None:
    """Add a kind from two functions: ``build`` makes it from a setting, ``control`` its random
    control (for a kind the study should also sweep, subclass :class:`Method` instead)."""
    KINDS[name] = _Functions(build, control)


def intervention(
    model: HookedTransformer, data: SteeringData, setting: Setting, *, control_seed: int | None = None
) -> Intervention:
    """The intervention for ``setting``, or its random control (seeded) if ``control_seed`` is given."""
    kind = KINDS.get(setting.kind)
    if kind is None:
        raise SteeringError(f"unknown kind {setting.kind!r}; kinds: {sorted(KINDS)}")
    if control_seed is None:
        return kind.build(model, data, setting)
    return kind.control(model, data, setting, control_seed)


def layer_direction(data: SteeringData, s: Setting) -> Tensor:
    if not 0 <= s.layer < len(data.resid_dirs):
        raise SteeringError(f"layer {s.layer} out of range: {len(data.resid_dirs)} layers")
    return data.resid_dirs[s.layer]


def k_heads(s: Setting) -> int:
    try:
        return int(s.param)
    except ValueError:
        raise SteeringError(f"kind {s.kind!r} needs param = K heads, got {s.param!r}") from None


def causal_heads(data: SteeringData, s: Setting) -> tuple[tuple[int, int], ...]:
    k = k_heads(s)
    if not 0 < k <= len(data.causal_heads):
        raise SteeringError(
            f"causal kinds need 1..{len(data.causal_heads)} ranked heads (attach_causal_heads first), got K={k}"
        )
    return data.causal_heads[:k]


def parse_head(text: str) -> tuple[int, int]:
    """``"L20H5"`` -> ``(20, 5)``."""
    m = re.fullmatch(r"L(\d+)H(\d+)", text.strip())
    if not m:
        raise ValueError(f"--causal-heads takes heads like L20H5, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _rank_heads_once(ctx: GridContext) -> None:
    """Rank heads by patching on training pairs (or take ``--causal-heads``), once for all causal kinds."""
    if "causal_heads" in ctx.done:
        return
    cfg = ctx.cfg
    heads = [parse_head(h) for h in cfg.causal_heads]
    attach_causal_heads(ctx.model, ctx.data, max_pairs=cfg.causal_pairs, batch_size=cfg.batch_size, heads=heads)
    log.info("causal heads: %s", ", ".join(f"L{l}H{h}" for l, h in ctx.data.causal_heads[: max(cfg.head_ks)]))
    ctx.done.add("causal_heads")


# ---------------------------------------------------------------------------------------------
# directions at one layer


@method
class Resid(Method):
    name = "resid"

    def build(self, model, data, s):
        return AddVectors({s.layer: layer_direction(data, s)}, s.alpha)

    def control(self, model, data, s, seed):
        # Kept as it was: AddVectors.random_control seeds layer l with seed + l, other draws.
        return AddVectors({s.layer: random_like(layer_direction(data, s), seed)}, s.alpha)

    def grid(self, ctx):
        return [Setting(self.name, l, a) for l in ctx.layers for a in ctx.cfg.resid_alphas]


# ---------------------------------------------------------------------------------------------
# heads


class _HeadMethod(Method):
    family = "heads"

    def heads(self, ctx: GridContext, alphas: tuple[float, ...]) -> list[Setting]:
        return [Setting(self.name, -1, a, str(k)) for k in ctx.cfg.head_ks for a in alphas]


@method
class Iti(_HeadMethod):
    name = "iti"

    def build(self, model, data, s):
        return data.heads.top(k_heads(s), s.alpha)

    def grid(self, ctx):
        return self.heads(ctx, ctx.cfg.head_alphas)


@method
class Causal(_HeadMethod):
    name = "causal"

    def build(self, model, data, s):
        heads = causal_heads(data, s)
        units = torch.stack([data.heads.units[l, h] for l, h in heads])
        sigmas = torch.stack([data.heads.sigmas[l, h] for l, h in heads])
        return HeadShift(heads, units, sigmas, s.alpha)

    def grid(self, ctx):
        _rank_heads_once(ctx)
        return self.heads(ctx, ctx.cfg.head_alphas)


class _MeanMethod(_HeadMethod):
    def chosen_heads(self, data: SteeringData, s: Setting) -> tuple[tuple[int, int], ...]:
        raise NotImplementedError

    def build(self, model, data, s):
        heads = self.chosen_heads(data, s)
        if data.head_means is None:
            raise SteeringError("no head means kept (prepare() keeps them)")
        hm, lm = data.head_means
        pick = lambda t: torch.stack([t[l, h] for l, h in heads])  # noqa: E731
        return HeadSetMean(heads, pick(hm), pick(lm), s.alpha)

    def control(self, model, data, s, seed):
        # Kept: random heads need every head's means, which a HeadSetMean does not hold.
        iv = self.build(model, data, s)
        return random_head_set_mean(iv, data.head_means[0], data.head_means[1], seed)

    def grid(self, ctx):
        return self.heads(ctx, ctx.cfg.mean_alphas)


@method
class CausalMean(_MeanMethod):
    name = "causal_mean"

    def chosen_heads(self, data, s):
        return causal_heads(data, s)

    def grid(self, ctx):
        _rank_heads_once(ctx)
        return super().grid(ctx)


@method
class ProbeMean(_MeanMethod):
    name = "probe_mean"

    def chosen_heads(self, data, s):
        return data.heads.top(k_heads(s), s.alpha).heads


# ---------------------------------------------------------------------------------------------
# more directions at one layer


@method
class Ablation(Method):
    name = "ablation"

    def build(self, model, data, s):
        return self._ablation(layer_direction(data, s), s)

    @staticmethod
    def _ablation(v: Tensor, s: Setting) -> Intervention:
        # alpha only says whether it is applied: ablation has no strength.
        return DirectionalAblation(v) if s.alpha != 0 else AddVectors({s.layer: v}, 0.0)

    def grid(self, ctx):
        return [Setting(self.name, l, -1.0) for l in ctx.layers]


@method
class FunctionVector(Method):
    name = "fv"

    def build(self, model, data, s):
        return AddVectors({self._layer(data): data.fv}, s.alpha)

    def control(self, model, data, s, seed):
        # Kept, as for resid: AddVectors.random_control seeds by layer.
        return AddVectors({self._layer(data): random_like(data.fv, seed)}, s.alpha)

    @staticmethod
    def _layer(data: SteeringData) -> int:
        if data.fv is None or data.fv_layer is None:
            raise SteeringError("no function vector attached")
        return data.fv_layer


# ---------------------------------------------------------------------------------------------
# learned edits (mechlie.control.edits), trained on the training facts and saved as run stages


class _EditMethod(Method):
    family = "edit"

    def build(self, model, data, s):
        if s.param not in data.edits:
            raise SteeringError(f"no learned edit named {s.param!r}; edits: {sorted(data.edits)}")
        return data.edits[s.param].scaled(s.alpha)

    def control(self, model, data, s, seed):
        return self.build(model, data, s).random_control(seed)  # an edit's control needs no model

    @staticmethod
    def train_config(ctx: GridContext, budget: float, **kw) -> edits.TrainConfig:
        c = ctx.cfg
        return edits.TrainConfig(kl_budget=budget, steps=c.edit_steps, max_pairs=c.edit_pairs, seed=c.seed, **kw)

    def staged(self, ctx: GridContext, name: str, train: Callable[[], Intervention]) -> list[Setting]:
        """Train (or reload) the edit ``name`` and sweep its scales."""
        file = f"{name.replace('/', '_')}.safetensors"
        ctx.data.edits[name] = ctx.run.stage(file, train, edits.save_edit, edits.load_edit)
        return [Setting(self.name, -1, a, name) for a in ctx.cfg.edit_scales]


@method
class Learned(_EditMethod):
    name = "learned"

    def grid(self, ctx):
        m, d, out = ctx.model, ctx.data, []
        for b in ctx.cfg.edit_budgets:
            tc = self.train_config(ctx, b)
            out += self.staged(
                ctx, f"learned@{b:g}", lambda: edits.train_vector(m, d.train, d.neutral_train, list(ctx.layers), tc)
            )
            if ctx.sae_layer is not None and ctx.sae_layer not in ctx.layers:
                # the same edit at the SAE's layer: its direction can be compared with the decoder rows
                at = [ctx.sae_layer]
                out += self.staged(
                    ctx,
                    f"learned@{b:g}/L{ctx.sae_layer}",
                    lambda: edits.train_vector(m, d.train, d.neutral_train, at, tc),
                )
        return out


@method
class LearnedKL(_EditMethod):
    """A learned vector at the same layers trained on the ``"honest_kl"`` objective
    (:data:`mechlie.control.edit_training.OBJECTIVES`): the edited lying run is pulled onto the honest
    run's next-token distribution, rewarding honest behaviour rather than the training answers."""

    name = "learned_kl"

    def grid(self, ctx):
        m, d, out = ctx.model, ctx.data, []
        for b in ctx.cfg.edit_budgets:
            tc = self.train_config(ctx, b, objective="honest_kl")
            train = lambda: edits.train_vector(m, d.train, d.neutral_train, list(ctx.layers), tc)  # noqa: E731
            out += self.staged(ctx, f"learned_kl@{b:g}", train)
        return out


@method
class HonestOnly(_EditMethod):
    """The honest-only control: a learned vector at the same layers trained to raise P(truth) on the
    *honest* prompts only. It has never seen a lie, so what it recovers on lying prompts is
    sharpening of answers, not honesty; a method is about honesty only where it beats this control."""

    name = "honest_only"

    def grid(self, ctx):
        m, d, out = ctx.model, ctx.data, []
        for b in ctx.cfg.edit_budgets:
            tc = self.train_config(ctx, b, prompts="honest")
            train = lambda: edits.train_vector(m, d.train, d.neutral_train, list(ctx.layers), tc)  # noqa: E731
            out += self.staged(ctx, f"honest_only@{b:g}", train)
        return out


@method
class LowRank(_EditMethod):
    name = "lowrank"

    def grid(self, ctx):
        c, m, d, out = ctx.cfg, ctx.model, ctx.data, []
        mid = ctx.layers[len(ctx.layers) // 2]
        for b in c.edit_budgets:
            tc = self.train_config(ctx, b)
            train = lambda: edits.train_lowrank(  # noqa: E731
                m, d.train, d.neutral_train, mid, tc, component=c.lowrank_component, rank=c.lowrank_rank
            )
            out += self.staged(ctx, f"lowrank@{b:g}", train)
        return out


@method
class Reft(_EditMethod):
    """A representation-level edit (ReFT-like): a rank-``--reft-rank`` affine edit of ``resid_post`` at
    the deepest sweep layer, trained on the ``"honest_resid"`` objective
    (:data:`mechlie.control.edit_training.OBJECTIVES`): each training fact's lying-run residual there is
    mapped onto its honest run's, with no answer token in the loss (LoReFT without R's orthonormality)."""

    name = "reft"

    def grid(self, ctx):
        c, m, d, out = ctx.cfg, ctx.model, ctx.data, []
        at = max(ctx.layers)
        for b in c.edit_budgets:
            tc = self.train_config(ctx, b, objective="honest_resid")
            train = lambda: edits.train_lowrank(  # noqa: E731
                m, d.train, d.neutral_train, at, tc, component="resid_post", rank=c.reft_rank
            )
            out += self.staged(ctx, f"reft@{b:g}", train)
        return out


@method
class Gated(_EditMethod):
    name = "gated"

    def grid(self, ctx):
        m, d, out = ctx.model, ctx.data, []
        sae = {ctx.sae_layer} if ctx.sae_layer is not None else set()
        # Default: the deepest sweep layer (and the SAE's), one gated edit per layer and budget.
        for l in ctx.cfg.gated_layers or sorted({max(ctx.layers)} | sae):
            for b in ctx.cfg.edit_budgets:
                tc = self.train_config(ctx, b)
                out += self.staged(
                    ctx, f"gated@{b:g}/L{l}", lambda: edits.train_gated(m, d.train, d.neutral_train, l, tc)
                )
        return out


def study_grid(ctx: GridContext, methods: tuple[str, ...]) -> dict[str, list[Setting]]:
    """Each requested method's sweep, method families in :data:`FAMILIES` order."""
    names = list(KINDS)
    order = sorted(set(methods), key=lambda m: (FAMILIES.index(KINDS[m].family), names.index(m)))
    return {m: KINDS[m].grid(ctx) for m in order}


def study_methods() -> tuple[str, ...]:
    """The kinds the study sweeps (those whose class overrides ``grid``), in registration order."""
    return tuple(n for n, k in KINDS.items() if type(k).grid is not Method.grid)


__all__ = [
    "FAMILIES",
    "KINDS",
    "GridContext",
    "Kind",
    "Method",
    "Setting",
    "causal_heads",
    "intervention",
    "k_heads",
    "layer_direction",
    "method",
    "parse_head",
    "register_kind",
    "study_grid",
    "study_methods",
]
