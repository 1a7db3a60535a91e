"""The effect scale of the patching family, and the ranking of components by it, written once.

**Normalized effect.** A patching result holds, per pair, a score of the patched run for every
component (``p_truth`` or ``logit_diff``, ``[n, *c]``) and the two unpatched runs' scores (``[n]``).
Its effect is normalized over the *pair means* (:func:`mechlie.core.stats.normalized_effect`):

    ``effect = (mean(m_patched) - mean(m_lo)) / (mean(m_hi) - mean(m_lo))``

so 0 is the run that was patched into (the "lo" baseline, e.g. the lying run) and 1 the run the
activations came from (the "hi" baseline, e.g. the honest run). Normalizing the means, not each
pair, keeps pairs with a tiny gap from dominating. :func:`normalized_effect_ci` bootstraps it over
pairs (percentile intervals, every component from the same resamples, so ranks are comparable).

:class:`EffectResult` gives any result dataclass ``effect`` and ``effect_ci`` from two class
attributes naming its baselines. :func:`top_k_components` (defined in :mod:`mechlie.core.stats`,
re-exported) ranks components of any grid (``[layer]`` or ``[layer, head]``) by a score, NaNs last.
"""

from __future__ import annotations

from typing import ClassVar

from jaxtyping import Float, Int
from torch import Tensor

from mechlie.core.stats import TensorEstimate, bootstrap_tensor, normalized_effect, top_k_components

__all__ = ["EffectResult", "normalized_effect_ci", "normalized_mean_effect", "top_k_components"]


def normalized_mean_effect(
    patched: Float[Tensor, " n *c"],
    lo: Float[Tensor, " n"],
    hi: Float[Tensor, " n"],
    idx: Int[Tensor, " m"] | None = None,
) -> Float[Tensor, "*c"]:
    """``(mean(patched) - mean(lo)) / (mean(hi) - mean(lo))`` over the pairs ``idx`` (default: all)."""
    sel = slice(None) if idx is None else idx
    return normalized_effect(patched[sel].mean(0), lo[sel].mean(), hi[sel].mean())


def normalized_effect_ci(
    patched: Float[Tensor, " n *c"],
    lo: Float[Tensor, " n"],
    hi: Float[Tensor, " n"],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    batched: bool = True,
) -> TensorEstimate:
    """:func:`normalized_mean_effect` of every component with a 95% percentile bootstrap CI over
    pairs (the same resamples for every component). ``batched`` evaluates 100 resamples per call;
    ``batched=False`` one at a time (the same resamples and, as measured, the same numbers)."""
    if not batched:
        return bootstrap_tensor(
            lambda i: normalized_mean_effect(patched, lo, hi, i), len(patched), n_boot=n_boot, seed=seed
        )
    extra = (1,) * (patched.ndim - 1)

    def effects(idx: Tensor) -> Tensor:  # idx [b, n]: a block of resamples at once -> [b, *c]
        return normalized_effect(
            patched[idx].mean(1), lo[idx].mean(1).reshape(-1, *extra), hi[idx].mean(1).reshape(-1, *extra)
        )

    return bootstrap_tensor(effects, len(patched), n_boot=n_boot, seed=seed, batched=True)


class EffectResult:
    """``effect`` and ``effect_ci`` for a result dataclass with per-pair scores ``p_truth`` and
    ``logit_diff`` ``[n, *c]`` and two unpatched :class:`mechlie.core.metrics.AnswerScores`, named
    by ``LO`` (effect 0, the run patched into) and ``HI`` (effect 1, the run patched from)."""

    LO: ClassVar[str]
    HI: ClassVar[str]
    CI_BATCHED: ClassVar[bool] = True  # how effect_ci evaluates resamples (same numbers either way)

    def baselines(self, metric: str) -> tuple[Tensor, Tensor]:
        """``(lo, hi)``: the two unpatched runs' per-pair ``metric``."""
        return getattr(getattr(self, self.LO), metric), getattr(getattr(self, self.HI), metric)

    def effect(self, metric: str = "logit_diff", idx: Int[Tensor, " m"] | None = None) -> Float[Tensor, "*c"]:
        """Normalized effect of every component: 0 = the ``LO`` run, 1 = the ``HI`` run (over the pairs ``idx``)."""
        return normalized_mean_effect(getattr(self, metric), *self.baselines(metric), idx)

    def effect_ci(self, metric: str = "logit_diff", *, n_boot: int = 1000, seed: int = 0) -> TensorEstimate:
        """The effect of every component with a 95% bootstrap CI over pairs (same resamples)."""
        return normalized_effect_ci(
            getattr(self, metric), *self.baselines(metric), n_boot=n_boot, seed=seed, batched=self.CI_BATCHED
        )
