"""The learned edits themselves: interventions whose parameters :mod:`mechlie.control.edit_training`
learns, with their controls, their alignment with other directions, and saving.

- :class:`LearnedVector`: a vector ``v_l`` per chosen layer, added at ``blocks.l.hook_resid_post``
  as ``x += alpha * v_l`` (all positions).
- :class:`LowRankEdit`: a rank-``r`` affine edit of one component's output ``y`` (``attn_out``,
  ``mlp_out`` or ``resid_post`` of block ``l``): ``y += -alpha * (y @ A + c) @ B``, with
  ``A: [d_model, r]``, ``c: [r]``, ``B: [r, d_model]``.
- :class:`GatedVector`: ``x += alpha * sigmoid(u @ w + b) * v`` at ``blocks.l.hook_resid_post``,
  ``u = x / rms(x)``: a vector written where a learned linear gate fires.

Each is a :class:`mechlie.core.hooks.Intervention` with ``scaled(alpha)``, ``random_control(seed)``
and ``sites``. Sign convention: a stored edit points honest -> lying, and ``alpha = -1`` is the
edit as trained (toward honesty). An edit records the model it was trained on
(:func:`mechlie.core.models.model_id`) and refuses another one. The overview and the training
objective are in :mod:`mechlie.control.edits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.control.steering import AddVectors, random_like
from mechlie.core.hooks import (
    Hook,
    Site,
    SteeringError,
    SteeringState,
    check_alpha,
    check_layer,
    check_policy,
)
from mechlie.core.models import model_id as weights_id

Component = Literal["attn_out", "mlp_out", "resid_post"]
COMPONENTS: tuple[str, ...] = ("attn_out", "mlp_out", "resid_post")


def check_trained_for(model: HookedTransformer, edit) -> None:
    """Raise :class:`SteeringError` unless ``edit`` was trained on ``model``: the same width, and the
    same weights (:func:`mechlie.core.models.model_id`; an edit saved without an id, by an older
    version, is checked by the model's name instead), then its alpha, policy and layer(s)."""
    if edit.d_model != model.cfg.d_model:
        raise SteeringError(
            f"edit was trained for width d_model={edit.d_model} ({edit.model_name!r}); "
            f"this model has d_model={model.cfg.d_model} ({model.cfg.model_name!r})"
        )
    if edit.model_id:
        if edit.model_id != weights_id(model):
            raise SteeringError(
                f"edit was trained on model {edit.model_name!r} (weights {edit.model_id}), not on "
                f"{model.cfg.model_name!r} (weights {weights_id(model)})"
            )
    elif edit.model_name and edit.model_name != model.cfg.model_name:
        raise SteeringError(f"edit was trained on model {edit.model_name!r}, not on {model.cfg.model_name!r}")
    check_alpha(edit.alpha)
    check_policy(edit.policy)
    for site in edit.sites:
        check_layer(model, site.layer)


def soft_gate(x: Float[Tensor, "... d_model"], w: Tensor, b: float | Tensor) -> Float[Tensor, "..."]:
    """The gate of :class:`GatedVector`: ``sigmoid(u @ w + b)``, ``u = x / rms(x)``."""
    u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return torch.sigmoid(u @ w + b)


# ---------------------------------------------------------------------------------------------
# the edits (interventions)

_E = TypeVar("_E", bound="TrainedEdit")


@dataclass(frozen=True, kw_only=True)
class TrainedEdit:
    """What every learned edit keeps beside its parameters: how it is applied, its training record and
    the model it was trained on (:func:`check_trained_for`). Keyword-only, so that each edit's own
    fields (parameters, then ``model_name`` and ``d_model``) keep their positions in its constructor."""

    alpha: float = -1.0
    policy: str = "all"  # one of POLICIES (checked in validate, with a clear error)
    info: dict = field(default_factory=dict, compare=False)  # training record (lam, KL, seconds, ...)
    model_id: str = ""  # mechlie.core.models.model_id of the model it was trained on ("" = unknown)

    def scaled(self: _E, alpha: float) -> _E:
        return replace(self, alpha=alpha)


@dataclass(frozen=True)
class LearnedVector(TrainedEdit):
    """Learned steering vectors (honest -> lying) per layer; ``alpha = -1`` applies them as trained."""

    vectors: dict[int, Float[Tensor, " d_model"]]
    model_name: str
    d_model: int

    def _inner(self) -> AddVectors:
        return AddVectors(self.vectors, self.alpha, self.policy)

    def validate(self, model: HookedTransformer) -> None:
        check_trained_for(model, self)
        self._inner().validate(model)

    def hooks(self, model: HookedTransformer, state: SteeringState) -> list[Hook]:
        return self._inner().hooks(model, state)

    @property
    def sites(self) -> tuple[Site, ...]:
        return self._inner().sites

    def random_control(self, seed: int = 0, model: HookedTransformer | None = None) -> "LearnedVector":
        """Random vectors of the same norm at the same layers."""
        return replace(self, vectors=self._inner().random_control(seed).vectors, info={"control_seed": seed})

    def direction(self, layer: int) -> Float[Tensor, " d_model"]:
        return self.vectors[layer]


@dataclass(frozen=True)
class LowRankEdit(TrainedEdit):
    """Rank-``r`` affine edit of a component's output: ``y += -alpha * (y @ A + c) @ B``."""

    layer: int
    component: str
    A: Float[Tensor, "d_model rank"]
    c: Float[Tensor, " rank"]
    B: Float[Tensor, "rank d_model"]
    model_name: str
    d_model: int

    @property
    def sites(self) -> tuple[Site, ...]:
        if self.component not in COMPONENTS:
            raise SteeringError(f"component must be one of {COMPONENTS}, got {self.component!r}")
        return (Site(self.component, self.layer),)

    @property
    def hook_name(self) -> str:
        return self.sites[0].hook

    def validate(self, model: HookedTransformer) -> None:
        check_trained_for(model, self)
        if self.component == "mlp_out" and getattr(model.cfg, "attn_only", False):
            raise SteeringError("an attention-only model has no mlp_out")
        r = self.c.shape[0]
        if self.A.shape != (model.cfg.d_model, r) or self.B.shape != (r, model.cfg.d_model):
            raise SteeringError(
                f"A, c, B must be [{model.cfg.d_model}, r], [r], [r, {model.cfg.d_model}]; "
                f"got {tuple(self.A.shape)}, {tuple(self.c.shape)}, {tuple(self.B.shape)}"
            )

    def hooks(self, model: HookedTransformer, state: SteeringState) -> list[Hook]:
        dev = model.cfg.device
        A, c, B = (t.float().to(dev) for t in (self.A, self.c, self.B))

        def hook(y: Tensor, hook) -> Tensor:
            sl = state.select(self.policy, y.shape[1])
            if sl is not None:
                x = y[:, sl]
                y[:, sl] = x - self.alpha * ((x.float() @ A + c) @ B).to(y.dtype)
            return y

        return [(self.hook_name, hook)]

    def random_control(self, seed: int = 0, model: HookedTransformer | None = None) -> "LowRankEdit":
        """Random A, c and B with the same Frobenius norms (the same size of edit)."""
        rnd = lambda t, s: random_like(t.flatten(), seed + s).reshape(t.shape)  # noqa: E731
        return replace(self, A=rnd(self.A, 1), c=rnd(self.c, 2), B=rnd(self.B, 3), info={"control_seed": seed})

    def direction(self, layer: int | None = None) -> Float[Tensor, " d_model"]:
        """Its mean write on the training lying prompts' final position, negated (honest -> lying)."""
        if "mean_write" not in self.info:
            raise SteeringError("this edit has no recorded mean write (it was not trained by train_lowrank)")
        return -self.info["mean_write"]


@dataclass(frozen=True)
class GatedVector(TrainedEdit):
    """A vector written where a learned gate fires: ``x += alpha * sigmoid(u @ w + b) * v`` at
    ``blocks.{layer}.hook_resid_post``, ``u = x / rms(x)``. ``v`` points honest -> lying (as stored
    by every edit here), so ``alpha = -1`` applies it as trained."""

    layer: int
    v: Float[Tensor, " d_model"]
    w: Float[Tensor, " d_model"]
    b: float
    model_name: str
    d_model: int

    @property
    def sites(self) -> tuple[Site, ...]:
        return (Site("resid_post", self.layer),)

    @property
    def hook_name(self) -> str:
        return self.sites[0].hook

    def validate(self, model: HookedTransformer) -> None:
        check_trained_for(model, self)
        for name, t in (("v", self.v), ("w", self.w)):
            if t.shape != (model.cfg.d_model,):
                raise SteeringError(f"{name} must have shape [{model.cfg.d_model}], got {tuple(t.shape)}")
        if not math.isfinite(self.b):
            raise SteeringError(f"the gate's bias must be finite, got {self.b!r}")

    def hooks(self, model: HookedTransformer, state: SteeringState) -> list[Hook]:
        dev = model.cfg.device
        v, w = self.v.float().to(dev), self.w.float().to(dev)

        def hook(x: Tensor, hook) -> Tensor:
            sl = state.select(self.policy, x.shape[1])
            if sl is not None:
                xs = x[:, sl]
                x[:, sl] = xs + self.alpha * (soft_gate(xs.float(), w, self.b)[..., None] * v).to(x.dtype)
            return x

        return [(self.hook_name, hook)]

    def gate(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        """The gate's opening (0..1) on residual vectors ``x`` at this edit's hook."""
        return soft_gate(x.float(), self.w.float().to(x.device), self.b)

    def random_control(
        self, seed: int = 0, model: HookedTransformer | None = None, *, keep_gate: bool = False
    ) -> "GatedVector":
        """A random gate and a random write: ``v`` and ``w`` random of the same norms, the bias kept
        (so the gate's logits keep their scale; it opens at unrelated places). ``keep_gate=True``:
        the learned gate writing a random ``v`` (does the direction matter, beyond where it is written)."""
        w = self.w if keep_gate else random_like(self.w, seed + 1)
        return replace(self, v=random_like(self.v, seed), w=w, info={"control_seed": seed})

    def direction(self, layer: int | None = None) -> Float[Tensor, " d_model"]:
        return self.v


Edit = LearnedVector | LowRankEdit | GatedVector


def alignment(
    edit: Edit, references: dict[str, Float[Tensor, " d_model"]], layer: int | None = None
) -> dict[str, float]:
    """Cosine of the edit's honest -> lying direction with each reference direction (e.g. the
    difference of means at the same layer, a probe's weight, an SAE feature's decoder row)."""
    layer = layer if layer is not None else (min(edit.vectors) if isinstance(edit, LearnedVector) else edit.layer)
    d = edit.direction(layer).float()
    return {
        k: float(torch.nn.functional.cosine_similarity(d, v.float().flatten(), dim=0)) for k, v in references.items()
    }


def row_alignment(
    direction: Float[Tensor, " d_model"], rows: Float[Tensor, "n_rows d_model"], *, n_null: int = 200, seed: int = 0
) -> dict:
    """How well ``direction`` lines up with the best of many candidate directions (e.g. an SAE's
    decoder rows): the largest ``|cos|`` over ``rows``, against the null of that *maximum* for
    ``n_null`` random Gaussian directions (a single random cosine is ~``1/sqrt(d)``, the max over
    thousands of rows is several times larger)."""
    unit = lambda t: t.float() / t.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    r = unit(rows)
    cos = r @ unit(direction.flatten())
    g = torch.Generator().manual_seed(seed)
    null = (unit(torch.randn(n_null, r.shape[1], generator=g)) @ r.T).abs().amax(-1)
    best = int(cos.abs().argmax())
    return {
        "max_abs_cos": float(cos.abs().max()),
        "row": best,
        "cos": float(cos[best]),
        "null_max_mean": float(null.mean()),
        "null_max_q95": float(null.quantile(0.95)),
        "share_null_at_least": float((null >= cos.abs().max()).float().mean()),
        "n_rows": int(r.shape[0]),
        "n_null": n_null,
    }


# saving (safetensors + JSON metadata, atomic)


def save_edit(path, edit: Edit):
    """Write ``edit`` (tensors and its training record) atomically with :func:`mechlie.core.io.save_tensors`."""
    from mechlie.core.io import save_tensors

    info = {k: v for k, v in edit.info.items() if not isinstance(v, Tensor)}
    extra = {k: v for k, v in edit.info.items() if isinstance(v, Tensor)}
    meta = {
        "model_name": edit.model_name,
        "model_id": edit.model_id,
        "d_model": edit.d_model,
        "alpha": edit.alpha,
        "policy": edit.policy,
        "info": info,
    }
    if isinstance(edit, LearnedVector):
        tensors = {"vectors": {str(l): v for l, v in edit.vectors.items()}}
        meta["type"] = "learned"
    elif isinstance(edit, GatedVector):
        tensors = {"v": edit.v, "w": edit.w}
        meta |= {"type": "gated", "layer": edit.layer, "b": edit.b}
    else:
        tensors = {"A": edit.A, "c": edit.c, "B": edit.B}
        meta |= {"type": "lowrank", "layer": edit.layer, "component": edit.component}
    if extra:  # safetensors cannot store an empty group
        tensors["info"] = extra
    return save_tensors(path, tensors, meta)


def load_edit(path) -> Edit:
    """Read an edit written by :func:`save_edit`."""
    from mechlie.core.io import load_tensors

    t, meta = load_tensors(path)
    keys = ("type", "info", "model_name", "d_model", "alpha", "policy")
    if not isinstance(meta, dict) or any(k not in meta for k in keys):
        what = (
            "a saved detector (load it with mechlie.read.detector.Detector.load)"
            if isinstance(meta, dict) and "mechlie_detector" in meta
            else f"a mechlie result file whose metadata has keys {sorted(meta)[:8]}"
            if isinstance(meta, dict)
            else "a mechlie result file without edit metadata"
        )
        raise SteeringError(f"{path} is not a saved edit (save_edit writes those): it is {what}")
    info = dict(meta["info"]) | dict(t.get("info", {}))
    common = dict(
        model_name=meta["model_name"],
        d_model=meta["d_model"],
        alpha=meta["alpha"],
        policy=meta["policy"],
        info=info,
        model_id=meta.get("model_id", ""),  # files written before model ids: checked by name
    )
    if meta["type"] == "learned":
        return LearnedVector({int(l): v for l, v in t["vectors"].items()}, **common)
    if meta["type"] == "gated":
        return GatedVector(meta["layer"], t["v"], t["w"], float(meta["b"]), **common)
    return LowRankEdit(meta["layer"], meta["component"], t["A"], t["c"], t["B"], **common)


__all__ = [
    "COMPONENTS",
    "Component",
    "Edit",
    "GatedVector",
    "LearnedVector",
    "LowRankEdit",
    "TrainedEdit",
    "alignment",
    "check_trained_for",
    "load_edit",
    "row_alignment",
    "save_edit",
    "soft_gate",
]
