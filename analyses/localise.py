"""Localise the lie: how few heads carry it, and what feeds the top head.

    python analyses/localise.py                            # default model, built-in pairs
    python analyses/localise.py --n-pairs 6 --n-random 20  # quicker
    python analyses/localise.py --receiver 20.5 --device cuda --dtype bfloat16

1. Heads are ranked by their single-head patching effect on training pairs; the top-k heads
   (k = 1, 2, 4, ... all) are patched together on held-out pairs, honest into lying (restore) and
   lying into honest (induce), beside many random k-sets. The minimal set reaching 80% of the
   logit difference is reported with a bootstrap CI over held-out pairs, and its share of heads.
2. Path patching into the receiver (default: the top restore head): each earlier head and MLP,
   along the path into the receiver's queries, keys or values (Wang et al. 2022).
3. Position patching of the receiver's key/value inputs: which source positions it takes the lie
   from, marked where the honest and lying prompts differ (the demonstrations' answers).

Writes results/localise/<run>/: summary.json, curves, heatmaps, the circuit diagram (.html/.png),
and the raw per-pair scores (safetensors). See mechlie.causal.circuits for the definitions and signs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from mechlie.core.cli import RunDir, run_script
from mechlie.core.models import DEFAULT_MODEL

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class LocaliseConfig:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "embedded name, .gguf file, HF dir, or TL name"})
    dataset: str = field(default="all", metadata={"help": "a built-in relation or 'all'"})
    n_pairs: int = field(default=10, metadata={"help": "pairs sampled per relation (seeded)"})
    test_frac: float = field(default=0.5, metadata={"help": "share of facts held out for the curves"})
    n_random: int = field(default=50, metadata={"help": "random head sets per k (the control)"})
    threshold: float = field(default=0.8, metadata={"help": "share of the effect the minimal set must restore"})
    receiver: str = field(default="", metadata={"help": "receiver head as LAYER.HEAD (default: the top restore head)"})
    n_path_pairs: int = field(default=8, metadata={"help": "held-out pairs used for path and position patching"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples"})
    seed: int = 0
    device: str = field(default="", metadata={"help": "cpu, cuda, cuda:1, ... (default: cuda if available)"})
    dtype: str = field(default="float32", metadata={"help": f"one of {DTYPES}"})
    n_devices: int = field(
        default=1, metadata={"help": "split the layers over this many GPUs (TransformerLens's n_devices)"}
    )
    batch_size: int = field(default=16, metadata={"help": "prompts per cached prefix", "run": False})
    out_dir: str = "results/localise"
    run_name: str = ""

    def __post_init__(self) -> None:
        if self.n_pairs < 2 or self.n_random < 1 or self.n_boot < 10 or self.n_path_pairs < 1 or self.batch_size < 1:
            raise ValueError(
                "need --n-pairs >= 2, --n-random >= 1, --n-boot >= 10, --n-path-pairs >= 1, --batch-size >= 1"
            )
        if not 0 < self.test_frac < 1 or not 0 < self.threshold <= 1:
            raise ValueError("--test-frac must be in (0, 1) and --threshold in (0, 1]")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.n_devices < 1:
            raise ValueError("--n-devices must be >= 1")
        if self.receiver:
            parse_head(self.receiver)


def parse_head(text: str) -> tuple[int, int]:
    try:
        layer, head = (int(x) for x in text.replace("L", "").replace("H", ".").strip(".").split("."))
    except ValueError:
        raise ValueError(f"a head is LAYER.HEAD (e.g. 20.5), got {text!r}") from None
    return layer, head


def main(cfg: LocaliseConfig, run: RunDir) -> dict:
    from mechlie.causal import circuits
    from mechlie.core.io import save_tensors
    from mechlie.core.kv import load_model_split
    from mechlie.core.pairs import load_builtin
    from mechlie.core.stats import bootstrap, bootstrap_tensor
    from mechlie.read.directions import split_by_fact
    from mechlie.report import plotting

    torch.manual_seed(cfg.seed)
    t0 = time.time()
    model = load_model_split(cfg.model, device=cfg.device, dtype=cfg.dtype, n_devices=cfg.n_devices)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if cfg.receiver:
        circuits.check_heads(model, [parse_head(cfg.receiver)], what="receiver")
    pairs = load_builtin(cfg.dataset, "fewshot", tokenizer=model.tokenizer, n=cfg.n_pairs, seed=cfg.seed)
    split = split_by_fact([p.fact_id for p in pairs], test_frac=cfg.test_frac, seed=cfg.seed)
    train, test = [pairs[i] for i in split.train], [pairs[i] for i in split.test]
    print(f"{cfg.model}: {len(pairs)} pairs ({len(train)} train / {len(test)} held-out), {L}x{H} = {L * H} heads")
    summary: dict = {
        "model": cfg.model,
        "n_pairs": len(pairs),
        "n_train": len(train),
        "n_test": len(test),
        "n_heads": L * H,
    }
    tensors: dict[str, torch.Tensor] = {}
    figs = {}

    # 1. top-k curves, both directions
    curves = {}
    for direction in ("restore", "induce"):
        c = circuits.topk_curve(
            model,
            train,
            test,
            direction=direction,
            n_random=cfg.n_random,
            threshold=cfg.threshold,
            n_boot=cfg.n_boot,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
        )
        curves[direction] = c
        summary[f"topk_{direction}"] = c.summary()
        tensors[f"{direction}_train_effect"] = c.train_effect
        tensors[f"{direction}_all_k_effect"] = c.all_k_effect
        tensors[f"{direction}_random_effects"] = c.random_effects
        ks = list(c.ks)
        msg = (
            f"{c.minimal_k} heads ({100 * c.minimal_share:.1f}% of {c.n_heads}), 95% CI "
            f"[{c.minimal_k_ci[0]:.0f}, {c.minimal_k_ci[1]:.0f}]"
            if c.minimal_k
            else f"no top-k set reaches {cfg.threshold:.0%}"
        )
        print(f"\n{direction}: minimal set for {cfg.threshold:.0%} of the logit difference: {msg}")
        for k, e, rm, rl, rh in zip(ks, c.top, c.random_mean, c.random_lo, c.random_hi):
            print(
                f"  k={k:>3}: top-k {e.mean:+.3f} [{e.lo:+.3f}, {e.hi:+.3f}] | random k-sets {rm:+.3f} "
                f"(2.5-97.5%: {rl:+.3f}..{rh:+.3f}, {cfg.n_random} draws)"
            )
        figs[f"topk_{direction}"] = plotting.lines(
            ks,
            {
                "top-k (ranked on training pairs)": [e.mean for e in c.top],
                "random k-sets (mean; band: 95% of draws)": c.random_mean.tolist(),
            },
            f"{direction}: joint patching of k heads on {c.n_test} held-out pairs "
            f"(1 = {'honest' if direction == 'restore' else 'lying'})",
            x_label="k (heads patched together)",
            y_label="normalized logit-diff effect",
            bands={
                "top-k (ranked on training pairs)": ([e.lo for e in c.top], [e.hi for e in c.top]),
                "random k-sets (mean; band: 95% of draws)": (c.random_lo.tolist(), c.random_hi.tolist()),
            },
        )
        figs[f"topk_{direction}"].update_xaxes(type="log")

    # 2. path patching into the receiver
    receiver = parse_head(cfg.receiver) if cfg.receiver else curves["restore"].ranking[0]
    if receiver[0] == 0:
        raise ValueError(
            f"the receiver L{receiver[0]}H{receiver[1]} is in block 0, so no head sends to it; pass --receiver"
        )
    path_pairs = test[: cfg.n_path_pairs]
    pr = circuits.path_patch(model, path_pairs, receiver)
    est = pr.effect_ci(n_boot=cfg.n_boot, seed=cfg.seed)
    names = [str(s) for s in pr.senders]
    tensors["path_p_truth"], tensors["path_logit_diff"] = pr.p_truth, pr.logit_diff
    total = est.mean.sum(1)
    order = total.abs().argsort(descending=True)[:10].tolist()
    tops = [{"sender": names[i], **{ch: est.at(i, c).to_dict() for c, ch in enumerate(pr.channels)}} for i in order]
    summary["path"] = {"receiver": list(receiver), "n_pairs": len(path_pairs), "note": pr.note, "top_senders": tops}
    print(
        f"\nPath patching into L{receiver[0]}H{receiver[1]} (restore; 1 = honest; 95% CI over {len(path_pairs)} pairs)"
        + (f"\n  ({pr.note})" if pr.note else "")
    )
    for i in order:
        print(f"  {names[i]:>7}: " + " | ".join(f"{ch} {est.at(i, c):+.3f}" for c, ch in enumerate(pr.channels)))
    hm = est.mean.T  # [channel, sender]
    figs["path_senders"] = plotting.heatmap(
        hm,
        f"Path patching into L{receiver[0]}H{receiver[1]}: sender x channel (restore, normalized)",
        x_label="sender",
        y_label="receiver input",
        zmid=0.0,
        x_ticks=names,
        y_ticks=list(pr.channels),
    )

    # 3. receiver positions
    rp = circuits.receiver_positions(model, path_pairs, receiver)
    pos_est = bootstrap_tensor(lambda i: rp.effect("logit_diff", i), len(path_pairs), n_boot=cfg.n_boot, seed=cfg.seed)
    tensors["positions_logit_diff"], tensors["positions_differs"], tensors["positions_attention"] = (
        rp.logit_diff,
        rp.differs,
        rp.attention,
    )
    tensors["positions_source_logit_diff"], tensors["positions_target_logit_diff"] = (
        rp.source.logit_diff,
        rp.target.logit_diff,
    )
    differs = rp.differs.mean(0) > 0
    eff = pos_est.mean
    on = float(eff[differs].sum()) if differs.any() else 0.0
    best = eff.abs().argsort(descending=True)[:8].tolist()
    # Each pair's own differing tokens (its demonstrations' answers sit at other offsets than
    # another pair's): summed effect there vs at its other positions, normalized on the pair means.
    own = {}
    for name, m in (("own_differing", rp.differs), ("own_identical", 1 - rp.differs)):

        def split(i, m=m):
            gap = rp.source.logit_diff[i].mean() - rp.target.logit_diff[i].mean()
            return ((rp.logit_diff[i] - rp.target.logit_diff[i, None]) * m[i]).sum(1).mean() / gap

        own[name] = bootstrap(split, len(path_pairs), n_boot=cfg.n_boot, seed=cfg.seed).to_dict()
    own["attention_own_differing"] = float((rp.attention * rp.differs).sum(1).mean())
    own["n_own_differing_per_pair"] = float(rp.differs.sum(1).mean())
    summary["positions"] = {
        "offsets": list(rp.offsets),
        "effect": eff.tolist(),
        "lo": pos_est.lo.tolist(),
        "hi": pos_est.hi.tolist(),
        "differing_offsets": [rp.offsets[j] for j in differs.nonzero().squeeze(1).tolist()],
        "sum_effect_differing": on,
        "sum_effect_other": float(eff[~differs].sum()),
        "attention_on_differing": float(rp.attention[:, differs].sum(1).mean()),
        "top_positions": [
            {"offset": rp.offsets[j], "differs": bool(differs[j]), **pos_est.at(j).to_dict()} for j in best
        ],
        **own,
    }
    print(
        f"\nReceiver key/value inputs by source position (restore, one position at a time): summed effect "
        f"{on:+.3f} at the {int(differs.sum())} positions where the prompts differ vs "
        f"{float(eff[~differs].sum()):+.3f} elsewhere; attention from the final token on differing positions "
        f"{summary['positions']['attention_on_differing']:.2f}"
    )
    od, oi = own["own_differing"], own["own_identical"]
    print(
        f"  per pair, at its own {own['n_own_differing_per_pair']:.1f} differing tokens (the demonstrations' answers): "
        f"{od['mean']:+.3f} [{od['lo']:+.3f}, {od['hi']:+.3f}] vs its other positions {oi['mean']:+.3f} "
        f"[{oi['lo']:+.3f}, {oi['hi']:+.3f}]; attention on them {own['attention_own_differing']:.2f}"
    )
    for j in best:
        print(f"  offset {rp.offsets[j]:>4}{' (differs)' if differs[j] else '          '}: {pos_est.at(j):+.3f}")
    figs["receiver_positions"] = plotting.errorbars(
        [f"{o}{'*' if d else ''}" for o, d in zip(rp.offsets, differs.tolist())],
        {"effect": (eff.tolist(), pos_est.lo.tolist(), pos_est.hi.tolist())},
        f"L{receiver[0]}H{receiver[1]}'s keys/values from the honest run, one position at a time (* = tokens differ)",
        y_label="normalized effect",
        secondary={"attention (lying run)": rp.attention.mean(0).tolist()},
        secondary_label="attention",
    )

    # 4. circuit diagram
    figs["circuit"] = circuit_figure(receiver, names, est.mean, pr.channels, curves["restore"].minimal_set)
    summary["figures"] = plotting.save_figures(figs, run.path)
    save_tensors(run.file("scores.safetensors"), tensors, {"receiver": list(receiver), "senders": names})
    summary["seconds"] = round(time.time() - t0, 1)
    print(f"\nWrote {run.path}/ in {summary['seconds']} s")
    return summary


def circuit_figure(receiver, senders, effect, channels, minimal_set, top: int = 8):
    """Components as nodes (the senders with the largest path effects, the receiver, the logits);
    edges labelled with the path effect, width by size."""
    import plotly.graph_objects as go

    total = effect.sum(1)
    order = total.abs().argsort(descending=True)[:top].tolist()
    fig = go.Figure()
    rx, ry = 1.0, 0.5
    ys = [i / max(1, len(order) - 1) for i in range(len(order))]
    for y, i in zip(ys, order):
        best_c = int(effect[i].abs().argmax())
        w = float(effect[i, best_c])
        fig.add_trace(
            go.Scatter(
                x=[0, rx],
                y=[y, ry],
                mode="lines",
                line={"width": 1 + 30 * abs(w), "color": "#d62728" if w > 0 else "#1f77b4"},
                hoverinfo="text",
                text=f"{senders[i]} -> {channels[best_c]}: {w:+.3f}",
                showlegend=False,
            )
        )
        # label near the sender's end of its edge, where edges are still apart
        fig.add_annotation(
            x=0.2,
            y=y + 0.2 * (ry - y),
            text=f"{channels[best_c]} {w:+.2f}",
            showarrow=False,
            font={"size": 10},
            yshift=8,
        )
    fig.add_trace(
        go.Scatter(
            x=[0] * len(order),
            y=ys,
            mode="markers+text",
            text=[senders[i] for i in order],
            textposition="middle left",
            marker={"size": 18, "color": "#7f7f7f"},
            showlegend=False,
        )
    )
    fig.add_trace(
        go.Scatter(x=[rx, 2.0], y=[ry, ry], mode="lines", line={"width": 3, "color": "#2ca02c"}, showlegend=False)
    )
    label = f"L{receiver[0]}H{receiver[1]}" + (" (in minimal set)" if tuple(receiver) in set(minimal_set) else "")
    fig.add_trace(
        go.Scatter(
            x=[rx, 2.0],
            y=[ry, ry],
            mode="markers+text",
            text=[label, "answer logits"],
            textposition="top center",
            marker={"size": [26, 20], "color": ["#d62728", "#2ca02c"]},
            showlegend=False,
        )
    )
    fig.update_layout(
        title="Circuit: path effects into the top lying head (restore; red = toward honest)",
        xaxis={"visible": False, "range": [-0.6, 2.4]},
        yaxis={"visible": False},
        width=900,
        height=560,
        template="plotly_white",
    )
    return fig


if __name__ == "__main__":
    sys.exit(run_script(LocaliseConfig, main, doc=__doc__))
