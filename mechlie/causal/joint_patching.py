"""Joint patching of head sets, and how few heads carry the lie (the top-k curve and the minimal set).

**Joint patching** (:func:`joint_patch`). A *set* of heads has its ``z`` at the final position
replaced together, in one pass, by its value in a source run:

- ``restore``: honest -> lying. Effect ``(m_patched - m_lying) / (m_honest - m_lying)`` (0 = still
  lying, 1 = fully honest), for ``m`` = logit difference truth - lie (or P(truth)), over pair means.
- ``induce``: lying -> honest. Effect ``(m_patched - m_honest) / (m_lying - m_honest)`` (0 = still
  honest, 1 = lying as much as the lying prompt).

**Top-k curve** (:func:`topk_curve`). Heads are ranked on *training* pairs by their single-head
effect (:func:`mechlie.causal.patching.patch_runs`), then the top ``k`` heads, ``k = 1, 2, 4, ...`` up
to all heads, are patched together on *held-out* pairs. Each point has a 95% bootstrap CI over the
held-out pairs, and sits beside ``n_random`` random sets of ``k`` heads (their 2.5-97.5%
quantiles across draws). The **minimal set** is the smallest ``k`` whose top-``k`` set reaches
``threshold`` (80%) of the effect; it is searched over every ``k`` (not only powers of two), and
its CI is the percentile interval of the minimal ``k`` over bootstrap resamples of the held-out
pairs. Campbell et al. (2023, *Localizing Lying in Llama*) found 46 heads, under 1% of
Llama-2-70B's, that together turn the liar honest.

Everything at the final position runs over the target prompt's cached prefix
(:func:`mechlie.causal.patching.score_patches`); each set is one row. Path patching into one
receiver head is in :mod:`mechlie.causal.path_patching`; :mod:`mechlie.causal.circuits` gathers both.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.causal.effects import EffectResult, top_k_components
from mechlie.causal.patching import Patches, answer_rows, patch_runs, score_patches
from mechlie.core.kv import collect_batch, final_tokens, prefix_cache, run_rows
from mechlie.core.metrics import AnswerScores, score_logits
from mechlie.core.pairs import ContrastPair, PairError, answer_set, tokenize
from mechlie.core.stats import Estimate, bootstrap_draws

log = logging.getLogger(__name__)

Direction = Literal["restore", "induce"]
Head = tuple[int, int]


def patch_sides(pairs: Sequence[ContrastPair], direction: str) -> tuple[list[str], list[str]]:
    """(source prompts, target prompts): restore patches honest into lying, induce the reverse."""
    if direction == "restore":
        return [p.honest for p in pairs], [p.lying for p in pairs]
    if direction == "induce":
        return [p.lying for p in pairs], [p.honest for p in pairs]
    raise ValueError(f"direction must be 'restore' or 'induce', got {direction!r}")


def check_heads(model: HookedTransformer, heads: Sequence[Head], *, what: str = "head set") -> tuple[Head, ...]:
    """Validate (layer, head) pairs; an empty set, an unknown head or a duplicate is an error."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = tuple((int(l), int(h)) for l, h in heads)
    if not out:
        raise ValueError(f"empty {what}: give at least one (layer, head)")
    bad = [x for x in out if not (0 <= x[0] < L and 0 <= x[1] < H)]
    if bad:
        raise ValueError(f"unknown head(s) {bad}: the model has layers 0..{L - 1} and heads 0..{H - 1}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} lists a head twice: {out}")
    return out


# ---------------------------------------------------------------------------------------------
# joint patching


@dataclass(frozen=True)
class JointResult(EffectResult):
    """Per pair and head set, the target run with the set patched from the source run;
    ``effect`` / ``effect_ci``: 0 = the target run, 1 = the source run."""

    LO: ClassVar[str] = "target"
    HI: ClassVar[str] = "source"
    CI_BATCHED: ClassVar[bool] = False

    direction: str
    sets: tuple[tuple[Head, ...], ...]
    p_truth: Float[Tensor, "n s"]
    logit_diff: Float[Tensor, "n s"]
    source: AnswerScores  # the source prompts, unpatched
    target: AnswerScores  # the target prompts, unpatched


@torch.inference_mode()
def source_z(model: HookedTransformer, prompts: Sequence[str], batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """Final-position ``z`` of every head ``[n, L, H, d_head]`` and the logits of ``prompts``."""
    acts = collect_batch(model, tokenize(model, list(prompts)), ("z",), batch_size=batch_size)
    return acts.acts["z"], acts.logits


@torch.inference_mode()
def joint_patch(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    head_sets: Sequence[Sequence[Head]],
    *,
    direction: str = "restore",
    batch_size: int = 16,
    max_rows: int = 1024,
    progress: bool = True,
    source: tuple[Tensor, Tensor] | None = None,
) -> JointResult:
    """Patch each set of heads together (their ``z`` at the final position) from source to target.

    Args:
        pairs: (honest, lying) pairs.
        head_sets: sets of (layer, head); each set is one row per pair. Identical sets (as sets)
            run once.
        direction: ``"restore"`` (honest into lying) or ``"induce"`` (lying into honest).
        source: the source prompts' final-position ``z`` ``[n, L, H, d_head]`` and logits, if
            already collected (:func:`source_z`).

    Returns:
        :class:`JointResult` with ``[n_pairs, n_sets]`` scores; ``effect()`` is normalized.

    Example:
        >>> r = joint_patch(model, pairs, [[(20, 5)], [(20, 5), (21, 3)]])
        >>> r.effect()  # share of the honest-lying gap each set restores
    """
    if not pairs:
        raise PairError("no pairs to patch")
    all_sets = tuple(check_heads(model, s) for s in head_sets)
    if not all_sets:
        raise ValueError("no head sets to patch")
    # Patching is order-free within a set: run each distinct set once (e.g. every random k-set of
    # k = all heads is the same set).
    key = [frozenset(s) for s in all_sets]
    first = {k: i for i, k in reversed(list(enumerate(key)))}
    uniq_keys = list(dict.fromkeys(key))
    sets = tuple(all_sets[first[k]] for k in uniq_keys)
    pos = {k: j for j, k in enumerate(uniq_keys)}
    back = torch.tensor([pos[k] for k in key])
    src_prompts, tgt_prompts = patch_sides(pairs, direction)
    answers = answer_set(model.tokenizer, pairs)
    src_z, src_logits = source_z(model, src_prompts, batch_size) if source is None else source
    if src_z.shape[0] != len(pairs) or src_logits.shape[0] != len(pairs):
        raise ValueError(f"source activations hold {src_z.shape[0]} prompts for {len(pairs)} pairs")
    n, S = len(pairs), len(sets)
    # entries of one pair's rows: set s holds its heads
    set_of = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sets)])
    lay = torch.tensor([h[0] for s in sets for h in s])
    hd = torch.tensor([h[1] for s in sets for h in s])
    p_truth, logit_diff = torch.empty((n, S)), torch.empty((n, S))
    tgt_logits = torch.empty((n, model.cfg.d_vocab))
    for s0 in tqdm(range(0, n, batch_size), desc=f"joint patching ({direction})", disable=not progress, leave=False):
        idx = slice(s0, min(n, s0 + batch_size))
        b = tokenize(model, tgt_prompts[idx])
        B = b.tokens.shape[0]
        cache, last = prefix_cache(model, b), final_tokens(b)
        tgt_logits[idx] = run_rows(model, cache, torch.arange(B), last)[:, 0].cpu()
        # row s * B + j: set s on prompt j
        E = len(set_of)
        rows = (set_of[None] * B + torch.arange(B)[:, None]).reshape(-1)  # [B, E] -> B*E
        pj = torch.arange(B).repeat_interleave(E)
        patches = Patches("z", rows, lay.repeat(B), hd.repeat(B), src_z[idx][pj, lay.repeat(B), hd.repeat(B)])
        ans = answer_rows(answers, idx)
        sc = score_patches(model, cache, last, torch.arange(B).repeat(S), patches, ans, max_rows=max_rows)
        p_truth[idx] = sc.p_truth.reshape(S, B).T
        logit_diff[idx] = sc.logit_diff.reshape(S, B).T
    return JointResult(
        direction,
        all_sets,
        p_truth[:, back],
        logit_diff[:, back],
        score_logits(src_logits, answers),
        score_logits(tgt_logits, answers),
    )


# ---------------------------------------------------------------------------------------------
# top-k curve and the minimal set


def k_grid(n_heads: int) -> tuple[int, ...]:
    """1, 2, 4, ... and ``n_heads`` itself."""
    ks, k = [], 1
    while k < n_heads:
        ks.append(k)
        k *= 2
    return tuple(ks + [n_heads])


@dataclass(frozen=True)
class TopKCurve:
    direction: str
    metric: str
    ranking: tuple[Head, ...]  # all heads, best first, ranked on the training pairs
    train_effect: Float[Tensor, "layer head"]  # single-head effect on the training pairs
    ks: tuple[int, ...]
    top: list[Estimate]  # effect of the top-k set on the test pairs, per k
    random_mean: Float[Tensor, " k"]  # random k-sets: mean over draws
    random_lo: Float[Tensor, " k"]  # 2.5% quantile over draws
    random_hi: Float[Tensor, " k"]  # 97.5% quantile over draws
    random_effects: Float[Tensor, "k draws"]
    threshold: float
    minimal_k: int | None  # smallest k whose top-k set reaches the threshold (None: none does)
    minimal_k_ci: tuple[float, float]  # percentile interval over bootstrap resamples of test pairs
    minimal_set: tuple[Head, ...]
    n_heads: int
    n_test: int
    # every k = 1..k_cap (the first curve k every bootstrap resample has crossed the threshold at;
    # all heads if none): enough to find the minimal k of the data and of every resample
    all_k_effect: Float[Tensor, " k_all"] = field(default_factory=lambda: torch.empty(0))

    @property
    def minimal_share(self) -> float:
        return float("nan") if self.minimal_k is None else self.minimal_k / self.n_heads

    def summary(self) -> dict:
        return {
            "direction": self.direction,
            "metric": self.metric,
            "n_heads": self.n_heads,
            "n_test_pairs": self.n_test,
            "ks": list(self.ks),
            "top": [e.to_dict() for e in self.top],
            "random_mean": self.random_mean.tolist(),
            "random_lo": self.random_lo.tolist(),
            "random_hi": self.random_hi.tolist(),
            "threshold": self.threshold,
            "minimal_k": self.minimal_k,
            "minimal_k_ci": list(self.minimal_k_ci),
            "minimal_share": self.minimal_share,
            "minimal_set": [list(h) for h in self.minimal_set],
            "ranking_top10": [list(h) for h in self.ranking[:10]],
        }


def _percentiles(draws: Tensor, level: float = 0.95) -> Tensor:
    """2.5% and 97.5% quantiles over draws (non-finite draws ignored), ``[2, *c]``: the
    percentile CI of :func:`mechlie.core.stats.bootstrap_tensor`."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2])
    return torch.nanquantile(draws.masked_fill(~torch.isfinite(draws), float("nan")), q, dim=0)


def minimal_k(effects: Float[Tensor, " k_all"], threshold: float) -> int | None:
    """Smallest k (1-based) with ``effects[k - 1] >= threshold``."""
    hit = (effects >= threshold).nonzero()
    return None if len(hit) == 0 else int(hit[0, 0]) + 1


def rank_heads(
    model: HookedTransformer,
    train: Sequence[ContrastPair],
    *,
    direction: str = "restore",
    metric: str = "logit_diff",
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[tuple[Head, ...], Tensor]:
    """All heads ranked by their single-head effect on ``train`` (best first), and the effects."""
    src, tgt = patch_sides(train, direction)
    res = patch_runs(model, src, tgt, answer_set(model.tokenizer, train), "z", batch_size=batch_size, progress=progress)
    eff = res.effect(metric)
    return top_k_components(eff, eff.numel()), eff


def _check_topk_args(
    train: Sequence[ContrastPair],
    test: Sequence[ContrastPair],
    n_heads: int,
    ks: Sequence[int] | None,
    n_random: int,
    threshold: float,
) -> tuple[int, ...]:
    """Validate :func:`topk_curve`'s inputs; return the curve's ``ks``."""
    if not train or not test:
        raise PairError("need training and test pairs")
    if {p.fact_id for p in train} & {p.fact_id for p in test}:
        raise PairError("a fact is in both the training and the test pairs")
    ks = k_grid(n_heads) if ks is None else tuple(int(k) for k in ks)
    if not ks or min(ks) < 1 or max(ks) > n_heads:
        raise ValueError(f"every k must be in [1, {n_heads}] (the number of heads), got {ks}")
    if n_random < 1 or not 0 < threshold <= 1:
        raise ValueError("need n_random >= 1 and threshold in (0, 1]")
    return ks


def _minimal_k_ci(
    every: JointResult, metric: str, threshold: float, n_heads: int, n_boot: int, seed: int
) -> tuple[float, float]:
    """Percentile interval of the minimal k over bootstrap resamples of the test pairs (``every``:
    the top-k sets for k = 1, 2, ...); a resample that never reaches the threshold counts as
    ``n_heads + 1``. The same seed gives the same resamples as the curve's CIs."""
    draws = bootstrap_draws(lambda i: every.effect(metric, i), len(every.p_truth), n_boot=n_boot, seed=seed)
    kd = torch.tensor([float(minimal_k(d, threshold) or math.inf) for d in draws])
    if not len(kd):
        return math.nan, math.nan
    lo, hi = torch.quantile(kd.clamp(max=n_heads + 1), torch.tensor([0.025, 0.975])).tolist()
    return lo, hi


def topk_curve(
    model: HookedTransformer,
    train: Sequence[ContrastPair],
    test: Sequence[ContrastPair],
    *,
    direction: str = "restore",
    metric: str = "logit_diff",
    threshold: float = 0.8,
    ks: Sequence[int] | None = None,
    n_random: int = 50,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> TopKCurve:
    """Rank heads on ``train``; patch the top-k (and random k-sets) together on ``test``.

    Args:
        train, test: pairs with no fact in common (ranking on one, evaluation on the other).
        threshold: share of the effect the minimal set must reach.
        ks: set sizes of the curve (default :func:`k_grid`); the minimal set is searched over all k.
        n_random: random head sets per k (the control).

    Returns:
        :class:`TopKCurve`.
    """
    N = model.cfg.n_layers * model.cfg.n_heads
    ks = _check_topk_args(train, test, N, ks, n_random, threshold)
    ranking, train_eff = rank_heads(
        model, train, direction=direction, metric=metric, batch_size=batch_size, progress=progress
    )
    g = torch.Generator().manual_seed(seed)
    rand_sets = [[ranking[int(i)] for i in torch.randperm(N, generator=g)[:k]] for k in ks for _ in range(n_random)]
    n = len(test)
    src_prompts, _ = patch_sides(test, direction)
    source = source_z(model, src_prompts, batch_size)

    def joint(sets):
        return joint_patch(
            model, test, sets, direction=direction, batch_size=batch_size, progress=progress, source=source
        )

    # Round 1: the curve's k, the random k-sets, and the bootstrap draws of the curve.
    res = joint([ranking[:k] for k in ks] + rand_sets)
    grid = res.effect(metric)[: len(ks)]
    rand = res.effect(metric)[len(ks) :].reshape(len(ks), n_random)
    top_draws = bootstrap_draws(lambda i: res.effect(metric, i)[: len(ks)], n, n_boot=n_boot, seed=seed)
    top_est = [
        Estimate(float(grid[j]), float(lo), float(hi), n)
        for j, (lo, hi) in enumerate(_percentiles(top_draws).T.tolist())
    ]
    # Round 2: every k up to k_cap, the first curve k whose top-k set reaches the threshold on the
    # full data and on every bootstrap resample: each one's minimal k is <= k_cap, so searching
    # k = 1..k_cap is exact (without such a k, every k up to all heads is searched).
    crossed = (grid >= threshold) & (top_draws >= threshold).all(0)
    k_cap = ks[int(crossed.nonzero()[0, 0])] if bool(crossed.any()) else N
    every = joint([ranking[:k] for k in range(1, k_cap + 1)])
    top_all = every.effect(metric)
    kmin = minimal_k(top_all, threshold)
    lo, hi = _minimal_k_ci(every, metric, threshold, N, n_boot, seed)
    return TopKCurve(
        direction,
        metric,
        ranking,
        train_eff,
        ks,
        top_est,
        rand.mean(1),
        rand.quantile(0.025, dim=1),
        rand.quantile(0.975, dim=1),
        rand,
        threshold,
        kmin,
        (lo, hi),
        tuple(ranking[:kmin]) if kmin else (),
        N,
        n,
        top_all,
    )


__all__ = [
    "Direction",
    "Head",
    "JointResult",
    "TopKCurve",
    "check_heads",
    "joint_patch",
    "k_grid",
    "minimal_k",
    "patch_sides",
    "rank_heads",
    "source_z",
    "topk_curve",
]
