"""Behaviour before any interpretability: every built-in relation × format, honest vs. lying.

    python analyses/behaviour_report.py [--model gemma-3-270m] [--n-pairs 0]

Prints P(truth), logit difference, acc / lie_acc / known_lie_acc / lie rate and choice_cov, and
writes results/behaviour/<model>/behaviour.json.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from mechlie.io import atomic_write_json, ensure_writable_dir
from mechlie.metrics import behaviour
from mechlie.models import DEFAULT_MODEL, load_model
from mechlie.pairs import FORMATS, RELATIONS, load_builtin


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n-pairs", type=int, default=0, help="pairs per relation (0 = all)")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--out-dir", default="results/behaviour")
    args = ap.parse_args(argv)
    out = ensure_writable_dir(Path(args.out_dir) / Path(args.model).name)
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    rows = {}
    print(f"{'format':8} {'relation':10} {'n':>4} {'known':>5} {'acc':>5} {'P(T)hon':>7} {'P(T)lie':>7} "
          f"{'LDhon':>6} {'LDlie':>6} {'lie_rate':>8} {'cov_lie':>7}")
    for fmt in args.formats:
        for rel in RELATIONS:
            pairs = load_builtin(rel, fmt, tokenizer=model.tokenizer, n=args.n_pairs or None)
            s = behaviour(model, pairs, progress=False).summary()
            rows[f"{fmt}/{rel}"] = s
            print(f"{fmt:8} {rel:10} {s['n']:>4} {s['n_known']:>5} {s['acc']:5.2f} {s['p_truth_honest']:7.3f} "
                  f"{s['p_truth_lying']:7.3f} {s['logit_diff_honest']:6.2f} {s['logit_diff_lying']:6.2f} "
                  f"{s['lie_rate']:8.2f} {s['choice_cov_lying']:7.2f}", flush=True)
    path = atomic_write_json(out / "behaviour.json", {"model": args.model, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
