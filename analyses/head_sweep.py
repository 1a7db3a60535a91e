"""Head sweep: where does the model represent "I am lying now", and which heads cause it?

    python analyses/head_sweep.py                      # default model and pairs
    python analyses/head_sweep.py --model gemma-3-270m --dataset capitals --n-pairs 20

Writes results/head_sweep/<run>/ (config, behaviour, summary, tensors, figures) and resumes an
interrupted run with the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

import torch

from mechlie.head_sweep import HeadSweepConfig, run_head_sweep, summarize, sweep_figures
from mechlie.io import atomic_write_json
from mechlie.models import load_model
from mechlie.plotting import png_problem, save_figure


def parse_args(argv=None) -> HeadSweepConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = HeadSweepConfig()
    p.add_argument("--model", default=d.model, help="embedded name, .gguf file, HF dir, or TL name")
    p.add_argument("--dataset", default=d.dataset, help="capitals|cities|languages|opposites|all or a .csv/.jsonl")
    p.add_argument("--format", dest="fmt", default=d.fmt, choices=["instruct", "fewshot", "both"])
    p.add_argument("--n-pairs", type=int, default=d.n_pairs, help="pairs per relation (0 = all)")
    p.add_argument("--n-patch", type=int, default=d.n_patch, help="pairs to patch")
    p.add_argument("--all-facts", dest="known_only", action="store_false", help="keep facts the model gets wrong")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--out-dir", default=d.out_dir)
    p.add_argument("--run-name", default=d.run_name)
    return HeadSweepConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "kaleido", "choreographer", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    model = load_model(cfg.model)
    res = run_head_sweep(cfg, model)
    summary = summarize(res)
    run = cfg.run_dir
    written = {name: save_figure(fig, run / name) for name, fig in sweep_figures(res).items()}
    summary["figures"] = written
    summary["seconds"] = round(time.time() - t0, 1)
    summary["config"] = dataclasses.asdict(cfg)
    atomic_write_json(run / "summary.json", summary)

    b = summary["behaviour"]
    print(f"\n{cfg.model}: {summary['n_pairs']} known pairs ({summary['n_train']} train / {summary['n_test']} test)")
    print(f"P(truth) honest {b['p_truth_honest']:.3f} vs lying {b['p_truth_lying']:.3f}; "
          f"logit diff {b['logit_diff_honest']:.2f} vs {b['logit_diff_lying']:.2f}; lie rate {b['lie_rate']:.2f}")
    print("\nTop heads by patching effect (logit diff; 0 = lying, 1 = honest):")
    for t in summary["top_heads_by_patching"]:
        print(f"  L{t['layer']:>2}H{t['head']}: effect {t['effect']:+.3f} (P(truth) {t['effect_p_truth']:+.3f}), AUROC {t['auroc']:.2f}")
    print("\nTop heads by held-out AUROC [shuffled-label / random-direction controls]:")
    for t in summary["top_heads_by_auroc"]:
        print(f"  L{t['layer']:>2}H{t['head']}: AUROC {t['auroc']:.3f} [{t['auroc_shuffled']:.2f} / {t['auroc_random']:.2f}], patch {t['patch_effect']:+.3f}")
    if png_problem():
        print(f"\n{png_problem()}")
    print(f"\nWrote {run}/: config.json, behaviour.json, summary.json, activations.pt, directions.pt, "
          f"patching.pt, figures {', '.join(written)} (.html/.png) in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
