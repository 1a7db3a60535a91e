"""Exact vs. attribution patching, residual patching by position x layer, and component ranking.

    python analyses/patching_sweep.py [--n-per-relation 1] [--layer-stride 5] [--positions differing]
    python analyses/patching_sweep.py --positions last --n-positions 12 --device cuda

Honest prompts are clean, lying prompts corrupt (few-shot format). The position sweep covers,
by default, every position where the honest and lying prompts differ (the demonstrations'
answers), the last ``--n-final`` positions, and each demonstration's answer as a group. Every
effect is printed with a 95% bootstrap CI over pairs. Writes results/patching_sweep/<run>/
(config, summary, safetensors, figures); the run name comes from the settings, so a rerun with
other settings never overwrites it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

import torch

from mechlie.core.cli import RunDir, run_script
from mechlie.core.models import DEFAULT_MODEL

METRICS = ("logit_diff", "p_truth")


@dataclass(frozen=True)
class Config:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "embedded name, .gguf file, HF dir, or TL name"})
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
    device: str = field(default="", metadata={"help": "cpu, cuda, ... (default: cuda if available)"})
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    n_devices: int = field(
        default=1, metadata={"help": "split the layers over this many GPUs (TransformerLens's n_devices)"}
    )
    batch_size: int = field(default=8, metadata={"help": "prompts per batch", "run": False})
    out_dir: str = "results/patching_sweep"
    run_name: str = ""

    def __post_init__(self) -> None:
        if self.layer_stride < 1 or self.n_positions < 0 or self.n_per_relation < 1 or self.n_final < 1:
            raise ValueError("need --layer-stride >= 1, --n-positions >= 0, --n-per-relation >= 1, --n-final >= 1")
        if self.n_boot < 10 or self.batch_size < 1 or self.n_devices < 1 or self.top_k < 1:
            raise ValueError("need --n-boot >= 10, --batch-size >= 1, --n-devices >= 1, --top-k >= 1")


def main(cfg: Config, run: RunDir) -> dict:
    from mechlie.causal.attribution import attribute_pairs
    from mechlie.causal.component_ranking import rank_components
    from mechlie.causal.patching import patch_final_position
    from mechlie.causal.position_patching import patch_positions
    from mechlie.core.io import save_tensors
    from mechlie.core.kv import load_model_split, top_heads
    from mechlie.core.pairs import load_builtin, tokenize
    from mechlie.core.stats import spearman
    from mechlie.report.plotting import errorbars, heatmap, save_figure, side_by_side

    out = run.path
    model = load_model_split(cfg.model, device=cfg.device, dtype=cfg.dtype, n_devices=cfg.n_devices)
    pairs = load_builtin(cfg.dataset, cfg.fmt, tokenizer=model.tokenizer, n=cfg.n_per_relation)
    L = model.cfg.n_layers
    print(f"{len(pairs)} pairs ({cfg.fmt})")

    # 1. exact final-position patching of every head, and the attribution estimate of the same patches.
    exact = patch_final_position(model, pairs, "z", batch_size=cfg.batch_size)
    exact_delta = getattr(exact, cfg.metric).mean(0) - getattr(exact.corrupt, cfg.metric).mean()
    att = attribute_pairs(model, pairs, metric=cfg.metric, batch_size=cfg.batch_size)
    rho_heads = spearman(att.z_final, exact_delta)
    rho_heads_abs = spearman(att.z_final.abs(), exact_delta.abs())
    top_exact, top_att = top_heads(exact_delta.abs(), cfg.top_k), top_heads(att.z_final.abs(), cfg.top_k)
    head_ci = exact.effect_ci(cfg.metric, n_boot=cfg.n_boot)

    # 2. residual patching by position x layer (aligned from the end), and its attribution estimate.
    layers = list(range(0, L, cfg.layer_stride))
    pos = patch_positions(
        model,
        pairs,
        kind="resid_pre",
        layers=layers,
        positions=cfg.positions,
        n_positions=cfg.n_positions or None,
        n_final=cfg.n_final,
    )
    pos_delta = getattr(pos, cfg.metric).mean(0) - getattr(pos.corrupt, cfg.metric).mean()  # [P, layers]
    P = len(pos.offsets)
    width = att.resid.shape[1]
    cols = [width + o for o in pos.offsets]  # attribution columns are offsets from the end too
    att_pos = att.resid[:, cols][:, :, layers].mean(0)  # the same offsets and layers
    rho_pos = spearman(att_pos, pos_delta)
    from mechlie.core.stats import bootstrap_tensor

    pos_ci = bootstrap_tensor(lambda i: pos.effect(cfg.metric, i), len(pairs), n_boot=cfg.n_boot)
    group_ci = (
        bootstrap_tensor(lambda i: pos.group_effect(cfg.metric, i), len(pairs), n_boot=cfg.n_boot)
        if pos.group_p_truth is not None
        else None
    )

    # 3. component-difference ranking, reusing the head patches.
    rankings = rank_components(model, pairs, top_k=cfg.top_k, batch_size=cfg.batch_size, patches={"z": exact})

    first = tokenize(model, [pairs[0].lying]).tokens[0].tolist()
    ticks = [f"{o}:{model.tokenizer.decode([first[o]])!r}" for o in pos.offsets]
    summary = {
        "model": model.cfg.model_name,
        "n_pairs": len(pairs),
        "metric": cfg.metric,
        "honest_mean": float(getattr(exact.clean, cfg.metric).mean()),
        "lying_mean": float(getattr(exact.corrupt, cfg.metric).mean()),
        "heads": {
            "spearman_attribution_vs_exact": rho_heads,
            "spearman_abs": rho_heads_abs,
            "top_exact": [
                {
                    "layer": l,
                    "head": h,
                    "delta": float(exact_delta[l, h]),
                    "effect": head_ci.at(l, h).to_dict(),
                    "attribution": float(att.z_final[l, h]),
                }
                for l, h in top_exact
            ],
            "top_attribution": [
                {"layer": l, "head": h, "attribution": float(att.z_final[l, h]), "delta": float(exact_delta[l, h])}
                for l, h in top_att
            ],
            "top_k_overlap": len(set(top_exact) & set(top_att)),
        },
        "positions": {
            "kind": pos.kind,
            "layers": layers,
            "offsets": list(pos.offsets),
            "tick_labels_pair0": ticks,
            "spearman_attribution_vs_exact": rho_pos,
            "positions": cfg.positions,
            "max_effect": pos_ci.at(
                *[int(i) for i in torch.unravel_index(pos.effect(cfg.metric).argmax(), pos_delta.shape)]
            ).to_dict(),
            "argmax": [int(i) for i in torch.unravel_index(pos.effect(cfg.metric).argmax(), pos_delta.shape)],
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
    }
    save_tensors(
        out / "tensors.safetensors",
        {
            "exact_delta_heads": exact_delta,
            "head_effect_lo": head_ci.lo,
            "head_effect_hi": head_ci.hi,
            "attribution_z": att.z,
            "attribution_resid": att.resid,
            "valid": att.valid.to(torch.uint8),
            "position_delta": pos_delta,
            "position_p_truth": pos.p_truth,
            "position_logit_diff": pos.logit_diff,
            **(
                {"group_p_truth": pos.group_p_truth, "group_logit_diff": pos.group_logit_diff}
                if pos.group_p_truth is not None
                else {}
            ),
            **{f"diff_score_{f}": r.score for f, r in rankings.items()},
            **{f"effect_{f}": r.effect for f, r in rankings.items()},
        },
        {"position_offsets": list(pos.offsets), "position_layers": list(pos.layers)},
    )

    norm = float(getattr(exact.clean, cfg.metric).mean() - getattr(exact.corrupt, cfg.metric).mean())
    figs = {}
    f1 = heatmap(exact_delta / norm, "exact", colorbar="effect", zmid=0.0)
    f2 = heatmap(att.z_final / norm, "attribution", colorbar="effect", zmid=0.0)
    figs["heads_exact_vs_attribution"] = save_figure(
        side_by_side(
            [f1, f2],
            ["exact patching", f"attribution (ρ={rho_heads:.2f})"],
            f"Heads at the final position ({cfg.metric}, normalized)",
        ),
        out / "heads_exact_vs_attribution",
    )
    ylab = [str(l) for l in layers]
    g1 = heatmap(
        (pos_delta / norm).T, "exact", x_label="position", y_label="layer", zmid=0.0, x_ticks=ticks, y_ticks=ylab
    )
    g2 = heatmap(
        (att_pos / norm).T, "attribution", x_label="position", y_label="layer", zmid=0.0, x_ticks=ticks, y_ticks=ylab
    )
    figs["positions"] = save_figure(
        side_by_side(
            [g1, g2],
            ["exact resid_pre patching", f"attribution (ρ={rho_pos:.2f})"],
            "Residual patching by position × layer (from the end)",
        ),
        out / "positions_exact_vs_attribution",
    )
    zpos = att.z[:, cols].mean(0).sum(-1) / norm  # [P, L], summed over heads
    figs["z_by_position"] = save_figure(
        heatmap(
            zpos.T,
            "Attribution of head outputs by position (sum over heads)",
            x_label="position",
            zmid=0.0,
            x_ticks=ticks,
        ),
        out / "z_attribution_by_position",
    )
    if group_ci is not None:
        figs["demonstration_groups"] = save_figure(
            errorbars(
                [f"demo {g + 1}" for g in range(group_ci.mean.shape[0])],
                {
                    f"L{l}": (group_ci.mean[:, j].tolist(), group_ci.lo[:, j].tolist(), group_ci.hi[:, j].tolist())
                    for j, l in enumerate(layers)
                },
                "Each demonstration's answer tokens patched together (resid_pre, honest into lying; 1 = honest)",
                y_label="normalized effect",
            ),
            out / "demonstration_groups",
        )
    hr = rankings["head"]
    figs["component_ranking"] = save_figure(
        side_by_side(
            [heatmap(hr.score, "diff"), heatmap(hr.effect.abs(), "effect")],
            ["difference score", "|patching effect|"],
            f"Heads: difference score vs causal effect (ρ={hr.spearman:.2f})",
        ),
        out / "component_ranking_heads",
    )

    print(
        f"\nheads: Spearman(attribution, exact) = {rho_heads:+.3f} (|.|: {rho_heads_abs:+.3f}); "
        f"top-{cfg.top_k} overlap {summary['heads']['top_k_overlap']}"
    )
    print(
        "top heads by exact patching (95% CI over pairs):",
        ", ".join(f"L{l}H{h} {head_ci.at(l, h):+.3f}" for l, h in top_exact),
    )
    print("top heads by attribution:   ", ", ".join(f"L{l}H{h} {att.z_final[l, h] / norm:+.3f}" for l, h in top_att))
    mx = summary["positions"]["max_effect"]
    print(
        f"positions x layers ({P} offsets: {cfg.positions}): Spearman(attribution, exact) = {rho_pos:+.3f}; max effect "
        f"{mx['mean']:+.3f} [{mx['lo']:+.3f}, {mx['hi']:+.3f}] "
        f"at offset {pos.offsets[summary['positions']['argmax'][0]]}, "
        f"layer {layers[summary['positions']['argmax'][1]]}"
    )
    if group_ci is not None:
        for g in range(group_ci.mean.shape[0]):
            print(
                f"  demonstration {g + 1} answer patched as a group: "
                + ", ".join(f"L{l} {group_ci.at(g, j):+.3f}" for j, l in enumerate(layers))
            )
    for fam, r in summary["component_ranking"].items():
        print(
            f"component ranking {fam}: Spearman(diff score, |effect|) = {r['spearman_diff_score_vs_abs_effect']:+.3f}, "
            f"top-{cfg.top_k} overlap {r['overlap']}"
        )
    print(f"\nwrote {out}/config.json, summary.json, tensors.safetensors and figures:")
    for k, v in figs.items():
        print(f"  {k}: {v['html']}" + (f", {v['png']}" if v["png"] else ""))
    return summary


if __name__ == "__main__":
    sys.exit(run_script(Config, main, doc=__doc__))
