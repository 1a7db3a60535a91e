"""The localise study's checks of its own numbers: known facts, the ranking's variance, other splits,
and what the receiver head attends to in both framings.

- **Known facts** (:func:`single_head_effects`, :func:`known_rows`): the head sweep keeps facts the
  model knows, so localise does too, with the same definition (:data:`KNOWN_DEFINITION`): the
  honest prompt's top-1 next token is a spelling of the truth (``AnswerScores.correct`` of the
  honest run, :attr:`mechlie.core.metrics.Behaviour.known`). It is read off the unpatched honest
  runs of the single-head patching pass, so it costs no extra forward pass.
- **Re-ranked bootstrap** (:func:`reranked_ci`): the minimal set's CI from
  :func:`mechlie.causal.circuits.rerank_minimal_k`, which resamples the training pairs, re-ranks
  the heads on them, resamples the test pairs and finds the minimal set again. The restore
  direction only (the headline number); the curve's own CI (test pairs only) stays beside it.
- **Split seeds** (:func:`split_seeds`): the minimal k on ``n_split_seeds`` splits of the same
  known facts (seeds ``seed``, ``seed + 1``, ...), each ranked on its own training facts and
  searched on its own held-out facts: a distribution, not one number. The splits share facts, so
  their spread is the split-to-split variation, not a CI over independent samples of facts.
- **Receiver attention** (:func:`receiver_attention`): the share of the receiver's final-token
  attention on the demonstrations' answers in the honest and in the lying prompt, with 95% CIs
  over held-out pairs (:func:`mechlie.report.views.head_readout`). A head that reads the
  demonstrations' answers in both framings copies whatever the demonstrations say; it does not
  look for falseness.

Each search stops at ``k_max`` heads: a resample or split that has not reached the threshold by
then counts as ``k_max + 1`` ("more than k_max").
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from mechlie.causal.patching import PatchResult
    from mechlie.core.pairs import ContrastPair

log = logging.getLogger("mechlie")

KNOWN_DEFINITION = (
    "first-token known: the honest prompt's top-1 next token is a spelling of the truth (or its first token); "
    "mechlie.core.metrics.Behaviour.known, the filter the head sweep's known_only applies"
)


def single_head_effects(model: HookedTransformer, pairs: Sequence[ContrastPair], batch_size: int = 16) -> PatchResult:
    """Each head's ``z`` patched honest -> lying at the final position, per pair (restore)."""
    from mechlie.causal.circuits import patch_sides
    from mechlie.causal.patching import patch_runs
    from mechlie.core.pairs import answer_set

    src, tgt = patch_sides(pairs, "restore")
    return patch_runs(model, src, tgt, answer_set(model.tokenizer, pairs), "z", batch_size=batch_size, progress=False)


def rows(res: PatchResult, idx: Sequence[int]) -> PatchResult:
    """``res`` restricted to the pairs ``idx`` (its per-pair scores and both baselines)."""
    i = torch.as_tensor(list(idx), dtype=torch.long)

    def pick(s):
        return dataclasses.replace(
            s, **{f.name: getattr(s, f.name)[i] for f in dataclasses.fields(s) if getattr(s, f.name) is not None}
        )

    return dataclasses.replace(
        res, p_truth=res.p_truth[i], logit_diff=res.logit_diff[i], clean=pick(res.clean), corrupt=pick(res.corrupt)
    )


def known_rows(single: PatchResult, pairs: Sequence[ContrastPair], known_only: bool) -> tuple[list[int], dict]:
    """The pairs kept (known facts, unless ``known_only`` is False) and what the filter did."""
    known = single.clean.correct.bool()
    keep = [i for i in range(len(pairs)) if bool(known[i]) or not known_only]
    info = {
        "applied": known_only,
        "definition": KNOWN_DEFINITION,
        "n_loaded": len(pairs),
        "n_known": int(known.sum()),
        "n_kept": len(keep),
        "n_dropped_unknown": len(pairs) - len(keep),
    }
    log.info(
        "known filter: %d of %d pairs known, %d kept (%d dropped: the honest prompt's top-1 token is not the truth)",
        info["n_known"],
        len(pairs),
        len(keep),
        info["n_dropped_unknown"],
    )
    return keep, info


def _evaluator(model, test: Sequence[ContrastPair], batch_size: int):
    """Joint patching of head sets on ``test`` (restore), the honest runs collected once."""
    from mechlie.causal.circuits import joint_patch, source_z

    source = source_z(model, [p.honest for p in test], batch_size)

    def evaluate(sets):
        return joint_patch(model, test, sets, direction="restore", batch_size=batch_size, progress=False, source=source)

    return evaluate


def reranked_ci(model, single_train: PatchResult, test: Sequence[ContrastPair], reference, cfg) -> tuple[dict, Tensor]:
    """The restore minimal k's CI with the heads re-ranked on every resample of the training pairs."""
    from mechlie.causal.circuits import rank_on, rerank_minimal_k

    rr = rerank_minimal_k(
        lambda i: rank_on(single_train, i),
        _evaluator(model, test, cfg.batch_size),
        len(single_train.p_truth),
        len(test),
        threshold=cfg.threshold,
        n_boot=cfg.n_rerank,
        seed=cfg.seed,
        k_max=cfg.k_max,
        reference=reference,
    )
    return rr.summary(), rr.minimal_k


def split_seeds(model, pairs: Sequence[ContrastPair], single: PatchResult, cfg) -> dict:
    """The restore minimal k on ``cfg.n_split_seeds`` splits of ``pairs`` by fact (``single``: their
    per-pair single-head effects), each ranked on its training facts, searched on its held-out facts."""
    from mechlie.causal.circuits import rank_on, search_minimal_k
    from mechlie.read.directions import split_by_fact

    facts = [p.fact_id for p in pairs]
    k_max = min(cfg.k_max, single.p_truth[0].numel())
    per_seed = []
    for s in range(cfg.seed, cfg.seed + cfg.n_split_seeds):
        sp = split_by_fact(facts, test_frac=cfg.test_frac, seed=s)
        ranking = rank_on(single, torch.tensor(sp.train))
        test = [pairs[i] for i in sp.test]
        k = float(
            search_minimal_k(
                [ranking], [None], _evaluator(model, test, cfg.batch_size), threshold=cfg.threshold, k_max=k_max
            )[0]
        )
        per_seed.append(
            {
                "seed": s,
                "n_train": len(sp.train),
                "n_test": len(sp.test),
                "minimal_k": int(k) if math.isfinite(k) else None,
                "top5": [list(h) for h in ranking[:5]],
            }
        )
        log.info("split seed %d: minimal k %s (top head L%dH%d)", s, per_seed[-1]["minimal_k"], *ranking[0])
    ks = torch.tensor([float(r["minimal_k"] or k_max + 1) for r in per_seed])
    top1 = [tuple(r["top5"][0]) for r in per_seed]
    return {
        "seeds": per_seed,
        "minimal_k": [r["minimal_k"] for r in per_seed],
        "mean": float(ks.mean()),
        "sd": float(ks.std()) if len(ks) > 1 else 0.0,
        "min": float(ks.min()),
        "max": float(ks.max()),
        "n_not_reached": sum(r["minimal_k"] is None for r in per_seed),
        "k_max": k_max,
        "top1_same_share": max(top1.count(h) for h in set(top1)) / len(top1),
        "what": (
            "restore minimal k on each split seed's held-out facts, heads ranked on its training facts; the splits "
            "share facts, so the spread is split-to-split variation (a split that never reaches the threshold by "
            "k_max counts as k_max + 1 in mean/sd/min/max)"
        ),
    }


def receiver_attention(model, pairs: Sequence[ContrastPair], receiver, cfg) -> dict:
    """The receiver's final-token attention on the demonstrations' answers, honest vs lying (95% CIs
    over ``pairs``), and its direct logit attribution; {"error": ...} for prompts without demonstrations."""
    from mechlie.core.pairs import PairError
    from mechlie.report.views import attention_verdict, head_readout, readout_summary

    try:
        r = head_readout(model, pairs, [tuple(receiver)], batch_size=cfg.batch_size)
    except PairError as e:
        return {"error": str(e)}
    row = readout_summary(r, n_boot=cfg.n_boot, seed=cfg.seed)[0]
    return {**row, "pairs": "held-out", "verdict": attention_verdict(row)}


def variance_lines(s: dict) -> list[str]:
    """Sentences on the known filter, the re-ranked CI, the split seeds and the receiver's attention
    (each only when the summary has it: a run from before these checks reads as it did)."""
    out = []
    kf = s.get("known_filter")
    if kf:
        what = "kept" if kf["applied"] else "counted, not applied"
        out.append(
            f"Known facts ({what}): {kf['n_known']} of {kf['n_loaded']} pairs known ({kf['definition']}); "
            f"{kf['n_kept']} analysed."
        )
    rr = s.get("topk_restore", {}).get("minimal_k_rerank")
    if rr:
        lo, hi = rr["ci"]
        more = f" ({rr['n_not_reached']} never reached it by k={rr['k_max']})" if rr["n_not_reached"] else ""
        out.append(
            f"Restore minimal k with the heads re-ranked on each of {rr['n_resamples']} resamples of the training "
            f"pairs (and the test pairs resampled): 95% CI [{lo:.0f}, {hi:.0f}], median {rr['median']:.0f}{more}; "
            f"the top head stays top-1 in {rr['top1_share']:.0%} of resamples."
        )
    sd = s.get("split_seeds")
    if sd:
        ks = ", ".join("-" if k is None else str(k) for k in sd["minimal_k"])
        out.append(
            f"Restore minimal k over {len(sd['seeds'])} split seeds: {ks} (mean {sd['mean']:.1f} ± SD {sd['sd']:.1f}, "
            f"range {sd['min']:.0f}-{sd['max']:.0f}; '-' = not reached by k={sd['k_max']}); the same top head in "
            f"{sd['top1_same_share']:.0%} of splits."
        )
    ra = s.get("receiver_attention")
    if ra and "verdict" in ra:
        out.append(
            f"Receiver attention on the demonstrations' answers ({ra['n']} held-out pairs): {ra['verdict']} "
            "It reads the demonstrations' answers in both framings."
        )
    elif ra:
        out.append(f"Receiver attention not measured: {ra['error']}")
    return out
