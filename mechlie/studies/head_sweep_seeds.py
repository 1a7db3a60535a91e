"""The head sweep's headline on several splits of the facts: per split seed, the top head chosen on
that split's training facts and reported on its held-out facts, and the heads passing each bar.

Why: one split (seed 0) decides which facts fit and which are held out. Re-splitting shows how much
the headline rests on that one draw. Nothing is recomputed from the model: every split reuses the
same activations (the directions are refit on each split's training rows) and the same per-pair
patching results (each analysed pair's lying run with each head's ``z`` patched from its honest run;
a split only changes which pairs choose the head and which pairs report it).

Per seed ``s`` (``split_by_fact(fact_ids, test_frac, s)``):

- **top head**: the head with the largest normalized patching effect on the logit difference over
  the training pairs (0 = lying, 1 = honest; normalized on the pair means, as everywhere); its effect
  on the held-out pairs, with a 95% percentile-bootstrap CI over held-out *facts* (a fact's pairs are
  averaged first, so pairs sharing a fact resample together; with one pair per fact this is the
  bootstrap over pairs). Choosing on training facts and reporting on held-out facts keeps the choice
  out of the reported number.
- **bars**: the difference-of-means directions refit on the training facts and scored on the
  held-out facts against both controls (:func:`mechlie.read.directions.score_directions`): how many
  heads pass each control's per-head bar and its max-over-heads bar, and the best head by held-out
  AUROC with its CI.

Across seeds: the mean and SD (``n - 1``) of each number, and how many seeds pick each top head (the
choice's stability). The splits share facts, so the SD is split-to-split variation (which facts
happen to be held out), not a CI over independent samples; the per-seed CIs are the sampling
intervals.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechlie.causal.effects import normalized_effect_ci, normalized_mean_effect
from mechlie.core.kv import top_heads
from mechlie.read.directions import DirectionScores, score_directions, split_by_fact

BARS = ("null_own", "null_max", "random_own", "random_max")  # the four pass counts, per seed
SPREAD_NOTE = (
    "the splits share facts, so the SD is split-to-split variation (which facts are held out), "
    "not a CI over independent samples"
)


@dataclass(frozen=True)
class SeedHeadline:
    """One split seed's headline numbers (JSON-ready through :func:`dataclasses.asdict`)."""

    seed: int
    top_head: tuple[int, int]  # chosen on the training facts' pairs
    train_effect: float  # its effect on the training pairs (the choice)
    effect: float  # its effect on the held-out pairs
    lo: float  # 95% CI over held-out facts
    hi: float
    n_train_facts: int
    n_test_facts: int
    n_pass: dict[str, int]  # heads passing each bar (BARS), held-out AUROC
    best_auroc_head: tuple[int, int]
    best_auroc: float
    best_auroc_lo: float
    best_auroc_hi: float


def fact_means(x: Float[Tensor, " n *c"], facts: Sequence[str]) -> Float[Tensor, " f *c"]:
    """Rows of ``x`` averaged per fact (facts in first-seen order)."""
    order = list(dict.fromkeys(facts))
    return torch.stack([x[[i for i, f in enumerate(facts) if f == u]].mean(0) for u in order])


def held_out_effect(
    patched: Float[Tensor, " n"], lo: Float[Tensor, " n"], hi: Float[Tensor, " n"], facts: Sequence[str], **boot
):
    """The normalized effect of one component over the rows given, with a 95% CI over their facts."""
    return normalized_effect_ci(
        fact_means(patched, facts), fact_means(lo, facts), fact_means(hi, facts), batched=True, **boot
    )


def seed_headline(
    honest: Float[Tensor, "n L H d"],
    lying: Float[Tensor, "n L H d"],
    patched: Float[Tensor, "n L H"],
    lying_ld: Float[Tensor, " n"],
    honest_ld: Float[Tensor, " n"],
    fact_ids: Sequence[str],
    seed: int,
    *,
    test_frac: float,
    n_perm: int,
    n_random: int,
    n_boot: int,
    fit: str = "diff_of_means",
    scores: DirectionScores | None = None,
) -> SeedHeadline:
    """One split seed's headline. ``patched`` is the per-pair logit difference of the lying run with
    each head's ``z`` patched from the honest run, ``lying_ld`` / ``honest_ld`` the unpatched runs'
    (row ``i`` = pair ``i`` of ``honest`` / ``lying`` / ``fact_ids``); ``scores``: this split's
    direction scores if already computed (the reported split), else they are scored here."""
    sp = split_by_fact(fact_ids, test_frac, seed)
    d = scores
    if d is None:
        d = score_directions(honest, lying, sp, fit=fit, n_perm=n_perm, n_random=n_random, n_boot=n_boot, seed=seed)
    tr, te = torch.tensor(sp.train), torch.tensor(sp.test)
    lo, hi = lying_ld, honest_ld
    train_eff = normalized_mean_effect(patched, lo, hi, tr)
    top = top_heads(train_eff, 1)[0]
    test_facts = [fact_ids[i] for i in sp.test]
    est = held_out_effect(patched[te][:, top[0], top[1]], lo[te], hi[te], test_facts, n_boot=n_boot, seed=seed)
    summ = d.summary()
    n_pass = {
        "null_own": summ["null"]["n_pass_own"],
        "null_max": summ["null"]["n_pass"],
        "random_own": summ["random"]["n_pass_own"],
        "random_max": summ["random"]["n_pass"],
    }
    m = summ["max"]
    return SeedHeadline(
        seed=seed,
        top_head=(int(top[0]), int(top[1])),
        train_effect=float(train_eff[top]),
        effect=float(est.mean),
        lo=float(est.lo),
        hi=float(est.hi),
        n_train_facts=len({fact_ids[i] for i in sp.train}),
        n_test_facts=len(set(test_facts)),
        n_pass=n_pass,
        best_auroc_head=(int(m["component"][0]), int(m["component"][1])),
        best_auroc=m["auroc"],
        best_auroc_lo=m["lo"],
        best_auroc_hi=m["hi"],
    )


def over_split_seeds(
    honest: Float[Tensor, "n L H d"],
    lying: Float[Tensor, "n L H d"],
    patched: Float[Tensor, "n L H"],
    lying_ld: Float[Tensor, " n"],
    honest_ld: Float[Tensor, " n"],
    fact_ids: Sequence[str],
    seeds: Sequence[int],
    *,
    test_frac: float,
    n_perm: int,
    n_random: int,
    n_boot: int,
    fit: str = "diff_of_means",
    known: dict[int, DirectionScores] | None = None,
) -> dict:
    """:func:`seed_headline` for every seed, summarized (:func:`summarize_seeds`). ``known`` maps a
    seed to its already-computed direction scores (the reported split), which are reused."""
    n = {len(x) for x in (honest, lying, patched, lying_ld, honest_ld, fact_ids)}
    if len(n) != 1:
        raise ValueError(
            f"{len(honest)} honest, {len(lying)} lying, {len(patched)} patched rows, {len(lying_ld)} / "
            f"{len(honest_ld)} baselines and {len(fact_ids)} fact ids must match (one row per pair)"
        )
    known = known or {}
    opts = {"test_frac": test_frac, "n_perm": n_perm, "n_random": n_random, "n_boot": n_boot, "fit": fit}
    rows = [
        seed_headline(honest, lying, patched, lying_ld, honest_ld, fact_ids, s, scores=known.get(s), **opts)
        for s in seeds
    ]
    return summarize_seeds(rows, n_heads=patched[0].numel())


def _mean_sd(x: Sequence[float | int]) -> dict[str, float]:
    t = torch.tensor([float(v) for v in x], dtype=torch.float64)
    return {"mean": float(t.mean()), "sd": float(t.std()) if len(t) > 1 else 0.0}


def summarize_seeds(rows: Sequence[SeedHeadline], n_heads: int) -> dict:
    """Per seed (``per_seed``) and across seeds: mean ± SD of the top head's held-out effect, of each
    bar's pass count (of ``n_heads``) and of the best held-out AUROC; how many seeds pick each top head."""
    if not rows:
        raise ValueError("no split seeds to summarize")
    picks = Counter(f"L{r.top_head[0]}H{r.top_head[1]}" for r in rows)
    modal, n_modal = picks.most_common(1)[0]
    return {
        "seeds": [r.seed for r in rows],
        "n_heads": n_heads,
        "per_seed": [asdict(r) for r in rows],
        "effect": _mean_sd([r.effect for r in rows]),
        "n_pass": {b: _mean_sd([r.n_pass[b] for r in rows]) for b in BARS},
        "best_auroc": _mean_sd([r.best_auroc for r in rows]),
        "top_head_counts": dict(picks.most_common()),
        "modal_top_head": modal,
        "n_seeds_modal": n_modal,
        "metric": "normalized patching effect on the logit difference (0 = lying, 1 = honest)",
        "choice": "top head chosen on each split's training facts, reported on its held-out facts",
        "ci": "95% percentile bootstrap over the split's held-out facts",
        "spread": "mean and SD (n - 1) over split seeds; " + SPREAD_NOTE,
    }


def split_seeds_short(o: dict) -> str:
    """One clause for the headline's top-head line: the modal top head and the mean ± SD of its effect."""
    n, e = len(o["seeds"]), o["effect"]
    return (
        f"over {n} split seeds (each choosing on its training facts, reporting on its held-out facts) "
        f"{o['modal_top_head']} is the top head in {o['n_seeds_modal']}/{n}, held-out effect {e['mean']:.2f} ± "
        f"{e['sd']:.2f} (mean ± SD over seeds; per-seed CIs below)"
    )


def split_counts_short(o: dict) -> str:
    """One clause for the headline's bars line: each bar's pass count as mean ± SD over the split seeds."""
    p = o["n_pass"]

    def ms(b: str) -> str:
        return f"{p[b]['mean']:.0f} ± {p[b]['sd']:.0f}"

    return (
        f"over {len(o['seeds'])} split seeds (mean ± SD): label-swap {ms('null_max')} pass the max bar, "
        f"{ms('null_own')} their own; random directions {ms('random_max')} the max bar, {ms('random_own')} their own"
    )


def split_seeds_text(o: dict) -> list[str]:
    """The headline sentences for a summary's ``over_split_seeds`` block."""
    n = len(o["seeds"])
    per = "; ".join(
        f"seed {r['seed']} L{r['top_head'][0]}H{r['top_head'][1]} {r['effect']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"
        for r in o["per_seed"]
    )
    e = o["effect"]
    others = ", ".join(f"{h} in {c}" for h, c in o["top_head_counts"].items() if h != o["modal_top_head"])
    head = (
        f"Over {n} split seeds of the facts (each seed chooses its top head by patching on its own training "
        f"facts and reports it on its own held-out facts): {o['modal_top_head']} is the top head in "
        f"{o['n_seeds_modal']}/{n} seeds{f' ({others})' if others else ''}; held-out effect "
        f"{e['mean']:+.3f} ± {e['sd']:.3f} (mean ± SD over seeds; per seed, 95% CI over held-out facts: {per}); "
        f"{SPREAD_NOTE}."
    )
    p = o["n_pass"]

    def bar(b: str) -> str:
        vals = ", ".join(str(r["n_pass"][b]) for r in o["per_seed"])
        return f"{p[b]['mean']:.1f} ± {p[b]['sd']:.1f} ({vals})"

    a = o["best_auroc"]
    counts = (
        f"Heads passing each bar over the {n} seeds (of {o['n_heads']}; mean ± SD, per seed in brackets): "
        f"label-swap null own bar {bar('null_own')}, max-over-heads bar {bar('null_max')}; random directions own "
        f"bar {bar('random_own')}, max-over-heads bar {bar('random_max')}; best held-out AUROC "
        f"{a['mean']:.3f} ± {a['sd']:.3f}."
    )
    return [head, counts]
