"""The head sweep's JSON summary: every effect with its 95% CI and its controls, both null bars per
head, the layer choice over split seeds, the headline over split seeds (``over_split_seeds``, from
:mod:`mechlie.studies.head_sweep_seeds`), and what the label-swap null tests.

Computed from a :class:`mechlie.studies.head_sweep.SweepData`; written as ``summary.json`` and read
back by :class:`mechlie.studies.head_sweep_result.HeadSweepResult` (whose docstring lists the keys
its headline reads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mechlie.core import stats
from mechlie.core.kv import top_heads
from mechlie.studies.head_sweep_result import LABEL_SWAP_NOTE, bar_notes, per_head_bars

if TYPE_CHECKING:
    from mechlie.studies.head_sweep import SweepData


def _cells(head: tuple[int, int], grids: dict) -> dict[str, float]:
    """The value of ``head`` (layer, head) in each [layer, head] grid, as a float, by the grid's name."""
    return {name: float(g[head]) for name, g in grids.items()}


def patching_summary(res: SweepData, k: int | None = None) -> dict:
    """Patching effects with 95% CIs over pairs, and the rank stability of the top heads."""
    cfg = res.config
    k = k or cfg.top_k
    z = res.head_patch.effect_ci("logit_diff", n_boot=cfg.n_boot, seed=cfg.seed)
    zp = res.head_patch.effect_ci("p_truth", n_boot=cfg.n_boot, seed=cfg.seed)
    r = res.resid_patch.effect_ci("logit_diff", n_boot=cfg.n_boot, seed=cfg.seed)
    rp = res.resid_patch.effect_ci("p_truth", n_boot=cfg.n_boot, seed=cfg.seed)
    top1, topk = stats.rank_stability(z.draws, k)
    grids = {
        "effect": z.mean,
        "lo": z.lo,
        "hi": z.hi,
        "effect_p_truth": zp.mean,
        "p_truth_lo": zp.lo,
        "p_truth_hi": zp.hi,
        "top1_share": top1,
        f"top{k}_share": topk,  # with k = 1 this replaces the value above (as it always did)
        "topk_share": topk,
        "auroc": res.heads.auroc,
    }
    heads = [
        {"rank": rank, "layer": l, "head": hd, **_cells((l, hd), grids)}
        for rank, (l, hd) in enumerate(top_heads(z.mean, k), start=1)
    ]
    return {
        "z": z,
        "z_p_truth": zp,
        "resid": r,
        "resid_p_truth": rp,
        "top1": top1,
        "topk": topk,
        "top_heads": heads,
    }


def _patching_block(res: SweepData, ps: dict) -> dict:
    """The summary's ``patching`` entry: the baselines and the per-layer residual patching effects."""
    hp = res.head_patch
    return {
        "n_pairs": len(res.patch_pairs),
        "honest_logit_diff": float(hp.clean.logit_diff.mean()),
        "lying_logit_diff": float(hp.corrupt.logit_diff.mean()),
        "honest_p_truth": float(hp.clean.p_truth.mean()),
        "lying_p_truth": float(hp.corrupt.p_truth.mean()),
        "resid_effect_logit_diff": ps["resid"].mean.tolist(),
        "resid_effect_logit_diff_lo": ps["resid"].lo.tolist(),
        "resid_effect_logit_diff_hi": ps["resid"].hi.tolist(),
        "resid_effect_p_truth": ps["resid_p_truth"].mean.tolist(),
        "n_boot": res.config.n_boot,
        "resid_effect_p_truth_lo": ps["resid_p_truth"].lo.tolist(),
        "resid_effect_p_truth_hi": ps["resid_p_truth"].hi.tolist(),
    }


def summarize(res: SweepData, k: int | None = None, ps: dict | None = None) -> dict:
    """The JSON summary of a head sweep: every effect with its 95% CI and its many-draw control
    (``ps``: :func:`patching_summary` of the same ``res`` and ``k``, if already computed)."""
    cfg = res.config
    k = k or cfg.top_k
    h, r = res.heads, res.resid
    ps = ps or patching_summary(res, k)
    beh = res.behaviour
    grids = {
        "auroc": h.auroc,
        "lo": h.auroc_lo,
        "hi": h.auroc_hi,
        "null_q95": h.null_q95,
        "random_mean": h.random_mean,
        "random_q95": h.random_q95,
    }
    auroc_heads = [
        {
            "layer": l,
            "head": hd,
            **_cells((l, hd), grids),
            "beats_null_max_bar": bool(h.beats_null[l, hd]),
            "beats_null_own_bar": bool(h.beats_null_own[l, hd]),
            "beats_random_max_bar": bool(h.beats_random[l, hd]),
            "beats_random_own_bar": bool(h.beats_random_own[l, hd]),
            "patch_effect": float(ps["z"].mean[l, hd]),
        }
        for l, hd in top_heads(h.auroc, k)
    ]
    return {
        "kind": "head_sweep",
        "model": cfg.model,
        "dataset": cfg.dataset,
        "fmt": cfg.fmt,
        "data": res.data,
        "n_pairs": len(res.pairs),
        "n_train": len(res.split.train),
        "n_test": len(res.split.test),
        "n_test_facts": h.n_test_facts,
        "warnings": res.warnings,
        "behaviour": {
            "all": {**beh["all"], "ci": beh["all_ci"]},
            "known": {**beh.get("known_pairs", {}), "ci": beh.get("known_ci", {})},
        },
        "head_auroc": {
            **h.summary(),
            "null_mean_per_head_range": [float(h.null_mean.min()), float(h.null_mean.max())],
            "per_head": per_head_bars(h),
        },
        "resid_auroc": {
            **r.summary(),
            "per_layer": r.auroc.tolist(),
            "per_layer_lo": r.auroc_lo.tolist(),
            "per_layer_hi": r.auroc_hi.tolist(),
            "null_mean": r.null_mean.tolist(),
            "null_q95": r.null_q95.tolist(),
            "random_mean": r.random_mean.tolist(),
            "random_q95": r.random_q95.tolist(),
            **({"over_seeds": res.layer_seeds.summary()} if res.layer_seeds is not None else {}),
        },
        "patching": _patching_block(res, ps),
        "top_heads_by_patching": ps["top_heads"],
        "top_heads_by_auroc": auroc_heads,
        "top_k": k,
        **({"over_split_seeds": res.split_seeds} if res.split_seeds is not None else {}),
        "notes": [LABEL_SWAP_NOTE, *bar_notes(h)],
    }
