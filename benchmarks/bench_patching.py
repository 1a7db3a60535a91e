"""Per-head patching at the final position: mechlie vs TransformerLens's patching, same work.

    python benchmarks/bench_patching.py [--model smollm2-135m-instruct] [--n 4]

Both patch every head's z (and every layer's resid_pre) from the honest into the lying run at
the final token, on the same n equal-length pairs (TransformerLens's functions take unpadded
batches), with the same metric. TransformerLens gets one forward pass over the n pairs per
component (generic_activation_patch restricted to the final position); mechlie reuses the
lying prompt's KV cache and runs the components as rows of single-token passes. The printed
figures are ratios measured in this run, plus the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from mechlie.models import load_model  # noqa: E402
from mechlie.pairs import load_builtin, tokenize  # noqa: E402
from mechlie.patching import patch_final_position  # noqa: E402
from test_patching import tl_reference  # noqa: E402  (the TL call, shared with the equality test)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model, device="cpu")
    pairs = load_builtin("all", "fewshot", tokenizer=model.tokenizer)
    lens = [(len(tokenize(model, [p.honest]).tokens[0]), len(tokenize(model, [p.lying]).tokens[0])) for p in pairs]
    target = max({a for a, b in lens if a == b}, key=lambda L: sum(1 for a, b in lens if a == b == L))
    same = [p for p, (a, b) in zip(pairs, lens) if a == b == target][: args.n]
    print(f"{args.model}: {len(same)} pairs of {target} tokens, {model.cfg.n_layers}x{model.cfg.n_heads} heads")
    for kind in ("z", "resid_pre"):
        t = time.perf_counter()
        ours = patch_final_position(model, same, kind, progress=False)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        ref = tl_reference(model, same, kind)
        t_tl = time.perf_counter() - t
        diff = (ours.effect() - ref).abs().max().item()
        print(f"{kind:>9}: mechlie {t_ours:7.2f} s | TransformerLens {t_tl:7.2f} s | speed-up x{t_tl / t_ours:5.1f} "
              f"| max |Δ effect| {diff:.1e}")


if __name__ == "__main__":
    main()
