"""Exact vs. attribution patching, residual patching by position x layer, and component ranking.

    HF_HUB_OFFLINE=1 python analyses/patching_sweep.py [--n-per-relation 1] [--layer-stride 5] [--n-positions 12]

Honest prompts are clean, lying prompts corrupt (few-shot format). Writes
results/patching_sweep/<run>/{config.json, summary.json, tensors.pt, *.html, *.png}.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from mechlie.attribution import attribute_pairs, spearman
from mechlie.component_ranking import rank_components
from mechlie.io import atomic_torch_save, atomic_write_json, ensure_writable_dir
from mechlie.models import DEFAULT_MODEL, load_model
from mechlie.pairs import load_builtin, tokenize
from mechlie.patching import patch_final_position
from mechlie.plotting import heatmap, save_figure, side_by_side
from mechlie.position_patching import patch_positions

METRICS = ("logit_diff", "p_truth")


@dataclass
class Config:
    model: str = DEFAULT_MODEL
    dataset: str = "all"
    fmt: str = "fewshot"
    n_per_relation: int = 1  # 4 pairs with dataset 'all'
    metric: str = "logit_diff"
    layer_stride: int = 5  # position patching: every layer_stride-th layer (1 = all)
    n_positions: int = 12  # position patching: the last n positions (0 = all common positions)
    top_k: int = 10
    batch_size: int = 8
    out_dir: str = "results/patching_sweep"
    run: str = "default"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}")
        if self.layer_stride < 1 or self.n_positions < 0 or self.n_per_relation < 1:
            raise ValueError("need layer_stride >= 1, n_positions >= 0, n_per_relation >= 1")


def parse_args(argv=None) -> Config:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return Config(**vars(ap.parse_args(argv)))


def _heads(x: torch.Tensor, k: int, H: int) -> list[tuple[int, int]]:
    return [(int(i) // H, int(i) % H) for i in x.flatten().topk(k).indices]


def main(cfg: Config) -> dict:
    out = ensure_writable_dir(Path(cfg.out_dir) / cfg.run)
    atomic_write_json(out / "config.json", asdict(cfg))
    model = load_model(cfg.model)
    pairs = load_builtin(cfg.dataset, cfg.fmt, tokenizer=model.tokenizer, n=cfg.n_per_relation)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    print(f"{len(pairs)} pairs ({cfg.fmt})")

    # 1. exact final-position patching of every head, and the attribution estimate of the same patches.
    exact = patch_final_position(model, pairs, "z", batch_size=cfg.batch_size)
    exact_delta = getattr(exact, cfg.metric).mean(0) - getattr(exact.corrupt, cfg.metric).mean()
    att = attribute_pairs(model, pairs, metric=cfg.metric, batch_size=cfg.batch_size)
    rho_heads = spearman(att.z_final, exact_delta)
    rho_heads_abs = spearman(att.z_final.abs(), exact_delta.abs())
    top_exact, top_att = _heads(exact_delta.abs(), cfg.top_k, H), _heads(att.z_final.abs(), cfg.top_k, H)

    # 2. residual patching by position x layer (aligned from the end), and its attribution estimate.
    layers = list(range(0, L, cfg.layer_stride))
    pos = patch_positions(model, pairs, kind="resid_pre", layers=layers, n_positions=cfg.n_positions or None)
    pos_delta = getattr(pos, cfg.metric).mean(0) - getattr(pos.corrupt, cfg.metric).mean()  # [P, layers]
    P = len(pos.offsets)
    att_pos = att.resid[:, -P:, layers].mean(0)  # the same offsets and layers
    rho_pos = spearman(att_pos, pos_delta)

    # 3. component-difference ranking, reusing the head patches.
    rankings = rank_components(model, pairs, top_k=cfg.top_k, batch_size=cfg.batch_size, patches={"z": exact})

    first = tokenize(model, [pairs[0].lying]).tokens[0, -P:].tolist()
    ticks = [f"{o}:{model.tokenizer.decode([t])!r}" for o, t in zip(pos.offsets, first)]
    summary = {
        "model": model.cfg.model_name,
        "n_pairs": len(pairs),
        "metric": cfg.metric,
        "honest_mean": float(getattr(exact.clean, cfg.metric).mean()),
        "lying_mean": float(getattr(exact.corrupt, cfg.metric).mean()),
        "heads": {
            "spearman_attribution_vs_exact": rho_heads,
            "spearman_abs": rho_heads_abs,
            "top_exact": [{"layer": l, "head": h, "delta": float(exact_delta[l, h]), "attribution": float(att.z_final[l, h])} for l, h in top_exact],
            "top_attribution": [{"layer": l, "head": h, "attribution": float(att.z_final[l, h]), "delta": float(exact_delta[l, h])} for l, h in top_att],
            "top_k_overlap": len(set(top_exact) & set(top_att)),
        },
        "positions": {
            "kind": pos.kind,
            "layers": layers,
            "offsets": list(pos.offsets),
            "tick_labels_pair0": ticks,
            "spearman_attribution_vs_exact": rho_pos,
            "max_effect": float(pos.effect(cfg.metric).max()),
            "argmax": [int(i) for i in torch.unravel_index(pos.effect(cfg.metric).argmax(), pos_delta.shape)],
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
    atomic_write_json(out / "summary.json", summary)
    atomic_torch_save(
        out / "tensors.pt",
        {
            "exact_delta_heads": exact_delta, "attribution_z": att.z, "attribution_resid": att.resid, "valid": att.valid,
            "position_delta": pos_delta, "position_p_truth": pos.p_truth, "position_logit_diff": pos.logit_diff,
            "position_offsets": pos.offsets, "position_layers": pos.layers,
            **{f"diff_score_{f}": r.score for f, r in rankings.items()},
            **{f"effect_{f}": r.effect for f, r in rankings.items()},
        },
    )

    norm = float(getattr(exact.clean, cfg.metric).mean() - getattr(exact.corrupt, cfg.metric).mean())
    figs = {}
    f1 = heatmap(exact_delta / norm, "exact", colorbar="effect", zmid=0.0)
    f2 = heatmap(att.z_final / norm, "attribution", colorbar="effect", zmid=0.0)
    figs["heads_exact_vs_attribution"] = save_figure(
        side_by_side([f1, f2], ["exact patching", f"attribution (ρ={rho_heads:.2f})"], f"Heads at the final position ({cfg.metric}, normalized)"),
        out / "heads_exact_vs_attribution",
    )
    ylab = [str(l) for l in layers]
    g1 = heatmap((pos_delta / norm).T, "exact", x_label="position", y_label="layer", zmid=0.0, x_ticks=ticks, y_ticks=ylab)
    g2 = heatmap((att_pos / norm).T, "attribution", x_label="position", y_label="layer", zmid=0.0, x_ticks=ticks, y_ticks=ylab)
    figs["positions"] = save_figure(
        side_by_side([g1, g2], ["exact resid_pre patching", f"attribution (ρ={rho_pos:.2f})"], "Residual patching by position × layer (from the end)"),
        out / "positions_exact_vs_attribution",
    )
    zpos = att.z[:, -P:].mean(0).sum(-1) / norm  # [P, L], summed over heads
    figs["z_by_position"] = save_figure(
        heatmap(zpos.T, "Attribution of head outputs by position (sum over heads)", x_label="position", zmid=0.0, x_ticks=ticks),
        out / "z_attribution_by_position",
    )
    hr = rankings["head"]
    figs["component_ranking"] = save_figure(
        side_by_side([heatmap(hr.score, "diff"), heatmap(hr.effect.abs(), "effect")], ["difference score", "|patching effect|"],
                     f"Heads: difference score vs causal effect (ρ={hr.spearman:.2f})"),
        out / "component_ranking_heads",
    )

    print(f"\nheads: Spearman(attribution, exact) = {rho_heads:+.3f} (|.|: {rho_heads_abs:+.3f}); top-{cfg.top_k} overlap {summary['heads']['top_k_overlap']}")
    print("top heads by exact patching:", ", ".join(f"L{l}H{h} {exact_delta[l, h] / norm:+.3f}" for l, h in top_exact))
    print("top heads by attribution:   ", ", ".join(f"L{l}H{h} {att.z_final[l, h] / norm:+.3f}" for l, h in top_att))
    print(f"positions x layers: Spearman(attribution, exact) = {rho_pos:+.3f}; max effect {summary['positions']['max_effect']:+.3f}")
    for fam, r in summary["component_ranking"].items():
        print(f"component ranking {fam}: Spearman(diff score, |effect|) = {r['spearman_diff_score_vs_abs_effect']:+.3f}, "
              f"top-{cfg.top_k} overlap {r['overlap']}")
    print(f"\nwrote {out}/config.json, summary.json, tensors.pt and figures:")
    for k, v in figs.items():
        print(f"  {k}: {v['html']}" + (f", {v['png']}" if v["png"] else ""))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(parse_args())
