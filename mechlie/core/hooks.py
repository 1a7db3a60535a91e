"""Where a model is hooked, and the one context manager that hooks it.

Everything that changes a forward pass (steering, ablation, learned edits, SAE clamps, the
generator's position policies) goes through :func:`steer`, which removes its hooks in a
``finally``. This module is the lowest layer of that machinery: the :class:`Intervention`
protocol, the :class:`SteeringState` hooks read (which pass is running, which positions a policy
touches, and a log of every position touched), the shared checks (``check_alpha``,
``check_policy``, ``check_layer``, ``check_vector``) and :func:`steer`. Concrete interventions live
in :mod:`mechlie.control`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

Hook = tuple[str, Callable[..., Tensor | None]]

Policy = Literal["all", "prompt", "generated"]
POLICIES: tuple[str, ...] = ("all", "prompt", "generated")
Phase = Literal["prompt", "generated"]


class SteeringError(ValueError):
    """An intervention that cannot be applied to this model (bad shape, layer, alpha, policy)."""


@dataclass(frozen=True)
class Touch:
    step: int  # 0 = the prompt pass; k >= 1 = the pass that feeds generated token k
    phase: str
    policy: str
    positions: tuple[int, ...]


@dataclass
class SteeringState:
    """What kind of forward pass is running; hooks read it, the generator writes it."""

    phase: str = "prompt"
    step: int = 0
    start: int = 0  # absolute position of this pass's first sequence index
    log: list[Touch] = field(default_factory=list)
    _logged: set = field(default_factory=set, repr=False)

    def begin_forward(self, phase: Phase, step: int, start: int) -> None:
        if phase not in ("prompt", "generated"):
            raise SteeringError(f"phase must be 'prompt' or 'generated', got {phase!r}")
        self.phase, self.step, self.start = phase, step, start

    def select(self, policy: str, seq_len: int, *, last_only: bool = False) -> slice | None:
        """The slice of this pass's positions that ``policy`` touches (None: touch nothing);
        ``last_only``: only the pass's final position (what a final-position intervention touches)."""
        if policy != "all" and policy != self.phase:
            return None
        key = (self.step, self.phase, policy, last_only)
        first = seq_len - 1 if last_only else 0
        if key not in self._logged:  # one record per pass, not one per hook
            self._logged.add(key)
            self.log.append(
                Touch(self.step, self.phase, policy, tuple(range(self.start + first, self.start + seq_len)))
            )
        return slice(first, seq_len)


# ---------------------------------------------------------------------------------------------
# the protocol


@runtime_checkable
class Intervention(Protocol):
    """What :func:`steer` applies: anything with these two methods (no base class needed)."""

    def validate(self, model: HookedTransformer) -> None:
        """Raise :class:`SteeringError` if this intervention cannot be applied to ``model``."""
        ...

    def hooks(self, model: HookedTransformer, state: SteeringState) -> list[Hook]:
        """Forward hooks ``(hook_name, fn(activation, hook) -> activation)``; ``fn`` may read
        ``state.select(policy, seq_len)`` to honour a position policy."""
        ...


# ---------------------------------------------------------------------------------------------
# validation


def check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise SteeringError(f"alpha must be a finite number, got {alpha!r}")


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise SteeringError(f"unknown position policy {policy!r}; policies: {POLICIES}")


def check_layer(model: HookedTransformer, layer: int) -> None:
    if not isinstance(layer, int) or not 0 <= layer < model.cfg.n_layers:
        raise SteeringError(
            f"layer {layer!r} out of range: the model has {model.cfg.n_layers} layers (0..{model.cfg.n_layers - 1})"
        )


def check_vector(v: Tensor, dim: int, what: str) -> None:
    if v.ndim != 1 or v.shape[0] != dim:
        raise SteeringError(f"{what} must have shape [{dim}], got {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise SteeringError(f"{what} has non-finite entries")


@contextmanager
def steer(
    model: HookedTransformer, *interventions: Intervention, state: SteeringState | None = None
) -> Iterator[SteeringState]:
    """Apply ``interventions`` inside the block; the hooks are removed on exit, even on error.

    Args:
        model: the model to hook.
        interventions: any objects implementing :class:`Intervention` (built-in or your own).
        state: an existing :class:`SteeringState` to share (e.g. with a generator); default: new.

    Returns:
        A context manager yielding the :class:`SteeringState` the hooks read (and log to). With no
        interventions it is a no-op context (handy for baselines).

    Example:
        >>> with steer(model, AddVectors({12: direction}, alpha=-1.0)):  # doctest: +SKIP
        ...     logits = model(tokens)
    """
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise SteeringError(
                f"{type(iv).__name__} is not an Intervention: it needs validate(model) and hooks(model, state)"
            )
        iv.validate(model)
    state = state if state is not None else SteeringState()
    fwd_hooks = [h for iv in interventions for h in iv.hooks(model, state)]
    # TransformerLens's context removes exactly these hooks (its context level) in a finally, so
    # hooks added by an enclosing context survive and an exception never leaves ours behind.
    with model.hooks(fwd_hooks=fwd_hooks):
        yield state


def positions_touched(state: SteeringState) -> list[tuple[int, tuple[int, ...]]]:
    """``(step, positions)`` for every pass in which a hook touched something."""
    return [(t.step, t.positions) for t in state.log]


# ---------------------------------------------------------------------------------------------
# where: one place names every hook point (pyvene's "representation" idea: where is not what)

HEAD_KINDS: tuple[str, ...] = ("z", "head_out")
LAYER_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")
KINDS: tuple[str, ...] = HEAD_KINDS + LAYER_KINDS
HOOK_POINTS: dict[str, str] = {
    "z": "attn.hook_z",
    "head_out": "attn.hook_z",  # a head's write is computed from z @ W_O (no use_attn_result)
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
}


def hook_name(kind: str, layer: int) -> str:
    """The TransformerLens hook name of activation ``kind`` in block ``layer`` (the only place
    mechlie spells one: ``hook_name("resid_post", 12) == "blocks.12.hook_resid_post"``)."""
    if kind not in HOOK_POINTS:
        raise SteeringError(f"unknown activation kind {kind!r}; kinds: {KINDS}")
    return f"blocks.{layer}.{HOOK_POINTS[kind]}"


@dataclass(frozen=True)
class Site:
    """Where something reads or writes: an activation ``kind`` in block ``layer``, optionally one
    ``head`` (for ``z`` / ``head_out``), at ``positions`` (``"all"``, ``"final"`` or offsets from the
    end of each prompt, ``-1`` = the final prompt token). Interventions, patches, probes and SAEs
    name their place with a Site and say separately what they do there."""

    kind: str
    layer: int
    head: int | None = None
    positions: str | tuple[int, ...] = "all"

    def __post_init__(self) -> None:
        if self.kind not in HOOK_POINTS:
            raise SteeringError(f"unknown site kind {self.kind!r}; kinds: {KINDS}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise SteeringError(f"site layer must be a block index >= 0, got {self.layer!r}")
        if (self.head is not None) != (self.kind in HEAD_KINDS):
            raise SteeringError(f"site kind {self.kind!r} {'needs' if self.kind in HEAD_KINDS else 'takes no'} head")
        if isinstance(self.positions, str) and self.positions not in ("all", "final"):
            raise SteeringError(f"site positions must be 'all', 'final' or offsets, got {self.positions!r}")

    @property
    def hook(self) -> str:
        return hook_name(self.kind, self.layer)

    def check(self, model: HookedTransformer) -> None:
        """Raise :class:`SteeringError` if this site does not exist in ``model``."""
        check_layer(model, self.layer)
        if self.head is not None and not 0 <= self.head < model.cfg.n_heads:
            raise SteeringError(f"head {self.head} out of range: the model has {model.cfg.n_heads} heads")

    def __str__(self) -> str:
        head = f"H{self.head}" if self.head is not None else ""
        return f"{self.kind}@L{self.layer}{head}"
