"""Speed of the KV-cached head AIE sweep and of attribution patching vs. the naive loop.

    HF_HUB_OFFLINE=1 python benchmarks/bench_function_vectors.py [--n 2] [--naive-layers 2]

The naive baseline reruns the whole prompt once per (prompt, head) with that head's final-position
``z`` patched (:func:`mechlie.causal.function_vectors.head_aie_naive`). Every timing is taken in this run,
on the same prompts:

1. same work: the cached engine and the naive loop on the heads of the first ``--naive-layers``
   layers (results checked equal);
2. full sweep: the cached engine on all heads vs. the naive loop's per-head time x all heads (the
   naive loop's cost is one identical forward pass per head, so it is linear in the head count;
   ``--naive-layers 0`` runs the naive loop on all heads instead of extrapolating);
3. attribution patching (2 forward + 1 backward, all heads at once) vs. the naive loop over all
   heads (exact patching), and vs. the cached exact patching of every head.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from mechlie.causal.attribution import attribute_pairs
from mechlie.causal.function_vectors import head_aie, head_aie_naive, mean_head_activations
from mechlie.causal.patching import patch_final_position
from mechlie.core.models import DEFAULT_MODEL, load_model
from mechlie.core.pairs import answer_set, corrupted_fewshot, load_builtin, tokenize


@dataclass
class Config:
    model: str = DEFAULT_MODEL
    n: int = 2  # prompts
    naive_layers: int = 2  # layers whose heads the naive loop runs on (0 = all)
    threads: int = 0  # torch threads (0 = leave as is)


def _time(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(cfg: Config) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    pairs = load_builtin("capitals", "fewshot", tokenizer=model.tokenizer, n=cfg.n)
    ans = answer_set(model.tokenizer, pairs)
    lying = tokenize(model, [p.lying for p in pairs])
    corrupt = tokenize(model, [corrupted_fewshot(p) for p in pairs])
    mean_z = mean_head_activations(model, lying).z
    n_sub = L if cfg.naive_layers <= 0 else min(cfg.naive_layers, L)
    heads = [(l, h) for l in range(n_sub) for h in range(H)]
    model(corrupt.tokens[:1, :4])  # warm-up

    t_fast_sub, fast_sub = _time(lambda: head_aie(model, corrupt, ans, mean_z, heads=heads, progress=False))
    t_naive_sub, (naive_p, _) = _time(lambda: head_aie_naive(model, corrupt, ans, mean_z, heads))
    err = (fast_sub.p_truth.reshape(cfg.n, -1)[:, : len(heads)] - naive_p).abs().max().item()
    t_fast_all, _ = _time(lambda: head_aie(model, corrupt, ans, mean_z, progress=False))
    naive_all = t_naive_sub * (L * H) / len(heads)
    t_attr, _ = _time(lambda: attribute_pairs(model, pairs, progress=False))
    t_exact, _ = _time(lambda: patch_final_position(model, pairs, "z", progress=False))

    res = {
        "prompts": cfg.n,
        "prompt_tokens": int(corrupt.tokens.shape[1]),
        "heads_total": L * H,
        "same_work_heads": len(heads),
        "same_work_naive_s": t_naive_sub,
        "same_work_cached_s": t_fast_sub,
        "same_work_speedup": t_naive_sub / t_fast_sub,
        "max_abs_diff_p_truth": err,
        "full_sweep_cached_s": t_fast_all,
        "full_sweep_naive_s": naive_all,
        "naive_extrapolated": len(heads) < L * H,
        "full_sweep_speedup": naive_all / t_fast_all,
        "attribution_s": t_attr,
        "attribution_speedup_vs_naive": naive_all / t_attr,
        "cached_exact_patching_s": t_exact,
        "attribution_speedup_vs_cached_exact": t_exact / t_attr,
    }
    print(f"{cfg.n} prompts of {res['prompt_tokens']} tokens, {L}x{H} heads, torch threads {torch.get_num_threads()}")
    print(
        f"same work ({len(heads)} heads): naive {t_naive_sub:.1f}s, cached {t_fast_sub:.2f}s -> "
        f"{res['same_work_speedup']:.1f}x  (max |ΔP| {err:.1e})"
    )
    print(
        f"full AIE sweep ({L * H} heads): cached {t_fast_all:.2f}s, naive {naive_all:.1f}s"
        f"{' (extrapolated from the same-work run)' if res['naive_extrapolated'] else ''}"
        f" -> {res['full_sweep_speedup']:.1f}x"
    )
    print(
        f"attribution patching (all heads and positions): {t_attr:.2f}s -> "
        f"{res['attribution_speedup_vs_naive']:.1f}x vs naive, "
        f"{res['attribution_speedup_vs_cached_exact']:.1f}x vs cached exact patching ({t_exact:.2f}s)"
    )
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=Config.model)
    ap.add_argument("--n", type=int, default=Config.n)
    ap.add_argument("--naive-layers", type=int, default=Config.naive_layers)
    ap.add_argument("--threads", type=int, default=Config.threads)
    main(Config(**vars(ap.parse_args())))
