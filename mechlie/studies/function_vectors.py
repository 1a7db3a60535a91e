"""Lie function vector (Todd et al. 2023) on few-shot lying prompts; see mechlie.causal.function_vectors.

Uses every fact the model knows (answered correctly under the honest framing), split by fact
into training pairs (heads, AIE with leave-one-out means, FV, diff of means) and test pairs
(interventions). The FV is added at the layers its heads live in; many random directions of
the same norm give the null distribution. Effects carry 95% bootstrap CIs over test pairs. The
run folder holds ``summary.json`` and ``tensors.safetensors``; :class:`FunctionVectorsResult`
draws the figures from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from mechlie.core.cli import RunDir
from mechlie.studies.base import RunFormatError, Study, StudyResult, ci_text, register
from mechlie.studies.flags import device_flag, model_flag, n_devices_flag

if TYPE_CHECKING:
    import plotly.graph_objects as go

TENSORS = "tensors.safetensors"
INTERVENTIONS = ("honest_plus", "zero_shot_plus", "lying_minus")
NOTE = (
    "delta_p_truth: mean over test prompts of P(truth) with the vector minus without, the vector added to "
    "blocks.L.hook_resid_post at the final position (subtracted for lying_minus); every vector at the FV's norm; "
    "delta_p_truth_ci: 95% bootstrap CIs over test pairs (fv, diff_of_means), the distribution of n_random "
    "Gaussian directions' mean effects (quantiles), and fv_p_vs_random = share of random directions with |effect| "
    ">= |FV effect|. AIE with leave-one-out means."
)


@dataclass(frozen=True)
class FunctionVectorsConfig:
    model: str = model_flag()
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
    device: str = device_flag()
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    n_devices: int = n_devices_flag()
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


Config = FunctionVectorsConfig  # the name the script used


def _known_split(cfg: FunctionVectorsConfig, model) -> tuple[list, list]:
    from mechlie.core.metrics import behaviour
    from mechlie.core.pairs import load_builtin
    from mechlie.read.directions import split_by_fact

    pairs = load_builtin(cfg.dataset, "fewshot", tokenizer=model.tokenizer, n=cfg.n_per_relation, seed=cfg.seed)
    known = behaviour(model, pairs, batch_size=cfg.batch_size, progress=False).known
    pairs = [p for p, k in zip(pairs, known.tolist()) if k]
    print(f"{len(pairs)} known facts used (of {len(known)} pairs; unknown facts dropped: a lie needs knowledge)")
    if len(pairs) < 4:
        raise ValueError(f"only {len(pairs)} known facts: need at least 4 (2 training, 2 test)")
    split = split_by_fact([p.fact_id for p in pairs], cfg.test_frac, cfg.seed)
    train, test = [pairs[i] for i in split.train], [pairs[i] for i in split.test]
    print(f"{len(train)} training pairs (heads, AIE, FV, diff of means), {len(test)} test pairs (interventions)")
    return train, test


def _interventions(cfg: FunctionVectorsConfig, ex) -> dict:
    out = {
        name: {
            "base_p_truth": float(r.base.p_truth.mean()),
            "delta_p_truth": ex.effects(r),
            "delta_p_truth_ci": ex.effect_ci(r, n_boot=cfg.n_boot, seed=cfg.seed),
            "delta_p_truth_by_layer": {l: ex.effects(r, l) for l in r.layers},
            "best_layer_fv": r.layers[int(r.delta_p_truth()[0].abs().argmax())],
        }
        for name, r in ((n, getattr(ex, n)) for n in INTERVENTIONS)
    }
    gap = ex.honest_plus.base.p_truth.mean() - ex.lying_minus.base.p_truth.mean()
    out["lying_minus"]["truth_recovered_fraction"] = {
        k: v / float(gap)
        for k, v in out["lying_minus"]["delta_p_truth"].items()
        if k in ("fv", "diff_of_means", "random_mean")
    }
    return out


def _summary(cfg, model, train, test, ex, patched, patch_effect, top_patch) -> dict:
    aie, rise = ex.aie.aie("truth_drop"), ex.aie.aie("lie_rise")
    cos = ex.cosine_fv_dom()
    return {
        "kind": "function_vectors",
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
        "layer": ex.layer,
        "cosine_fv_vs_diff_of_means": float(cos[ex.layer]),
        "cosine_fv_vs_diff_of_means_by_layer": cos.tolist(),
        "interventions_at_layer": _interventions(cfg, ex),
        "fv_head_layers": sorted({l for l, _ in ex.fv.heads}),
        "note": NOTE,
    }


def _tensors(ex, patch_effect) -> tuple[dict, dict]:
    tensors = {
        "aie_truth_drop": ex.aie.aie("truth_drop"),
        "aie_lie_rise": ex.aie.aie("lie_rise"),
        "aie_p_truth": ex.aie.p_truth,
        "mean_z": ex.means.z,
        "mean_head_out": ex.means.head_out,
        "fv": ex.fv.vector,
        "fv_heads": torch.tensor(ex.fv.heads),
        "diff_of_means": ex.dom,
        "random_dirs": ex.random,
        "patch_effect_p_truth": patch_effect,
        **{f"{n}_p_truth": getattr(ex, n).p_truth for n in INTERVENTIONS},
        **{f"{n}_base_p_truth": getattr(ex, n).base.p_truth for n in INTERVENTIONS},
    }
    return tensors, {"layers": list(ex.honest_plus.layers), "headline_layer": ex.layer}


def run(cfg: FunctionVectorsConfig, model, run_dir: RunDir) -> FunctionVectorsResult:
    """The study; it loads its own model (``load_model_split``: device, dtype, several GPUs)."""
    from mechlie.causal.function_vectors import run_function_vector
    from mechlie.causal.patching import patch_final_position
    from mechlie.core.io import save_tensors
    from mechlie.core.kv import load_model_split, top_heads
    from mechlie.report.figures import save_figures

    torch.manual_seed(cfg.seed)
    model = load_model_split(cfg.model, device=cfg.device, dtype=cfg.dtype, n_devices=cfg.n_devices)
    train, test = _known_split(cfg, model)
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
    top_patch = list(top_heads(patch_effect.abs(), cfg.k))
    summary = _summary(cfg, model, train, test, ex, patched, patch_effect, top_patch)
    save_tensors(run_dir.file(TENSORS), *_tensors(ex, patch_effect))
    result = FunctionVectorsResult(run_dir.path, summary)
    summary["figures"] = save_figures(result.figures(), run_dir.path)
    return result


def fv_figures(s: dict, t: dict, meta: dict, *, n_boot: int = 1000, seed: int = 0) -> dict[str, go.Figure]:
    """The AIE heatmaps beside patching, and each intervention's ΔP(truth) by layer: FV and diff of
    means with 95% CI bands over test pairs, random directions as their median and central 95%."""
    from mechlie.causal.function_vectors import VECTOR_NAMES
    from mechlie.core.stats import bootstrap_tensor
    from mechlie.report import figures as F

    where = f"{s['model']}, n={s['n_test']} test pairs"
    aie = F.heatmap(
        t["aie_truth_drop"],
        f"AIE: fall in P(truth), lying mean z into corrupted prompts ({where})",
        colorbar="ΔP",
        zmid=0.0,
    )
    figs = {"aie_heatmap": aie}
    if "aie_lie_rise" in t and "patch_effect_p_truth" in t:
        figs["aie_vs_patching"] = F.side_by_side(
            [
                aie,
                F.heatmap(t["aie_lie_rise"], "AIE: rise in P(lie)", colorbar="ΔP", zmid=0.0),
                F.heatmap(t["patch_effect_p_truth"], "honest -> lying patching", colorbar="effect", zmid=0.0),
            ],
            ["AIE (truth drop)", "AIE (lie rise)", "patching effect"],
            f"Heads: AIE vs patching ({s['model']}, {s.get('n_train', '?')} training pairs)",
        )
    layers = list(meta["layers"])
    for name in INTERVENTIONS:
        if f"{name}_p_truth" not in t:
            continue
        per_pair = t[f"{name}_p_truth"].float() - t[f"{name}_base_p_truth"].float()[:, None, None]  # [n, v, layer]
        est = bootstrap_tensor(lambda i, d=per_pair: d[i].mean(0), per_pair.shape[0], n_boot=n_boot, seed=seed)
        series = {v: (est.mean[j].tolist(), est.lo[j].tolist(), est.hi[j].tolist()) for j, v in enumerate(VECTOR_NAMES)}
        rand = per_pair[:, len(VECTOR_NAMES) :].mean(0)  # [r, layer]: each random direction's mean effect
        if len(rand):
            q = torch.quantile(rand, torch.tensor([0.025, 0.5, 0.975]), dim=0)
            series[f"{len(rand)} random directions (median, 95% range)"] = (q[1].tolist(), q[0].tolist(), q[2].tolist())
        figs[f"{name}_by_layer"] = F.lines_ci(
            layers, series, f"{name}: ΔP(truth) by layer, equal norm ({where})", y_label="ΔP(truth)"
        )
    return figs


def _e(d: dict) -> str:
    return ci_text(d, "+.3f")


def _intervention_report(name: str, r: dict, layer: int) -> list[str]:
    """One intervention's lines of the printed report: at the headline layer, then layer by layer."""
    c, rnd = r["delta_p_truth_ci"], r["delta_p_truth_ci"]["random"]
    out = [
        f"  {name} (base P(truth) {r['base_p_truth']:.3f}) at layer {layer}: FV {_e(c['fv'])}, diff of means "
        f"{_e(c['diff_of_means'])}; {rnd['n']} random directions: 95% within "
        f"[{rnd['q025']:+.3f}, {rnd['q975']:+.3f}], max |ΔP| {rnd['max_abs']:.3f}; "
        f"FV vs random p = {c['fv_p_vs_random']:.3f}"
    ]
    for l, d in r["delta_p_truth_by_layer"].items():
        star = "*" if int(l) == layer else " "
        out.append(
            f"    L{int(l):>2}{star} FV {d['fv']:+.3f}  diff-of-means {d['diff_of_means']:+.3f}  "
            f"random |ΔP| mean {d['random_mean_abs']:.3f}, max {d['random_max_abs']:.3f}"
        )
    return out


class FunctionVectorsResult(StudyResult):
    """``summary.json`` keys used by :meth:`headline`: ``model``, ``n_train``, ``n_test``,
    ``top_heads_by_aie``, ``top_k_overlap_aie_vs_patching``, ``layer``, ``cosine_fv_vs_diff_of_means``
    and ``interventions_at_layer.<name>.delta_p_truth_ci`` (``fv``, ``diff_of_means``, ``random``,
    ``fv_p_vs_random``)."""

    study = "function_vectors"
    required = ("model", "n_test", "top_heads_by_aie", "layer", "cosine_fv_vs_diff_of_means")
    files = (TENSORS,)
    title_format = "Function vectors: {model}, n={n_test} test pairs"

    @classmethod
    def load(cls, run_dir):
        result = super().load(run_dir)
        t, meta = result.tensors(TENSORS)
        if "aie_truth_drop" not in t or not isinstance(meta, dict) or "layers" not in meta:
            path = result.run_dir / TENSORS
            raise RunFormatError(f"{path} lacks aie_truth_drop or its layers: an older version; rerun")
        return result

    def figures(self) -> dict[str, go.Figure]:
        t, meta = self.tensors(TENSORS)
        cfg = self.config()
        return fv_figures(self._summary, t, meta, n_boot=cfg.get("n_boot", 1000), seed=cfg.get("seed", 0))

    def captions(self) -> dict[str, str]:
        caps = {
            "aie_heatmap": "Average indirect effect of each head (Todd et al. 2023), on the training pairs.",
            "aie_vs_patching": "Heads: AIE (truth drop, lie rise) beside the honest → lying patching effect.",
        }
        for name in INTERVENTIONS:
            caps[f"{name}_by_layer"] = (
                "ΔP(truth) when each vector is added (subtracted for lying_minus) at the final position; bands: "
                "95% CI over test pairs, and the central 95% of random directions."
            )
        return caps

    def headline(self) -> list[str]:
        s = self._summary
        top = s["top_heads_by_aie"][:5]
        out = [
            f"- {s.get('n_train', '?')} training / {s['n_test']} test pairs. Top heads by AIE: "
            + ", ".join(f"L{h['layer']}H{h['head']} ({h['truth_drop']:+.3f})" for h in top)
            + f"; overlap with patching's top heads {s.get('top_k_overlap_aie_vs_patching', '?')}.",
            f"- cos(FV, diff of means) at layer {s['layer']}: {s['cosine_fv_vs_diff_of_means']:+.3f}.",
        ]
        for name, iv in s.get("interventions_at_layer", {}).items():
            ci = iv.get("delta_p_truth_ci", {})
            if "fv" in ci and "diff_of_means" in ci:
                rnd = ci.get("random", {})
                null = f"; random directions 95% within [{rnd['q025']:+.3f}, {rnd['q975']:+.3f}]" if rnd else ""
                out.append(
                    f"- {name} at layer {s['layer']}: ΔP(truth) FV {_e(ci['fv'])}, diff of means "
                    f"{_e(ci['diff_of_means'])}{null}."
                )
        return out

    def report(self) -> str:
        s, cfg = self._summary, self.config()
        k = cfg.get("k", len(s["top_heads_by_aie"]))
        out = [
            f"\ncorrupted ({cfg.get('corrupt_mode', '?')}) P(truth) {s['corrupted_p_truth']:.3f}; "
            f"lying {s['train_lying_p_truth']:.3f}; honest {s['train_honest_p_truth']:.3f}",
            f"top {k} heads by AIE ({s['ranking_metric']}):",
        ]
        for h in s["top_heads_by_aie"]:
            out.append(
                f"  L{h['layer']:>2}H{h['head']}: truth_drop {h['truth_drop']:+.4f}  lie_rise {h['lie_rise']:+.4f}"
            )
        out.append(
            "top heads by honest->lying patching: "
            + ", ".join(f"L{h['layer']}H{h['head']} {h['effect_p_truth']:+.3f}" for h in s["top_heads_by_patching"])
        )
        out.append(f"overlap: {s['top_k_overlap_aie_vs_patching']}/{k}")
        layer = s["layer"]
        out.append(
            f"FV norm {s['fv_norm']:.2f}; cosine(FV, diff of means) at layer {layer}: "
            f"{s['cosine_fv_vs_diff_of_means']:+.3f}"
        )
        for name, r in s["interventions_at_layer"].items():
            out += _intervention_report(name, r, layer)
        return "\n".join(out + self.wrote())


STUDY = register(Study("function_vectors", FunctionVectorsConfig, run, FunctionVectorsResult, load_model=False))
