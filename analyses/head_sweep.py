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

from mechlie.cli import RunDir, run_script
from mechlie.head_sweep import HeadSweepConfig, run_head_sweep, summarize, sweep_figures
from mechlie.plotting import png_problem, save_figure


def main(cfg: HeadSweepConfig, run: RunDir) -> dict:
    from mechlie.models import load_model  # imported late: flags and inputs are checked first

    torch.manual_seed(cfg.seed)
    t0 = time.time()
    model = load_model(cfg.model)
    res = run_head_sweep(cfg, model, run)
    summary = summarize(res)
    summary["figures"] = {name: save_figure(fig, run.path / name) for name, fig in sweep_figures(res).items()}
    summary["seconds"] = round(time.time() - t0, 1)

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
    for w in summary["warnings"]:
        print(f"\nWARNING: {w}")
    if png_problem():
        print(f"\n{png_problem()}")
    print(f"\nWrote {run.path}/: figures {', '.join(summary['figures'])} (.html/.png) in {summary['seconds']} s")
    return summary


def _ci(e: dict, p: int = 3) -> str:
    return f"{e['mean']:.{p}f} [{e['lo']:.{p}f}, {e['hi']:.{p}f}]"


if __name__ == "__main__":
    sys.exit(run_script(HeadSweepConfig, main, doc=__doc__))
