"""Statistics shared by every mechlie module: bootstrap CIs, AUROC, Spearman, permutation nulls.

Methods:

- ``bootstrap``: a scalar statistic of ``n`` independent units (facts, pairs, lines of text,
  never tokens) with a bias-corrected and accelerated (BCa) interval from
  ``scipy.stats.bootstrap`` run on the unit *indices*, so any statistic of any paired data can be
  bootstrapped by resampling the units once (Efron & Tibshirani 1993, ch. 14). Where BCa is not
  defined (a degenerate bootstrap distribution, or a statistic that is undefined on some
  resamples) the percentile interval of the same resamples is returned.
- ``bootstrap_tensor``: the same for a statistic that returns a tensor (all 270 heads at once).
  Each draw resamples the unit axis once (a seeded ``torch.randint`` index resample) and
  evaluates the statistic for every component, so components share their resamples (needed for
  rank stability); the interval is the percentile interval of the draws, per component.
- ``auroc``: P(positive score > negative score), ties counted half = Mann-Whitney U / (n1 n0),
  batched over trailing dimensions (a sorted search, memory O(n), not O(n1 n0)).
- ``max_null_threshold``: the family-wise bar for "the best of many components beats chance":
  the q-quantile over null draws of the maximum over components (a max-statistic permutation
  test, Westfall & Young 1993; Nichols & Holmes 2002).
- ``paired_swap_masks``: the permutation null for paired (honest, lying) data: each draw swaps
  the two labels within a random half of the pairs, which keeps the pairing and the class
  balance, so the null groups hold no real signal (pooling the rows and reshuffling does not:
  the fake "lying" group then still holds about half of the real lying rows, and its direction
  is a scaled copy of the real one).
- ``normalized_effect``: ``(x - lo) / (hi - lo)`` (0 = at ``lo``, 1 = at ``hi``), the patching
  and steering effect scale.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.stats
import torch
from jaxtyping import Bool, Float
from torch import Tensor


def top_k_components(scores: Float[Tensor, "*c"], k: int, *, largest: bool = True) -> tuple[tuple[int, ...], ...]:
    """The indices of the ``k`` components with the largest (or smallest) score, best first; NaNs
    rank last. For ``[layer, head]`` scores these are ``(layer, head)`` pairs, as
    :func:`mechlie.core.kv.top_heads` gives them (it calls this); for ``[layer]`` scores, ``(layer,)``."""
    if not 1 <= k <= scores.numel():
        raise ValueError(f"k must be in [1, {scores.numel()}] (the number of components), got {k}")
    flat = scores.flatten().float()
    fill = float("-inf") if largest else float("inf")
    flat = torch.where(torch.isnan(flat), torch.full_like(flat, fill), flat)
    idx = flat.topk(k, largest=largest).indices
    return tuple(tuple(int(i) for i in torch.unravel_index(j, scores.shape)) for j in idx)


__all__ = [
    "top_k_components",
    "Estimate",
    "TensorEstimate",
    "bootstrap",
    "bootstrap_draws",
    "bootstrap_tensor",
    "auroc",
    "spearman",
    "max_null_threshold",
    "paired_swap_masks",
    "normalized_effect",
    "rank_stability",
]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap confidence interval over ``n`` units."""

    mean: float  # the statistic on the full sample
    lo: float
    hi: float
    n: int  # number of independent units resampled
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.mean:.2f} [{self.lo:.2f}, {self.hi:.2f}]"

    def __format__(self, spec: str) -> str:
        # f"{est:.3f}" formats all three numbers; f"{est}" is str(est).
        if not spec:
            return str(self)
        return f"{format(self.mean, spec)} [{format(self.lo, spec)}, {format(self.hi, spec)}]"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "level": self.level}

    def excludes(self, value: float) -> bool:
        """True when ``value`` lies outside the interval."""
        return not self.lo <= value <= self.hi


@dataclass(frozen=True)
class TensorEstimate:
    """Per-component estimates with percentile intervals; ``draws`` keeps the bootstrap draws."""

    mean: Tensor  # [*c], the statistic on the full sample
    lo: Tensor  # [*c]
    hi: Tensor  # [*c]
    n: int
    draws: Tensor  # [n_boot, *c]
    level: float = 0.95

    def at(self, *index: int) -> Estimate:
        """The ``Estimate`` of one component, e.g. ``est.at(layer, head)``."""
        return Estimate(float(self.mean[index]), float(self.lo[index]), float(self.hi[index]), self.n, self.level)


# scipy >= 1.15 takes ``rng``; older versions only ``random_state``.
_SCIPY_RNG_KW = "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"


def _as_float(x) -> float:
    return float(x.item() if isinstance(x, Tensor) else x)


def bootstrap(
    stat: Callable[[Tensor], float | Tensor],
    n: int,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    method: str = "BCa",
) -> Estimate:
    """Bootstrap CI of a scalar statistic of ``n`` independent units.

    Args:
        stat: ``stat(idx)`` -> float or 0-d tensor, where ``idx`` is a LongTensor of ``n`` unit
            indices (drawn with replacement); ``stat(torch.arange(n))`` is the point estimate.
        n: number of units.
        n_boot: bootstrap resamples.
        level: confidence level.
        seed: seeds the resampling.
        method: "BCa" (default), "percentile" or "basic", as in ``scipy.stats.bootstrap``.

    Returns:
        ``Estimate(mean=stat(all), lo, hi, n)``.

    Example:
        >>> x = torch.randn(50)
        >>> est = bootstrap(lambda i: x[i].mean(), len(x))
        >>> est.lo <= est.mean <= est.hi
        True
    """
    if n < 1:
        raise ValueError("bootstrap needs at least one unit")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    full = _as_float(stat(torch.arange(n)))
    if n == 1:
        return Estimate(full, float("nan"), float("nan"), n, level)

    def np_stat(i: np.ndarray) -> float:
        return _as_float(stat(torch.from_numpy(np.asarray(i, dtype=np.int64))))

    with warnings.catch_warnings():
        # scipy warns (and returns NaN) when BCa is undefined; we fall back to percentiles below.
        warnings.simplefilter("ignore")
        res = scipy.stats.bootstrap(
            (np.arange(n),),
            np_stat,
            n_resamples=n_boot,
            confidence_level=level,
            method=method,
            vectorized=False,
            **{_SCIPY_RNG_KW: np.random.default_rng(seed)},
        )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        boots = np.asarray(res.bootstrap_distribution, dtype=float)
        boots = boots[np.isfinite(boots)]
        if len(boots) == 0:
            return Estimate(full, float("nan"), float("nan"), n, level)
        lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]).tolist()
    return Estimate(full, lo, hi, n, level)


def bootstrap_draws(
    stat: Callable[[Tensor], Tensor], n: int, *, n_boot: int = 1000, seed: int = 0, batched: bool = False
) -> Tensor:
    """``stat`` on ``n_boot`` seeded index resamples of ``n`` units, stacked: ``[n_boot, *c]``.

    With ``batched=True``, ``stat`` takes a ``[b, n]`` block of resamples and returns ``[b, *c]``
    (same resamples, one call per block of 100 instead of one per resample)."""
    if n < 1:
        raise ValueError("bootstrap needs at least one unit")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    if batched:
        return torch.cat([torch.as_tensor(stat(idx[b : b + 100])).float() for b in range(0, n_boot, 100)])
    return torch.stack([torch.as_tensor(stat(i)).float() for i in idx])


def bootstrap_tensor(
    stat: Callable[[Tensor], Tensor],
    n: int,
    *,
    batched: bool = False,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> TensorEstimate:
    """Percentile bootstrap CIs of a tensor-valued statistic, every component from the same draws.

    Args:
        stat: ``stat(idx)`` -> tensor ``[*c]`` for a LongTensor of ``n`` resampled unit indices.
        n: number of independent units (pairs, facts).
        batched: ``stat`` also takes a ``[b, n]`` block of resamples, returning ``[b, *c]``
            (:func:`bootstrap_draws`); the point estimate is ``stat(arange(n)[None])[0]``.
        n_boot, level, seed: as in ``bootstrap``.

    Returns:
        ``TensorEstimate(mean=stat(all), lo, hi, n, draws)``; draws that are not finite (a
        statistic undefined on a resample) are ignored per component.

    Example:
        >>> x = torch.randn(40, 3, 5)  # 40 pairs, 3 x 5 components
        >>> est = bootstrap_tensor(lambda i: x[i].mean(0), 40)
        >>> est.lo.shape
        torch.Size([3, 5])
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    full = torch.as_tensor(stat(torch.arange(n)[None])[0] if batched else stat(torch.arange(n))).float()
    draws = bootstrap_draws(stat, n, n_boot=n_boot, seed=seed, batched=batched)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2])
    lo, hi = torch.nanquantile(draws.masked_fill(~torch.isfinite(draws), float("nan")), q, dim=0)
    return TensorEstimate(full, lo, hi, n, draws, level)


def rank_stability(draws: Float[Tensor, " b *c"], k: int = 5) -> tuple[Float[Tensor, "*c"], Float[Tensor, "*c"]]:
    """Share of bootstrap draws in which each component is the largest, and is in the top ``k``."""
    b = draws.shape[0]
    flat = draws.reshape(b, -1).nan_to_num(nan=-float("inf"))
    k = min(k, flat.shape[1])
    top = flat.topk(k, dim=1).indices
    top1 = torch.zeros_like(flat).scatter_(1, top[:, :1], 1.0).mean(0)
    topk = torch.zeros_like(flat).scatter_(1, top, 1.0).mean(0)
    return top1.reshape(draws.shape[1:]), topk.reshape(draws.shape[1:])


def auroc(pos: Float[Tensor, " n1 *c"], neg: Float[Tensor, " n0 *c"]) -> Float[Tensor, "*c"]:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U / n1 n0).

    Batched over the trailing dimensions: ``pos[n1, *c]`` and ``neg[n0, *c]`` give ``[*c]``.
    """
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs at least one example of each class")
    if pos.shape[1:] != neg.shape[1:]:
        raise ValueError(f"pos {tuple(pos.shape)} and neg {tuple(neg.shape)} trailing shapes differ")
    # Sample axis last, so searchsorted counts, per component, the negatives below each positive.
    p = pos.float().movedim(0, -1).contiguous()
    s = neg.float().movedim(0, -1).sort(dim=-1).values.contiguous()
    below = torch.searchsorted(s, p, side="left")  # negatives < p
    below_or_tie = torch.searchsorted(s, p, side="right")  # negatives <= p
    return (below + below_or_tie).float().mean(-1) / (2 * neg.shape[0])


def spearman(a, b) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr``) of two 1-d sequences."""
    a = np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=float).ravel()
    b = np.asarray(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=float).ravel()
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"spearman needs two sequences of the same length >= 2, got {a.shape} and {b.shape}")
    return float(scipy.stats.spearmanr(a, b).statistic)


def max_null_threshold(null: Float[Tensor, " draws *c"], q: float = 0.95) -> float:
    """The q-quantile over draws of the maximum over components of a null distribution.

    A component whose observed score exceeds this bar beats chance with family-wise error
    ``1 - q`` over all components (the max-statistic correction for picking the best of many).
    """
    if null.ndim < 1 or null.shape[0] == 0:
        raise ValueError("the null needs at least one draw")
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    return float(torch.quantile(null.float().reshape(null.shape[0], -1).max(1).values, q))


def paired_swap_masks(n: int, n_draws: int, seed: int = 0) -> Bool[Tensor, "draws n"]:
    """Within-pair label swaps for a paired permutation null: ``True`` = swap pair ``i``'s labels.

    Each draw swaps a uniformly random half of the pairs (``n // 2`` of them, plus one more with
    probability 1/2 when ``n`` is odd), so every pair is swapped with probability 1/2. Under the
    null the two members of a pair are exchangeable, so every swapped dataset has the observed
    data's distribution. Balancing the swaps also cancels, exactly for even ``n``, any shift that
    all pairs share (the framing of the prompts) from a null difference of means, so a null
    direction holds no copy of the real one.
    """
    if n < 1 or n_draws < 1:
        raise ValueError(f"need n >= 1 and n_draws >= 1, got {n}, {n_draws}")
    g = torch.Generator().manual_seed(seed)
    ranks = torch.rand(n_draws, n, generator=g).argsort(dim=1).argsort(dim=1)
    k = n // 2 + (torch.rand(n_draws, 1, generator=g) < 0.5).long() * (n % 2)
    return ranks < k


def normalized_effect(x: Tensor | float, lo: Tensor | float, hi: Tensor | float) -> Tensor | float:
    """``(x - lo) / (hi - lo)``: 0 at ``lo`` (e.g. the corrupt run), 1 at ``hi`` (the clean run)."""
    return (x - lo) / (hi - lo)
