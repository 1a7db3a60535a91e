"""Per-head patching at the final position: mechlie vs TransformerLens's patching, same work.

    python benchmarks/bench_patching.py [--model smollm2-135m-instruct] [--n 4] [--tl-layers 3]
        [--device cpu] [--dtype float32] [--threads 0]

Both patch every head's z (and every layer's resid_pre) from the honest into the lying run at
the final token, on the same n equal-length pairs (TransformerLens's functions take unpadded
batches), with the same metric. TransformerLens gets one forward pass over the n pairs per
component (``generic_activation_patch`` restricted to the final position); mechlie runs each
patch as a row of a single-token pass over the lying prompt's cached prefix
(:func:`mechlie.core.kv.run_rows`). TransformerLens's head sweep costs the same for every layer, so it
runs on the heads of ``--tl-layers`` evenly spaced layers and its time is scaled to all layers
(stated in the output); the numbers of both are compared on those heads. Printed: times, the
speed-up measured in this run, the largest difference of the normalized effects, peak memory.

Profile (cProfile, 2 pairs x 270 heads of SmolLM2-135M, 2 CPU threads, the engine before this
rewrite, which was about 12x faster than TransformerLens): 13.0 s in all, of which 8.8 s were
spent making and using the repeated key/value cache inside TransformerLens's attention, in every
layer of every single-token pass: ``repeat_interleave`` of grouped key/value heads (1.9 s), the
attention-score and z matmuls over the materialised cache (1.9 s + 1.5 s), ``contiguous`` copies
(1.3 s), re-applying the rotary embedding to every cached key (1.7 s) and the ``cat`` of new onto
cached keys (0.3 s). The useful work, the linear layers of the new token's rows (MLPs,
projections, unembedding), took 2.3 s. Hence the fixes in :mod:`mechlie.core.kv`: attention against
each prompt's prefix computed directly (keys position-encoded once, grouped heads by reshaping
the queries, no copies), rows of several prompts in one pass, rows running only from the block
where they are patched (half the row-blocks for a head sweep), ``torch.inference_mode``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from test_patching import tl_reference  # noqa: E402  (the TL call, shared with the equality test)

from mechlie.causal.patching import patch_final_position  # noqa: E402
from mechlie.core.models import load_model  # noqa: E402
from mechlie.core.pairs import load_builtin, tokenize  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=4, help="pairs")
    ap.add_argument(
        "--tl-layers", type=int, default=3, help="layers whose heads TransformerLens patches (time scaled to all)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.tl_layers < 1:
        ap.error("--n and --tl-layers must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    rss_model = peak_rss_mb()
    pairs = load_builtin("all", "fewshot", tokenizer=model.tokenizer)
    lens = [(len(tokenize(model, [p.honest]).tokens[0]), len(tokenize(model, [p.lying]).tokens[0])) for p in pairs]
    target = max({a for a, b in lens if a == b}, key=lambda L: sum(1 for a, b in lens if a == b == L))
    same = [p for p, (a, b) in zip(pairs, lens) if a == b == target][: args.n]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    tl_layers = sorted({round(i * (L - 1) / max(1, args.tl_layers - 1)) for i in range(args.tl_layers)})
    print(
        f"{args.model} on {args.device} ({torch.get_num_threads()} threads): {len(same)} pairs of {target} tokens, "
        f"{L}x{H} heads; TransformerLens on the heads of layers {tl_layers}, time scaled x{L / len(tl_layers):.1f}"
    )
    patch_final_position(model, same[:1], "resid_pre", progress=False)  # warm-up
    for kind in ("z", "resid_pre"):
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        sync()
        t, c = time.perf_counter(), time.process_time()
        ours = patch_final_position(model, same, kind, progress=False)
        sync()
        t_ours, c_ours = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        scale = L / len(tl_layers) if kind == "z" else 1.0
        ref = tl_reference(model, same, kind, layers=tl_layers if kind == "z" else None)
        t_tl, c_tl = (time.perf_counter() - t) * scale, (time.process_time() - c) * scale
        diff = (ours.effect()[tl_layers] - ref if kind == "z" else ours.effect() - ref).abs().max().item()
        # CPU time (all threads) is printed beside wall time: on a shared machine it is the steadier measure.
        print(
            f"{kind:>9}: mechlie {t_ours:7.2f} s wall, {c_ours:7.2f} s CPU | TransformerLens {t_tl:8.2f} s wall, "
            f"{c_tl:8.2f} s CPU{' (scaled)' if kind == 'z' else ''} | speed-up x{t_tl / t_ours:5.1f} wall, "
            f"x{c_tl / c_ours:5.1f} CPU | max |Δ effect| {diff:.1e}"
        )
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if args.device.startswith("cuda") else ""
    print(f"peak RSS {peak_rss_mb():.0f} MiB (after loading the model: {rss_model:.0f} MiB){gpu}")


if __name__ == "__main__":
    main()
