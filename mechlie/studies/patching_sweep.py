"""Exact vs. attribution patching, residual patching by position x layer, and component ranking.

Honest prompts are clean, lying prompts corrupt (few-shot format). Three measurements on the same
pairs:

1. exact final-position patching of every head's ``z`` and its attribution-patching estimate
   (Spearman between the two over heads; the top-k of each and their overlap);
2. residual (``resid_pre``) patching by position x layer, positions aligned from the end (by default
   every position where the prompts differ, the last ``n_final``, and each demonstration's answer
   as a group), beside its attribution estimate;
3. the component-difference ranking, reusing the head patches.

Every effect carries a 95% bootstrap CI over pairs. The run folder holds ``summary.json`` and
``tensors.safetensors``; the figures are drawn from those two files by :class:`PatchingSweepResult`.
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

METRICS = ("logit_diff", "p_truth")
TENSORS = "tensors.safetensors"


@dataclass(frozen=True)
class PatchingSweepConfig:
    model: str = model_flag()
    dataset: str = field(default="all", metadata={"help": "a built-in relation or 'all'"})
    fmt: Literal["instruct", "fewshot", "both"] = "fewshot"
    n_per_relation: int = field(default=1, metadata={"help": "pairs sampled per relation (4 pairs with 'all')"})
    metric: Literal["logit_diff", "p_truth"] = "logit_diff"
    layer_stride: int = field(default=5, metadata={"help": "position patching: every n-th layer (1 = all)"})
    positions: Literal["differing", "last"] = field(
        default="differing",
        metadata={
            "help": "differing: every position where the prompts differ, plus the last --n-final; "
            "last: the last --n-positions"
        },
    )
    n_final: int = field(default=4, metadata={"help": "with --positions differing: also the last n positions"})
    n_positions: int = field(default=12, metadata={"help": "with --positions last: the last n positions (0 = all)"})
    top_k: int = 10
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples (CIs over pairs)"})
    device: str = device_flag()
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    n_devices: int = n_devices_flag()
    batch_size: int = field(default=8, metadata={"help": "prompts per batch", "run": False})
    out_dir: str = "results/patching_sweep"
    run_name: str = ""

    def __post_init__(self) -> None:
        if self.layer_stride < 1 or self.n_positions < 0 or self.n_per_relation < 1 or self.n_final < 1:
            raise ValueError("need --layer-stride >= 1, --n-positions >= 0, --n-per-relation >= 1, --n-final >= 1")
        if self.n_boot < 10 or self.batch_size < 1 or self.n_devices < 1 or self.top_k < 1:
            raise ValueError("need --n-boot >= 10, --batch-size >= 1, --n-devices >= 1, --top-k >= 1")


Config = PatchingSweepConfig  # the name the script used


def _heads(cfg: PatchingSweepConfig, model, pairs) -> dict:
    """Step 1: exact final-position patching of every head, and the attribution estimate of it."""
    from mechlie.causal.attribution import attribute_pairs
    from mechlie.causal.patching import patch_final_position
    from mechlie.core.kv import top_heads
    from mechlie.core.stats import spearman

    exact = patch_final_position(model, pairs, "z", batch_size=cfg.batch_size)
    exact_delta = getattr(exact, cfg.metric).mean(0) - getattr(exact.corrupt, cfg.metric).mean()
    att = attribute_pairs(model, pairs, metric=cfg.metric, batch_size=cfg.batch_size)
    return {
        "exact": exact,
        "exact_delta": exact_delta,
        "att": att,
        "rho": spearman(att.z_final, exact_delta),
        "rho_abs": spearman(att.z_final.abs(), exact_delta.abs()),
        "top_exact": top_heads(exact_delta.abs(), cfg.top_k),
        "top_att": top_heads(att.z_final.abs(), cfg.top_k),
        "ci": exact.effect_ci(cfg.metric, n_boot=cfg.n_boot),
    }


def _positions(cfg: PatchingSweepConfig, model, pairs, att) -> dict:
    """Step 2: residual patching by position x layer (aligned from the end), and its attribution estimate."""
    from mechlie.causal.position_patching import patch_positions
    from mechlie.core.stats import bootstrap_tensor, spearman

    layers = list(range(0, model.cfg.n_layers, cfg.layer_stride))
    pos = patch_positions(
        model,
        pairs,
        kind="resid_pre",
        layers=layers,
        positions=cfg.positions,
        n_positions=cfg.n_positions or None,
        n_final=cfg.n_final,
    )
    delta = getattr(pos, cfg.metric).mean(0) - getattr(pos.corrupt, cfg.metric).mean()  # [P, layers]
    width = att.resid.shape[1]
    cols = [width + o for o in pos.offsets]  # attribution columns are offsets from the end too
    att_pos = att.resid[:, cols][:, :, layers].mean(0)  # the same offsets and layers
    group_ci = (
        bootstrap_tensor(lambda i: pos.group_effect(cfg.metric, i), len(pairs), n_boot=cfg.n_boot)
        if pos.group_p_truth is not None
        else None
    )
    return {
        "pos": pos,
        "layers": layers,
        "delta": delta,
        "rho": spearman(att_pos, delta),
        "ci": bootstrap_tensor(lambda i: pos.effect(cfg.metric, i), len(pairs), n_boot=cfg.n_boot),
        "group_ci": group_ci,
    }


def _summary(cfg: PatchingSweepConfig, model, pairs, h: dict, p: dict, rankings: dict, ticks: list[str]) -> dict:
    exact, att, delta, ci = h["exact"], h["att"], h["exact_delta"], h["ci"]
    pos, layers, group_ci = p["pos"], p["layers"], p["group_ci"]
    argmax = [int(i) for i in torch.unravel_index(pos.effect(cfg.metric).argmax(), p["delta"].shape)]
    return {
        "kind": "patching_sweep",
        "model": model.cfg.model_name,
        "n_pairs": len(pairs),
        "metric": cfg.metric,
        "honest_mean": float(getattr(exact.clean, cfg.metric).mean()),
        "lying_mean": float(getattr(exact.corrupt, cfg.metric).mean()),
        "heads": {
            "spearman_attribution_vs_exact": h["rho"],
            "spearman_abs": h["rho_abs"],
            "top_exact": [
                {
                    "layer": l,
                    "head": hd,
                    "delta": float(delta[l, hd]),
                    "effect": ci.at(l, hd).to_dict(),
                    "attribution": float(att.z_final[l, hd]),
                }
                for l, hd in h["top_exact"]
            ],
            "top_attribution": [
                {"layer": l, "head": hd, "attribution": float(att.z_final[l, hd]), "delta": float(delta[l, hd])}
                for l, hd in h["top_att"]
            ],
            "top_k_overlap": len(set(h["top_exact"]) & set(h["top_att"])),
        },
        "positions": {
            "kind": pos.kind,
            "layers": layers,
            "offsets": list(pos.offsets),
            "tick_labels_pair0": ticks,
            "spearman_attribution_vs_exact": p["rho"],
            "positions": cfg.positions,
            "max_effect": p["ci"].at(*argmax).to_dict(),
            "argmax": argmax,
            "groups_pair0": [list(g) for g in pos.groups[0]] if pos.groups else [],
            "group_effect": None
            if group_ci is None
            else {
                f"demo {g + 1}": {f"L{l}": group_ci.at(g, j).to_dict() for j, l in enumerate(layers)}
                for g in range(group_ci.mean.shape[0])
            },
        },
        "component_ranking": {
            fam: {
                "spearman_diff_score_vs_abs_effect": r.spearman,
                "top_by_score": [list(t) for t in r.top_by_score],
                "top_by_effect": [list(t) for t in r.top_by_effect],
                "overlap": r.overlap(),
                "effect_of_top_by_score": [float(r.effect[t]) for t in r.top_by_score],
            }
            for fam, r in rankings.items()
        },
        "top_k": cfg.top_k,
    }


def _tensors(h: dict, p: dict, rankings: dict) -> tuple[dict, dict]:
    att, pos = h["att"], p["pos"]
    groups = (
        {"group_p_truth": pos.group_p_truth, "group_logit_diff": pos.group_logit_diff}
        if pos.group_p_truth is not None
        else {}
    )
    tensors = {
        "exact_delta_heads": h["exact_delta"],
        "head_effect_lo": h["ci"].lo,
        "head_effect_hi": h["ci"].hi,
        "attribution_z": att.z,
        "attribution_resid": att.resid,
        "valid": att.valid.to(torch.uint8),
        "position_delta": p["delta"],
        "position_p_truth": pos.p_truth,
        "position_logit_diff": pos.logit_diff,
        **groups,
        **{f"diff_score_{f}": r.score for f, r in rankings.items()},
        **{f"effect_{f}": r.effect for f, r in rankings.items()},
    }
    return tensors, {"position_offsets": list(pos.offsets), "position_layers": list(pos.layers)}


def run(cfg: PatchingSweepConfig, model, run_dir: RunDir) -> PatchingSweepResult:
    """The study; it loads its own model (``load_model_split``: device, dtype, several GPUs)."""
    from mechlie.causal.component_ranking import rank_components
    from mechlie.core.io import save_tensors
    from mechlie.core.kv import load_model_split
    from mechlie.core.pairs import load_builtin, tokenize
    from mechlie.report.figures import save_figures

    model = load_model_split(cfg.model, device=cfg.device, dtype=cfg.dtype, n_devices=cfg.n_devices)
    pairs = load_builtin(cfg.dataset, cfg.fmt, tokenizer=model.tokenizer, n=cfg.n_per_relation)
    print(f"{len(pairs)} pairs ({cfg.fmt})")
    h = _heads(cfg, model, pairs)
    p = _positions(cfg, model, pairs, h["att"])
    rankings = rank_components(model, pairs, top_k=cfg.top_k, batch_size=cfg.batch_size, patches={"z": h["exact"]})
    first = tokenize(model, [pairs[0].lying]).tokens[0].tolist()
    ticks = [f"{o}:{model.tokenizer.decode([first[o]])!r}" for o in p["pos"].offsets]
    summary = _summary(cfg, model, pairs, h, p, rankings, ticks)
    save_tensors(run_dir.file(TENSORS), *_tensors(h, p, rankings))
    result = PatchingSweepResult(run_dir.path, summary)
    summary["figures"] = save_figures(result.figures(), run_dir.path)
    return result


CAPTIONS = {
    "heads_exact_vs_attribution": "Each head's z patched honest→lying at the final position, exact and estimated "
    "by attribution patching (normalized: 1 = honest).",
    "top_heads_exact": "The top heads by |exact patching effect|, 95% bootstrap CIs over pairs.",
    "positions_exact_vs_attribution": "Residual patching by position (from the end) × layer, exact and attribution.",
    "z_attribution_by_position": "Attribution of all head outputs at each position, summed over heads.",
    "demonstration_groups": "Each demonstration's answer tokens patched together, per layer, 95% CIs over pairs.",
    "component_ranking_heads": "Heads: the component-difference score beside the |patching effect|.",
}


def _head_figures(s: dict, t: dict, norm: float) -> dict[str, go.Figure]:
    from mechlie.report import figures as F

    rho = s["heads"]["spearman_attribution_vs_exact"]
    z_final = t["attribution_z"][:, -1].mean(0)  # Attribution.z_final
    top = s["heads"]["top_exact"]
    where = f"{s['model']}, n={s['n_pairs']} pairs, {s['metric']}"
    figs = {
        "heads_exact_vs_attribution": F.side_by_side(
            [
                F.heatmap(t["exact_delta_heads"] / norm, "exact", colorbar="effect", zmid=0.0),
                F.heatmap(z_final / norm, "attribution", colorbar="effect", zmid=0.0),
            ],
            ["exact patching", f"attribution (ρ={rho:.2f})"],
            f"Heads at the final position ({s['metric']}, normalized; {where})",
        ),
        "top_heads_exact": F.errorbars(
            [f"L{h['layer']}H{h['head']}" for h in top],
            {"normalized effect": tuple([h["effect"][c] for h in top] for c in ("mean", "lo", "hi"))},
            f"Top heads by exact patching, 95% CI over pairs ({where})",
            y_label="normalized effect",
        ),
    }
    if "diff_score_head" in t and "effect_head" in t:
        r = s["component_ranking"]["head"]
        figs["component_ranking_heads"] = F.side_by_side(
            [F.heatmap(t["diff_score_head"], "diff"), F.heatmap(t["effect_head"].abs(), "effect")],
            ["difference score", "|patching effect|"],
            f"Heads: difference score vs causal effect (ρ={r['spearman_diff_score_vs_abs_effect']:.2f})",
        )
    return figs


def _position_figures(s: dict, t: dict, meta: dict, norm: float) -> dict[str, go.Figure]:
    from mechlie.report import figures as F

    p = s["positions"]
    layers, offsets, ticks = p["layers"], p["offsets"], p["tick_labels_pair0"]
    width = t["attribution_resid"].shape[1]
    cols = [width + o for o in offsets]  # attribution columns are offsets from the end too
    att_pos = t["attribution_resid"][:, cols][:, :, layers].mean(0)
    ylab = [str(l) for l in layers]
    figs = {
        "positions_exact_vs_attribution": F.side_by_side(
            [
                F.heatmap(
                    (t["position_delta"] / norm).T, "exact", x_label="position", zmid=0.0, x_ticks=ticks, y_ticks=ylab
                ),
                F.heatmap((att_pos / norm).T, "attribution", x_label="position", zmid=0.0, x_ticks=ticks, y_ticks=ylab),
            ],
            ["exact resid_pre patching", f"attribution (ρ={p['spearman_attribution_vs_exact']:.2f})"],
            f"Residual patching by position × layer, from the end ({s['model']}, n={s['n_pairs']} pairs)",
        ),
        "z_attribution_by_position": F.heatmap(
            (t["attribution_z"][:, cols].mean(0).sum(-1) / norm).T,
            f"Attribution of head outputs by position, summed over heads ({s['model']}, n={s['n_pairs']} pairs)",
            x_label="position",
            zmid=0.0,
            x_ticks=ticks,
        ),
    }
    ge = p.get("group_effect")
    if ge:
        figs["demonstration_groups"] = F.errorbars(
            list(ge),
            {lk: tuple([ge[g][lk][c] for g in ge] for c in ("mean", "lo", "hi")) for lk in (f"L{l}" for l in layers)},
            "Each demonstration's answer tokens patched together (resid_pre, honest into lying; 1 = honest; "
            f"{s['model']}, n={s['n_pairs']} pairs)",
            y_label="normalized effect",
        )
    return figs


def sweep_figures(s: dict, t: dict, meta: dict) -> dict[str, go.Figure]:
    """The patching sweep's figures from ``summary.json`` (``s``) and ``tensors.safetensors``."""
    norm = s["honest_mean"] - s["lying_mean"]
    return {**_head_figures(s, t, norm), **_position_figures(s, t, meta, norm)}


def _e(d: dict) -> str:
    return ci_text(d, "+.3f")


class PatchingSweepResult(StudyResult):
    """``summary.json`` keys used by :meth:`headline`: ``model``, ``n_pairs``, ``metric``,
    ``heads.top_exact`` (with ``effect`` CIs), ``heads.spearman_attribution_vs_exact``,
    ``positions.spearman_attribution_vs_exact``, ``positions.max_effect``, ``positions.argmax``,
    ``positions.offsets``, ``positions.layers``."""

    study = "patching_sweep"
    required = ("model", "n_pairs", "metric", "honest_mean", "lying_mean", "heads", "positions", "component_ranking")
    files = (TENSORS,)
    title_format = "Patching sweep: {model}, n={n_pairs} pairs, {metric}"

    @classmethod
    def load(cls, run_dir):
        result = super().load(run_dir)
        for key in ("top_exact", "spearman_attribution_vs_exact"):
            if key not in result.summary()["heads"]:
                raise RunFormatError(f"{result.run_dir}/summary.json lacks heads.{key}: an older version; rerun")
        return result

    def figures(self) -> dict[str, go.Figure]:
        t, meta = self.tensors(TENSORS)
        if "exact_delta_heads" not in t:
            raise RunFormatError(f"{self.run_dir}/{TENSORS} has no exact_delta_heads: an older version; rerun")
        return sweep_figures(self._summary, t, meta)

    def captions(self) -> dict[str, str]:
        return dict(CAPTIONS)

    def headline(self) -> list[str]:
        s = self._summary
        h0 = s["heads"]["top_exact"][0]
        p = s["positions"]
        out = [
            f"- {s['n_pairs']} pairs, metric {s['metric']}. Top head by exact patching: L{h0['layer']}H{h0['head']}, "
            f"{_e(h0['effect'])} (normalized: 0 = lying, 1 = honest; 95% CI over pairs).",
            f"- Attribution patching vs exact: Spearman {s['heads']['spearman_attribution_vs_exact']:+.3f} over heads"
            + (f", {p['spearman_attribution_vs_exact']:+.3f} over positions × layers." if "layers" in p else "."),
        ]
        if p.get("max_effect") and p.get("argmax"):
            o, l = p["offsets"][p["argmax"][0]], p["layers"][p["argmax"][1]]
            out.append(f"- Largest position × layer effect: {_e(p['max_effect'])} at offset {o}, layer {l}.")
        return out

    def report(self) -> str:
        s = self._summary
        h, p = s["heads"], s["positions"]
        k = s.get("top_k", len(h["top_exact"]))
        norm = s["honest_mean"] - s["lying_mean"]
        out = [
            f"\nheads: Spearman(attribution, exact) = {h['spearman_attribution_vs_exact']:+.3f} "
            f"(|.|: {h['spearman_abs']:+.3f}); top-{k} overlap {h['top_k_overlap']}",
            "top heads by exact patching (95% CI over pairs): "
            + ", ".join(f"L{t['layer']}H{t['head']} {_e(t['effect'])}" for t in h["top_exact"]),
            "top heads by attribution:    "
            + ", ".join(f"L{t['layer']}H{t['head']} {t['attribution'] / norm:+.3f}" for t in h["top_attribution"]),
        ]
        mx, am = p["max_effect"], p["argmax"]
        out.append(
            f"positions x layers ({len(p['offsets'])} offsets: {p['positions']}): Spearman(attribution, exact) = "
            f"{p['spearman_attribution_vs_exact']:+.3f}; max effect {_e(mx)} "
            f"at offset {p['offsets'][am[0]]}, layer {p['layers'][am[1]]}"
        )
        for g, v in (p.get("group_effect") or {}).items():
            num = g.split()[-1]
            out.append(
                f"  demonstration {num} answer patched as a group: " + ", ".join(f"{lk} {_e(e)}" for lk, e in v.items())
            )
        for fam, r in s["component_ranking"].items():
            out.append(
                f"component ranking {fam}: Spearman(diff score, |effect|) = "
                f"{r['spearman_diff_score_vs_abs_effect']:+.3f}, top-{k} overlap {r['overlap']}"
            )
        return "\n".join(out + self.wrote())


STUDY = register(Study("patching_sweep", PatchingSweepConfig, run, PatchingSweepResult, load_model=False))
