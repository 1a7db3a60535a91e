"""Head sweep: where does the model represent "I am lying now", and which heads cause it?

    python analyses/head_sweep.py                      # default model and pairs
    python analyses/head_sweep.py --model gemma-3-270m --dataset capitals --n-pairs 20
    python analyses/head_sweep.py --dataset my_pairs.jsonl   # every row of a pairs file

Writes results/head_sweep/<run>/ (config, behaviour, summary, safetensors results, figures). The
run name comes from the settings and the dataset file's content, so a rerun resumes an
interrupted run and an edited file starts a new one. Every effect is reported with its 95% CI;
held-out AUROCs are compared with the 95th percentile of the maximum over components of a
within-pair label-swap null.
"""

from __future__ import annotations

import sys
import time

import torch

from mechlie.core.cli import RunDir, run_script
from mechlie.report.plotting import png_problem, save_figures
from mechlie.studies.head_sweep import HeadSweepConfig, patching_summary, run_head_sweep, summarize, sweep_figures


def main(cfg: HeadSweepConfig, run: RunDir) -> dict:
    from mechlie.core.models import load_model  # imported late: flags and inputs are checked first

    torch.manual_seed(cfg.seed)
    t0 = time.time()
    times = {}
    model = load_model(cfg.model)
    times["load_model"] = time.time() - t0
    res = run_head_sweep(cfg, model, run)
    times["sweep"] = time.time() - t0 - sum(times.values())
    ps = patching_summary(res)  # bootstrapped once for the summary and the figures
    summary = summarize(res, ps=ps)
    times["summary"] = time.time() - t0 - sum(times.values())
    summary["figures"] = save_figures(sweep_figures(res, ps=ps), run.path)
    times["figures"] = time.time() - t0 - sum(times.values())
    if cfg.views:
        summary["views"] = head_views(cfg, model, res, summary)
        times["views"] = time.time() - t0 - sum(times.values())
    summary["seconds"] = round(time.time() - t0, 1)
    summary["stage_seconds"] = {k: round(v, 1) for k, v in times.items()}

    b, d = summary["behaviour"], summary["data"]
    print(
        f"\n{cfg.model}, {d['source']}: {d['pairs_used']} pairs used, {summary['n_pairs']} analysed "
        f"({summary['n_train']} train / {summary['n_test']} test pairs, {summary['n_test_facts']} held-out facts)"
    )
    for name in ("all", "known"):
        ci = b[name].get("ci") or {}
        if ci:
            print(
                f"P(truth), {name} pairs (n={b[name]['n']}): honest {_ci(ci['p_truth_honest'])} vs lying "
                f"{_ci(ci['p_truth_lying'])}; logit diff {_ci(ci['logit_diff_honest'], 2)} vs "
                f"{_ci(ci['logit_diff_lying'], 2)}"
            )
    ha = summary["head_auroc"]
    print(
        f"\nHeld-out AUROC, best head L{ha['max']['component'][0]}H{ha['max']['component'][1]}: "
        f"{ha['max']['auroc']:.3f} [{ha['max']['lo']:.3f}, {ha['max']['hi']:.3f}]; max-null 95% bar "
        f"{ha['null']['max_bar_95']:.3f} ({ha['null']['n_pass']}/{ha['n_components']} heads pass); random-direction "
        f"bar {ha['random']['max_bar_95']:.3f} ({ha['random']['n_pass']} pass)"
    )
    print(
        f"\nTop heads by patching effect (logit diff; 0 = lying, 1 = honest; 95% CI over "
        f"{summary['patching']['n_pairs']} pairs; share of resamples top-1 / in top {cfg.top_k}):"
    )
    for t in summary["top_heads_by_patching"]:
        print(
            f"  L{t['layer']:>2}H{t['head']}: {t['effect']:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}]  "
            f"top-1 {t['top1_share']:.2f}, top-{cfg.top_k} {t['topk_share']:.2f}  (AUROC {t['auroc']:.2f})"
        )
    if summary.get("views"):
        print(f"\nHead views (top 3 heads, {VIEW_PAIRS} held-out pairs): {summary['views']}")
    for w in summary["warnings"]:
        print(f"\nWARNING: {w}")
    if png_problem():
        print(f"\n{png_problem()}")
    stages = ", ".join(f"{k} {v} s" for k, v in summary["stage_seconds"].items())
    figs = ", ".join(summary["figures"])
    print(f"\nWrote {run.path}/: figures {figs} (.html/.png) in {summary['seconds']} s ({stages})")
    return summary


VIEW_PAIRS = 8  # held-out pairs shown in the head views (one batch of 16 prompts: a few seconds)


def head_views(cfg: HeadSweepConfig, model, res, summary: dict) -> str | None:
    """circuitsvis views of the top 3 heads by patching effect (mechlie.report.views), on the first
    VIEW_PAIRS patched pairs; None, with a warning, when the prompts are not few-shot."""
    from mechlie.core.pairs import PairError
    from mechlie.report.views import write_head_views

    top3 = [(t["layer"], t["head"]) for t in summary["top_heads_by_patching"][:3]]
    by_fact = {p.fact_id: p for p in res.pairs}
    pairs = [by_fact[f] for f in res.patch_pairs[:VIEW_PAIRS]]
    try:
        return str(write_head_views(model, pairs, top3, res.run_dir, n_boot=cfg.n_boot, seed=cfg.seed))
    except PairError as e:  # e.g. instruct prompts have no demonstrations to attend to
        summary["warnings"].append(f"head views not written: {e}")
        return None


def _ci(e: dict, p: int = 3) -> str:
    return f"{e['mean']:.{p}f} [{e['lo']:.{p}f}, {e['hi']:.{p}f}]"


if __name__ == "__main__":
    sys.exit(run_script(HeadSweepConfig, main, doc=__doc__))
