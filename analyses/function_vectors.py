"""Lie function vector (Todd et al. 2023) on few-shot lying prompts; see mechlie.function_vectors.

    HF_HUB_OFFLINE=1 python analyses/function_vectors.py [--n-per-relation 4] [--k 10] [--run NAME]

Writes results/function_vectors/<run>/{config.json, summary.json, tensors.pt, *.html, *.png}.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from mechlie.directions import split_by_fact
from mechlie.function_vectors import AIE_METRICS, VECTOR_NAMES, run_function_vector
from mechlie.io import atomic_torch_save, atomic_write_json, ensure_writable_dir
from mechlie.models import DEFAULT_MODEL, load_model
from mechlie.pairs import load_builtin
from mechlie.patching import patch_final_position
from mechlie.plotting import heatmap, lines, save_figure, side_by_side

CORRUPT_MODES = ("mixed", "permuted")


@dataclass
class Config:
    model: str = DEFAULT_MODEL
    dataset: str = "all"
    n_per_relation: int = 2  # pairs per relation (fewshot format); half train, half test
    test_frac: float = 0.5
    k: int = 10  # heads in the function vector
    layer: int | None = None  # headline layer (default n_layers // 3)
    layer_stride: int = 3  # interventions are measured at every layer_stride-th layer (+ the headline)
    corrupt_mode: str = "mixed"
    metric: str = "truth_drop"  # AIE ranking metric
    n_random: int = 3
    seed: int = 0
    batch_size: int = 16
    out_dir: str = "results/function_vectors"
    run: str = "default"

    def __post_init__(self) -> None:
        if self.corrupt_mode not in CORRUPT_MODES:
            raise ValueError(f"corrupt_mode must be one of {CORRUPT_MODES}")
        if self.metric not in AIE_METRICS:
            raise ValueError(f"metric must be one of {AIE_METRICS}")
        if self.layer_stride < 1 or self.k < 1 or self.n_per_relation < 2 or not 0 < self.test_frac < 1:
            raise ValueError("need k >= 1, n_per_relation >= 2 and 0 < test_frac < 1")


def parse_args(argv=None) -> Config:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        typ = int if f.name == "layer" else type(f.default)
        ap.add_argument(flag, type=typ, default=f.default)
    return Config(**vars(ap.parse_args(argv)))


def main(cfg: Config) -> dict:
    out = ensure_writable_dir(Path(cfg.out_dir) / cfg.run)
    atomic_write_json(out / "config.json", asdict(cfg))
    model = load_model(cfg.model)
    pairs = load_builtin(cfg.dataset, "fewshot", tokenizer=model.tokenizer, n=cfg.n_per_relation)
    split = split_by_fact([p.fact_id for p in pairs], cfg.test_frac, cfg.seed)
    train, test = [pairs[i] for i in split.train], [pairs[i] for i in split.test]
    print(f"{len(train)} training pairs (heads, AIE, FV, diff of means), {len(test)} test pairs (interventions)")

    ex = run_function_vector(
        model, train, test, k=cfg.k, layer=cfg.layer, layers=range(0, model.cfg.n_layers, cfg.layer_stride),
        corrupt_mode=cfg.corrupt_mode, metric=cfg.metric,
        n_random=cfg.n_random, seed=cfg.seed, batch_size=cfg.batch_size,
    )
    # The usual honest -> lying patching on the same training pairs, to compare head rankings.
    patched = patch_final_position(model, train, "z", batch_size=cfg.batch_size)
    patch_effect = patched.effect("p_truth")  # 0 = lying, 1 = honest

    aie, rise = ex.aie.aie("truth_drop"), ex.aie.aie("lie_rise")
    ranking = ex.aie.aie(cfg.metric)
    H = model.cfg.n_heads
    top_patch = [(int(i) // H, int(i) % H) for i in patch_effect.abs().flatten().topk(cfg.k).indices]
    layer = ex.layer
    cos = ex.cosine_fv_dom()

    interventions = {
        name: {
            "base_p_truth": float(r.base.p_truth.mean()),
            "delta_p_truth": ex.effects(r),
            "delta_p_truth_by_layer": {l: ex.effects(r, l) for l in r.layers},
            "best_layer_fv": r.layers[int(r.delta_p_truth()[0].abs().argmax())],
        }
        for name, r in (("honest_plus", ex.honest_plus), ("zero_shot_plus", ex.zero_shot_plus), ("lying_minus", ex.lying_minus))
    }
    gap = ex.honest_plus.base.p_truth.mean() - ex.lying_minus.base.p_truth.mean()
    interventions["lying_minus"]["truth_recovered_fraction"] = {
        k: v / float(gap) for k, v in interventions["lying_minus"]["delta_p_truth"].items() if k in ("fv", "diff_of_means", "random_mean")
    }
    summary = {
        "model": model.cfg.model_name,
        "n_train": len(train),
        "n_test": len(test),
        "corrupted_p_truth": float(ex.aie.base.p_truth.mean()),
        "train_lying_p_truth": float(patched.corrupt.p_truth.mean()),
        "train_honest_p_truth": float(patched.clean.p_truth.mean()),
        "ranking_metric": cfg.metric,
        "top_heads_by_aie": [
            {"layer": l, "head": h, "truth_drop": float(aie[l, h]), "lie_rise": float(rise[l, h])} for l, h in ex.fv.heads
        ],
        "top_heads_by_patching": [{"layer": l, "head": h, "effect_p_truth": float(patch_effect[l, h])} for l, h in top_patch],
        "top_k_overlap_aie_vs_patching": len(set(ex.fv.heads) & set(top_patch)),
        "fv_norm": float(ex.fv.vector.norm()),
        "layer": layer,
        "cosine_fv_vs_diff_of_means": float(cos[layer]),
        "cosine_fv_vs_diff_of_means_by_layer": cos.tolist(),
        "interventions_at_layer": interventions,
        "note": "delta_p_truth: mean over test prompts of P(truth) with the vector minus without, the vector added to "
        "blocks.L.hook_resid_post at the final position (subtracted for lying_minus); every vector at the FV's norm; "
        "random_*: over n_random Gaussian directions (mean of signed effects, mean and max of |effect|).",
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_torch_save(
        out / "tensors.pt",
        {
            "aie_truth_drop": aie, "aie_lie_rise": rise, "aie_p_truth": ex.aie.p_truth, "mean_z": ex.means.z,
            "mean_head_out": ex.means.head_out, "fv": ex.fv.vector, "fv_heads": ex.fv.heads, "diff_of_means": ex.dom,
            "random_dirs": ex.random, "patch_effect_p_truth": patch_effect,
            **{f"{n}_p_truth": getattr(ex, n).p_truth for n in ("honest_plus", "zero_shot_plus", "lying_minus")},
            **{f"{n}_base_p_truth": getattr(ex, n).base.p_truth for n in ("honest_plus", "zero_shot_plus", "lying_minus")},
        },
    )

    figs = {}
    f_aie = heatmap(aie, "AIE: fall in P(truth), lying mean z -> corrupted prompts", colorbar="ΔP", zmid=0.0)
    f_rise = heatmap(rise, "AIE: rise in P(lie)", colorbar="ΔP", zmid=0.0)
    f_patch = heatmap(patch_effect, "honest -> lying patching effect (P(truth))", colorbar="effect", zmid=0.0)
    figs["aie_heatmap"] = save_figure(f_aie, out / "aie_heatmap")
    figs["aie_vs_patching"] = save_figure(
        side_by_side([f_aie, f_rise, f_patch], ["AIE (truth drop)", "AIE (lie rise)", "patching effect"], "Heads: AIE vs patching"),
        out / "aie_vs_patching",
    )
    layers = list(ex.honest_plus.layers)
    for name in ("honest_plus", "zero_shot_plus", "lying_minus"):
        d = getattr(ex, name).delta_p_truth()
        series = {v: d[i] for i, v in enumerate(VECTOR_NAMES)}
        series["random (mean |ΔP|)"] = d[len(VECTOR_NAMES) :].abs().mean(0)
        figs[name] = save_figure(
            lines(layers, series, f"{name}: ΔP(truth) by layer (equal norm)", y_label="ΔP(truth)"),
            out / f"{name}_by_layer",
        )

    print(f"\ncorrupted ({cfg.corrupt_mode}) P(truth) {summary['corrupted_p_truth']:.3f}; lying {summary['train_lying_p_truth']:.3f}; "
          f"honest {summary['train_honest_p_truth']:.3f}")
    print(f"top {cfg.k} heads by AIE ({cfg.metric}):")
    for h in summary["top_heads_by_aie"]:
        print(f"  L{h['layer']:>2}H{h['head']}: truth_drop {h['truth_drop']:+.4f}  lie_rise {h['lie_rise']:+.4f}")
    print("top heads by honest->lying patching:", ", ".join(f"L{h['layer']}H{h['head']} {h['effect_p_truth']:+.3f}" for h in summary["top_heads_by_patching"]))
    print(f"overlap: {summary['top_k_overlap_aie_vs_patching']}/{cfg.k}")
    print(f"FV norm {summary['fv_norm']:.2f}; cosine(FV, diff of means) at layer {layer}: {summary['cosine_fv_vs_diff_of_means']:+.3f}")
    for name, r in interventions.items():
        print(f"  {name} (base P(truth) {r['base_p_truth']:.3f}), ΔP(truth) by layer:")
        for l, d in r["delta_p_truth_by_layer"].items():
            print(f"    L{l:>2}{'*' if l == layer else ' '} FV {d['fv']:+.3f}  diff-of-means {d['diff_of_means']:+.3f}  "
                  f"random mean {d['random_mean']:+.3f} (|.| {d['random_mean_abs']:.3f}, max {d['random_max_abs']:.3f})")
    print(f"\nwrote {out}/config.json, summary.json, tensors.pt and figures:")
    for k, v in figs.items():
        print(f"  {k}: {v['html']}" + (f", {v['png']}" if v["png"] else ""))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    main(parse_args())
