"""How few heads carry the lie, and what feeds them: joint patching, top-k curves, path patching.

This module gathers the circuit tools under one name (``from mechlie.causal import circuits``):

- :mod:`mechlie.causal.joint_patching`: a *set* of heads patched together (:func:`joint_patch`),
  heads ranked on training pairs and the top-k curve with its minimal set (:func:`topk_curve`).
- :mod:`mechlie.causal.path_patching`: a sender's effect along the path into one receiver head's
  queries, keys or values (:func:`path_patch`, Wang et al. 2022), and which positions the receiver
  reads the lie from (:func:`receiver_positions`).
- :mod:`mechlie.causal.edges`: the edge graph of every head and MLP (q/k/v split), exact edge
  patching (:func:`patch_edges`), the circuit of a set of kept edges (:func:`circuit_forward`, MIB's
  convention) and edge attribution, EAP and EAP-IG (:func:`attribute_edges`).

Effects are normalized over pair means (:mod:`mechlie.causal.effects`): 0 = the target run, 1 =
the source run; ``restore`` patches honest into lying, ``induce`` the reverse.

The minimal set's variance (defined here): :func:`rerank_minimal_k` bootstraps the whole pipeline,
re-ranking the heads on each resample of the training pairs (:func:`rank_on` re-uses per-pair
single-head results, so a re-ranking costs no patching) and finding that ranking's minimal set on a
resample of the test pairs (:func:`search_minimal_k`). :func:`topk_curve`'s own CI holds the
ranking fixed and resamples only the test pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechlie.causal import joint_patching, path_patching
from mechlie.causal.edges import (  # noqa: F401  (re-exported)
    EdgeGraph,
    EdgeRows,
    EdgeScores,
    attribute_edges,
    build_graph,
    circuit_forward,
    equal_length,
    patch_edges,
)
from mechlie.causal.effects import EffectResult, normalized_mean_effect, top_k_components
from mechlie.causal.joint_patching import (  # noqa: F401  (re-exported)
    Direction,
    Head,
    JointResult,
    TopKCurve,
    check_heads,
    joint_patch,
    k_grid,
    minimal_k,
    patch_sides,
    rank_heads,
    source_z,
    topk_curve,
)
from mechlie.causal.path_patching import (  # noqa: F401  (re-exported)
    CHANNELS,
    PathResult,
    ReceiverPositions,
    Sender,
    path_patch,
    receiver_positions,
)

# ---------------------------------------------------------------------------------------------
# the minimal set's variance: re-ranking inside the bootstrap, and other splits


def rank_on(single: EffectResult, idx: Int[Tensor, " m"] | None = None, metric: str = "logit_diff") -> tuple[Head, ...]:
    """All heads ranked (best first) by their single-head effect over the pairs ``idx`` of ``single``
    (a per-pair :class:`mechlie.causal.patching.PatchResult` of ``z``): :func:`rank_heads` on those
    pairs, without patching again (each pair is patched on its own, so a subset's effects are the
    subset's rows)."""
    eff = single.effect(metric, idx)
    return top_k_components(eff, eff.numel())


def search_minimal_k(
    rankings: Sequence[Sequence[Head]],
    test_idx: Sequence[Int[Tensor, " m"] | None],
    evaluate: Callable[[list[tuple[Head, ...]]], EffectResult],
    *,
    threshold: float,
    metric: str = "logit_diff",
    k_start: int = 8,
    k_max: int | None = None,
) -> Float[Tensor, " r"]:
    """For each ranking ``r``, the smallest k whose top-k set reaches ``threshold`` on the test
    pairs ``test_idx[r]`` (None: all of them); ``inf`` where no k up to ``k_max`` does.

    ``evaluate(sets)`` patches head sets on the test pairs (e.g. :func:`joint_patch`) and returns
    per-pair scores ``[n_test, len(sets)]``. Sets are searched in rounds, k = 1..k_start, then up to
    2 k_start, ... (one ``evaluate`` call per round), and a set met before (the same heads, in any
    order: the top-k of two rankings often coincide) is patched once. ``k_max`` (default: every
    head) bounds the search, so a ranking that never gets there costs at most k_max sets.
    """
    if len(rankings) != len(test_idx):
        raise ValueError(f"{len(rankings)} rankings but {len(test_idx)} test resamples")
    n_heads = min(len(r) for r in rankings) if rankings else 0
    k_max = n_heads if k_max is None else min(k_max, n_heads)
    if k_max < 1 or k_start < 1:
        raise ValueError("k_max and k_start must be >= 1 (and every ranking non-empty)")
    cols: dict[frozenset, int] = {}
    patched: list[Tensor] = []
    base: tuple[Tensor, Tensor] | None = None
    out = torch.full((len(rankings),), math.inf)
    todo, done, K = list(range(len(rankings))), 0, min(k_start, k_max)
    while todo and done < k_max:
        new = {}
        for r in todo:
            for k in range(done + 1, K + 1):
                key = frozenset(rankings[r][:k])
                if key not in cols and key not in new:
                    new[key] = tuple(rankings[r][:k])
        if new:
            res = evaluate(list(new.values()))
            base = res.baselines(metric)
            scores = getattr(res, metric)
            for j, key in enumerate(new):
                cols[key] = len(patched)
                patched.append(scores[:, j])
        grid = torch.stack(patched, 1)
        for r in todo:
            sel = [cols[frozenset(rankings[r][:k])] for k in range(done + 1, K + 1)]
            eff = normalized_mean_effect(grid[:, sel], *base, test_idx[r])
            hit = minimal_k(eff, threshold)
            if hit is not None:
                out[r] = done + hit
        todo = [r for r in todo if not math.isfinite(out[r])]
        done, K = K, min(2 * K, k_max)
    return out


@dataclass(frozen=True)
class RerankedMinimalK:
    """The minimal k over bootstrap resamples that redo the whole pipeline: resample the training
    pairs and re-rank the heads on them, resample the test pairs, find the minimal set there."""

    minimal_k: Float[Tensor, " boot"]  # per resample; inf = no k up to k_max reached the threshold
    k_max: int
    n_heads: int
    n_sets: int  # distinct head sets patched
    top1_share: float  # share of resamples whose top-ranked head is the full data's
    top1: Head

    @property
    def ci(self) -> tuple[float, float]:
        """2.5-97.5% percentile interval; a resample that never reached counts as ``k_max + 1``
        (so an upper end of ``k_max + 1`` means "more than k_max")."""
        lo, hi = torch.quantile(self.minimal_k.clamp(max=self.k_max + 1), torch.tensor([0.025, 0.975])).tolist()
        return lo, hi

    def summary(self) -> dict:
        k = self.minimal_k
        fin = k[torch.isfinite(k)]
        return {
            "ci": list(self.ci),
            "n_resamples": len(k),
            "n_not_reached": int((~torch.isfinite(k)).sum()),
            "k_max": self.k_max,
            "median": float(k.clamp(max=self.k_max + 1).median()),
            "mean_of_reached": float(fin.mean()) if len(fin) else math.nan,
            "n_sets_patched": self.n_sets,
            "top1_share": self.top1_share,
            "top1": list(self.top1),
            "what": "resamples the training pairs (heads re-ranked on each resample) and the test pairs",
        }


def rerank_minimal_k(
    rank: Callable[[Int[Tensor, " n_train"]], Sequence[Head]],
    evaluate: Callable[[list[tuple[Head, ...]]], EffectResult],
    n_train: int,
    n_test: int,
    *,
    threshold: float = 0.8,
    metric: str = "logit_diff",
    n_boot: int = 100,
    seed: int = 0,
    k_start: int = 8,
    k_max: int | None = None,
    reference: Sequence[Head] | None = None,
) -> RerankedMinimalK:
    """Bootstrap of the minimal set that includes the ranking's own variance.

    Each of ``n_boot`` resamples draws the training pairs with replacement and calls ``rank`` on
    them once (e.g. ``lambda i: rank_on(single_train, i)``), draws the test pairs with replacement,
    and finds that ranking's minimal k on those test pairs (:func:`search_minimal_k`; ``evaluate``
    patches sets on all test pairs, the resample picks rows). ``reference``: the ranking on all
    training pairs, for the share of resamples that keep its top head. Holding the ranking fixed (as
    :func:`topk_curve`'s CI does) leaves out how much a ranking from a few training pairs varies.
    """
    if n_train < 1 or n_test < 1 or n_boot < 1:
        raise ValueError("need n_train, n_test and n_boot >= 1")
    g = torch.Generator().manual_seed(seed)
    tr = torch.randint(0, n_train, (n_boot, n_train), generator=g)
    te = torch.randint(0, n_test, (n_boot, n_test), generator=g)
    rankings = [tuple(rank(tr[b])) for b in range(n_boot)]
    full = tuple(reference) if reference is not None else rankings[0]
    n_sets = 0

    def counted(sets: list[tuple[Head, ...]]) -> EffectResult:
        nonlocal n_sets
        n_sets += len(sets)
        return evaluate(sets)

    ks = search_minimal_k(rankings, list(te), counted, threshold=threshold, metric=metric, k_start=k_start, k_max=k_max)
    return RerankedMinimalK(
        ks,
        len(full) if k_max is None else min(k_max, len(full)),
        len(full),
        n_sets,
        sum(r[0] == full[0] for r in rankings) / n_boot,
        full[0],
    )


__all__ = sorted(
    joint_patching.__all__
    + path_patching.__all__
    + ["RerankedMinimalK", "rank_on", "rerank_minimal_k", "search_minimal_k"]
)
