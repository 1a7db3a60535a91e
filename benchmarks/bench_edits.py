"""Time one learned edit's training on the embedded default (issue 12: at most 3 minutes on 2 cores).

    flock /tmp/mechlie-cpu.lock python benchmarks/bench_edits.py [--steps 30] [--naive-steps 3]

Setting as in ``analyses/steering_demo.py``'s defaults: SmolLM2-135M-Instruct, the built-in pairs (20 per
relation, few-shot), the training facts of the demo's split (32 pairs used), its 16 training neutral lines,
vectors at blocks 8 and 14, KL budget 0.05. Two configurations:

- naive (the first version): all 16 training pairs of a batch and all 16 neutral lines in every step, each
  forward from the embeddings; timed for ``--naive-steps`` steps and extrapolated to ``--steps``;
- fast (the default ``TrainConfig``): 8 pairs and 8 neutral lines per step (seeded minibatches), and
  blocks 0-7 run once before training (the edit starts at block 8, so their output is fixed).

Prints the seconds of each part and the ratio, then times the gated vector at block 19 (fast settings).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from mechlie.control import edits
from mechlie.core.models import load_model
from mechlie.core.pairs import load_builtin, neutral_lines
from mechlie.studies import steering_eval as se


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--naive-steps", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.05)
    args = ap.parse_args()
    t0 = time.time()
    model = load_model("smollm2-135m-instruct")
    pairs = load_builtin("all", "fewshot", tokenizer=model.tokenizer, n=20, seed=0)
    split = se.split_three([p.fact_id for p in pairs], seed=0)
    train = [pairs[i] for i in split.train]
    neutral = se.split_lines(neutral_lines(), 0)[0]
    layers = [8, 14]
    print(f"model loaded in {time.time() - t0:.1f} s; torch threads {torch.get_num_threads()}")
    print(f"{min(32, len(train))} training pairs, {len(neutral)} neutral lines, layers {layers}")

    naive = edits.TrainConfig(
        kl_budget=args.budget,
        steps=args.naive_steps,
        max_pairs=32,
        batch_size=16,
        neutral_per_step=None,
        skip_frozen=False,
        progress=False,
    )
    e = edits.train_vector(model, train, neutral, layers, naive)
    per_step = e.info["seconds_steps"] / args.naive_steps
    # the first version bisected 14 times (here 10): scale the projection's time accordingly
    naive_total = e.info["seconds_setup"] + args.steps * per_step + e.info["seconds_projection"] * 14 / 10
    print(
        f"naive: {per_step:.2f} s/step (over {args.naive_steps} steps), setup {e.info['seconds_setup']:.1f} s, "
        f"projection {e.info['seconds_projection']:.1f} s -> {args.steps} steps ~ {naive_total:.0f} s"
    )

    fast = edits.TrainConfig(kl_budget=args.budget, steps=args.steps, max_pairs=32, progress=False)
    e = edits.train_vector(model, train, neutral, layers, fast)
    i = e.info
    print(
        f"fast: {i['seconds_steps'] / args.steps:.2f} s/step, setup {i['seconds_setup']:.1f} s, "
        f"{args.steps} steps {i['seconds_steps']:.1f} s, projection {i['seconds_projection']:.1f} s "
        f"(scale {i['projection_scale']:.3f}), total {i['seconds']:.1f} s; train KL {i['train_kl']:.4f}"
    )
    print(f"one learned edit: {i['seconds']:.0f} s (target <= 180 s); naive / fast = {naive_total / i['seconds']:.1f}x")
    g = edits.train_gated(model, train, neutral, 19, fast).info  # the gated edit the demo chooses
    print(
        f"gated vector at block 19: {g['seconds']:.1f} s (setup {g['seconds_setup']:.1f} s, the gate's probe "
        f"{g['seconds_gate_probe']:.1f} s, steps {g['seconds_steps']:.1f} s); train KL {g['train_kl']:.4f}"
    )
    # ru_maxrss is in KiB on Linux: the process's peak, model and both runs included
    print(f"peak memory (RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
