"""Lie function vector (Todd et al. 2023) on few-shot lying prompts; see mechlie.causal.function_vectors.

    python analyses/function_vectors.py                    # every known fact of every relation
    python analyses/function_vectors.py --n-per-relation 8 --n-random 50 --device cuda

Uses every fact the model knows (answered correctly under the honest framing), split by fact
into training pairs (heads, AIE with leave-one-out means, FV, diff of means) and test pairs
(interventions). The FV is added at the layers its heads live in; many random directions of
the same norm give the null distribution. Effects carry 95% bootstrap CIs over test pairs.
Writes results/function_vectors/<run>/ (config, summary, safetensors, figures); the run name
comes from the settings, so a different configuration never overwrites an earlier run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

import torch

from mechlie.core.cli import RunDir, run_script
from mechlie.core.models import DEFAULT_MODEL


@dataclass(frozen=True)
class Config:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "embedded name, .gguf file, HF dir, or TL name"})
    dataset: str = field(default="all", metadata={"help": "a built-in relation or 'all'"})
    n_per_relation: int | None = field(
        default=None, metadata={"help": "sample this many pairs per relation (default: all)"}
    )
    test_frac: float = 0.5
    k: int = field(default=10, metadata={"help": "heads in the function vector"})
    layer: int | None = field(
        default=None, metadata={"help": "headline layer (default: the earliest layer of the FV's heads)"}
    )
    all_layers: bool = field(
        default=False, metadata={"help": "measure the interventions at every layer, not only the FV heads' layers"}
    )
    corrupt_mode: Literal["mixed", "permuted"] = "mixed"
    metric: Literal["truth_drop", "lie_rise", "logit_diff_drop"] = "truth_drop"
    n_random: int = field(default=100, metadata={"help": "random directions (the null distribution)"})
    n_boot: int = 1000
    seed: int = 0
    device: str = field(default="", metadata={"help": "cpu, cuda, ... (default: cuda if available)"})
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    n_devices: int = field(
        default=1, metadata={"help": "split the layers over this many GPUs (TransformerLens's n_devices)"}
    )
    batch_size: int = field(default=16, metadata={"run": False})
    out_dir: str = "results/function_vectors"
    run_name: str = ""

    def __post_init__(self) -> None:
        if self.k < 1 or not 0 < self.test_frac < 1 or self.n_random < 1 or self.n_boot < 10:
            raise ValueError("need --k >= 1, 0 < --test-frac < 1, --n-random >= 1, --n-boot >= 10")
        if self.n_per_relation is not None and self.n_per_relation < 2:
            raise ValueError("--n-per-relation must be >= 2")
        if self.batch_size < 1 or self.n_devices < 1:
            raise ValueError("--batch-size and --n-devices must be >= 1")


def main(cfg: Config, run: RunDir) -> dict:
    from mechlie.causal.function_vectors import VECTOR_NAMES, run_function_vector
    from mechlie.causal.patching import patch_final_position
    from mechlie.core.io import save_tensors
    from mechlie.core.kv import load_model_split, top_heads
    from mechlie.core.metrics import behaviour
    from mechlie.core.pairs import load_builtin
    from mechlie.read.directions import split_by_fact
    from mechlie.report.plotting import heatmap, lines, save_figure, side_by_side

    torch.manual_seed(cfg.seed)
    model = load_model_split(cfg.model, device=cfg.device, dtype=cfg.dtype, n_devices=cfg.n_devices)
    pairs = load_builtin(cfg.dataset, "fewshot", tokenizer=model.tokenizer, n=cfg.n_per_relation, seed=cfg.seed)
    known = behaviour(model, pairs, batch_size=cfg.batch_size, progress=False).known
    pairs = [p for p, k in zip(pairs, known.tolist()) if k]
    print(f"{len(pairs)} known facts used (of {len(known)} pairs; unknown facts dropped: a lie needs knowledge)")
    if len(pairs) < 4:
        raise ValueError(f"only {len(pairs)} known facts: need at least 4 (2 training, 2 test)")
    split = split_by_fact([p.fact_id for p in pairs], cfg.test_frac, cfg.seed)
    train, test = [pairs[i] for i in split.train], [pairs[i] for i in split.test]
    print(f"{len(train)} training pairs (heads, AIE, FV, diff of means), {len(test)} test pairs (interventions)")

    out = run.path
    ex = run_function_vector(
        model,
        train,
        test,
        k=cfg.k,
        layer=cfg.layer,
        layers=range(model.cfg.n_layers) if cfg.all_layers else None,
        corrupt_mode=cfg.corrupt_mode,
        metric=cfg.metric,
        n_random=cfg.n_random,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    # The usual honest -> lying patching on the same training pairs, to compare head rankings.
    patched = patch_final_position(model, train, "z", batch_size=cfg.batch_size)
    patch_effect = patched.effect("p_truth")  # 0 = lying, 1 = honest

    aie, rise = ex.aie.aie("truth_drop"), ex.aie.aie("lie_rise")
    top_patch = list(top_heads(patch_effect.abs(), cfg.k))
    layer = ex.layer
    cos = ex.cosine_fv_dom()

    interventions = {
        name: {
            "base_p_truth": float(r.base.p_truth.mean()),
            "delta_p_truth": ex.effects(r),
            "delta_p_truth_ci": ex.effect_ci(r, n_boot=cfg.n_boot, seed=cfg.seed),
            "delta_p_truth_by_layer": {l: ex.effects(r, l) for l in r.layers},
            "best_layer_fv": r.layers[int(r.delta_p_truth()[0].abs().argmax())],
        }
        for name, r in (
            ("honest_plus", ex.honest_plus),
            ("zero_shot_plus", ex.zero_shot_plus),
            ("lying_minus", ex.lying_minus),
        )
    }
    gap = ex.honest_plus.base.p_truth.mean() - ex.lying_minus.base.p_truth.mean()
    interventions["lying_minus"]["truth_recovered_fraction"] = {
        k: v / float(gap)
        for k, v in interventions["lying_minus"]["delta_p_truth"].items()
        if k in ("fv", "diff_of_means", "random_mean")
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
            {"layer": l, "head": h, "truth_drop": float(aie[l, h]), "lie_rise": float(rise[l, h])}
            for l, h in ex.fv.heads
        ],
        "top_heads_by_patching": [
            {"layer": l, "head": h, "effect_p_truth": float(patch_effect[l, h])} for l, h in top_patch
        ],
        "top_k_overlap_aie_vs_patching": len(set(ex.fv.heads) & set(top_patch)),
        "fv_norm": float(ex.fv.vector.norm()),
        "layer": layer,
        "cosine_fv_vs_diff_of_means": float(cos[layer]),
        "cosine_fv_vs_diff_of_means_by_layer": cos.tolist(),
        "interventions_at_layer": interventions,
        "fv_head_layers": sorted({l for l, _ in ex.fv.heads}),
        "note": "delta_p_truth: mean over test prompts of P(truth) with the vector minus without, the vector added to "
        "blocks.L.hook_resid_post at the final position (subtracted for lying_minus); every vector at the FV's norm; "
        "delta_p_truth_ci: 95% bootstrap CIs over test pairs (fv, diff_of_means), the distribution of n_random "
        "Gaussian directions' mean effects (quantiles), and fv_p_vs_random = share of random directions with |effect| "
        ">= |FV effect|. AIE with leave-one-out means.",
    }
    save_tensors(
        out / "tensors.safetensors",
        {
            "aie_truth_drop": aie,
            "aie_lie_rise": rise,
            "aie_p_truth": ex.aie.p_truth,
            "mean_z": ex.means.z,
            "mean_head_out": ex.means.head_out,
            "fv": ex.fv.vector,
            "fv_heads": torch.tensor(ex.fv.heads),
            "diff_of_means": ex.dom,
            "random_dirs": ex.random,
            "patch_effect_p_truth": patch_effect,
            **{f"{n}_p_truth": getattr(ex, n).p_truth for n in ("honest_plus", "zero_shot_plus", "lying_minus")},
            **{
                f"{n}_base_p_truth": getattr(ex, n).base.p_truth
                for n in ("honest_plus", "zero_shot_plus", "lying_minus")
            },
        },
        {"layers": list(ex.honest_plus.layers), "headline_layer": ex.layer},
    )

    figs = {}
    f_aie = heatmap(aie, "AIE: fall in P(truth), lying mean z -> corrupted prompts", colorbar="ΔP", zmid=0.0)
    f_rise = heatmap(rise, "AIE: rise in P(lie)", colorbar="ΔP", zmid=0.0)
    f_patch = heatmap(patch_effect, "honest -> lying patching effect (P(truth))", colorbar="effect", zmid=0.0)
    figs["aie_heatmap"] = save_figure(f_aie, out / "aie_heatmap")
    figs["aie_vs_patching"] = save_figure(
        side_by_side(
            [f_aie, f_rise, f_patch],
            ["AIE (truth drop)", "AIE (lie rise)", "patching effect"],
            "Heads: AIE vs patching",
        ),
        out / "aie_vs_patching",
    )
    layers = list(ex.honest_plus.layers)
    for name in ("honest_plus", "zero_shot_plus", "lying_minus"):
        d = getattr(ex, name).delta_p_truth()
        series = {v: d[i].tolist() for i, v in enumerate(VECTOR_NAMES)}
        rnd = d[len(VECTOR_NAMES) :]
        series["random directions (median)"] = rnd.median(0).values.tolist()
        bands = {
            "random directions (median)": (
                torch.quantile(rnd, 0.025, dim=0).tolist(),
                torch.quantile(rnd, 0.975, dim=0).tolist(),
            )
        }
        figs[name] = save_figure(
            lines(
                layers,
                series,
                f"{name}: ΔP(truth) by layer (equal norm; band: 95% of {cfg.n_random} random directions)",
                y_label="ΔP(truth)",
                bands=bands,
            ),
            out / f"{name}_by_layer",
        )

    print(
        f"\ncorrupted ({cfg.corrupt_mode}) P(truth) {summary['corrupted_p_truth']:.3f}; "
        f"lying {summary['train_lying_p_truth']:.3f}; "
        f"honest {summary['train_honest_p_truth']:.3f}"
    )
    print(f"top {cfg.k} heads by AIE ({cfg.metric}):")
    for h in summary["top_heads_by_aie"]:
        print(f"  L{h['layer']:>2}H{h['head']}: truth_drop {h['truth_drop']:+.4f}  lie_rise {h['lie_rise']:+.4f}")
    print(
        "top heads by honest->lying patching:",
        ", ".join(f"L{h['layer']}H{h['head']} {h['effect_p_truth']:+.3f}" for h in summary["top_heads_by_patching"]),
    )
    print(f"overlap: {summary['top_k_overlap_aie_vs_patching']}/{cfg.k}")
    print(
        f"FV norm {summary['fv_norm']:.2f}; cosine(FV, diff of means) at layer {layer}: "
        f"{summary['cosine_fv_vs_diff_of_means']:+.3f}"
    )
    for name, r in interventions.items():
        c = r["delta_p_truth_ci"]
        print(
            f"  {name} (base P(truth) {r['base_p_truth']:.3f}) at layer {layer}: FV {_e(c['fv'])}, diff of means "
            f"{_e(c['diff_of_means'])}; {c['random']['n']} random directions: 95% within "
            f"[{c['random']['q025']:+.3f}, {c['random']['q975']:+.3f}], max |ΔP| {c['random']['max_abs']:.3f}; "
            f"FV vs random p = {c['fv_p_vs_random']:.3f}"
        )
        for l, d in r["delta_p_truth_by_layer"].items():
            print(
                f"    L{l:>2}{'*' if l == layer else ' '} FV {d['fv']:+.3f}  diff-of-means {d['diff_of_means']:+.3f}  "
                f"random |ΔP| mean {d['random_mean_abs']:.3f}, max {d['random_max_abs']:.3f}"
            )
    print(f"\nwrote {out}/config.json, summary.json, tensors.safetensors and figures:")
    for k, v in figs.items():
        print(f"  {k}: {v['html']}" + (f", {v['png']}" if v["png"] else ""))
    return summary


def _e(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


if __name__ == "__main__":
    sys.exit(run_script(Config, main, doc=__doc__))
