"""Localise the lie: how few heads carry it, and what feeds the top head.

0. Known facts only (unless ``--no-known-only``), with the head sweep's definition
   (:data:`mechlie.studies.localise_variance.KNOWN_DEFINITION`); the count is in the summary.
1. Heads are ranked by their single-head patching effect on training pairs; the top-k heads
   (k = 1, 2, 4, ... all) are patched together on held-out pairs, honest into lying (restore) and
   lying into honest (induce), beside many random k-sets. The minimal set reaching 80% of the
   logit difference is reported with two CIs: over held-out pairs with the ranking fixed
   (``minimal_k_ci``), and (restore) with the heads re-ranked on every bootstrap resample of the
   training pairs (``minimal_k_rerank``: the ranking's own variance included), and as a
   distribution over ``n_split_seeds`` splits of the facts (``split_seeds``).
2. Path patching into the receiver (default: the top restore head): each earlier head and MLP,
   along the path into the receiver's queries, keys or values (Wang et al. 2022).
3. Position patching of the receiver's key/value inputs: which source positions it takes the lie
   from, marked where the honest and lying prompts differ (the demonstrations' answers), and how
   much of its attention lands on the demonstrations' answers in the honest and in the lying prompt
   (``receiver_attention``): reading them in both framings, it copies what the demonstrations say
   rather than detecting falseness.
4. The edge circuit (``--circuit``, on by default; :mod:`mechlie.studies.localise_circuit`): edges
   between every head, MLP, the embeddings and the logits ranked by EAP-IG on training pairs, the
   faithfulness curve of the top edges on held-out pairs beside random edge sets, and EAP / EAP-IG
   against exact edge patching (Spearman, top-k overlap).

Writes RUN/: summary.json, scores.safetensors (the raw per-pair scores and the path-effect matrix)
and figures/ (curves, path senders, receiver positions, the circuit diagram). See
mechlie.causal.circuits for the definitions and signs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mechlie.studies.base import RunFormatError, Study, StudyResult, ci_text, register
from mechlie.studies.flags import model_flag, n_devices_flag

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from transformer_lens import HookedTransformer

    from mechlie.core.cli import RunDir

log = logging.getLogger("mechlie")

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class LocaliseConfig:
    model: str = model_flag()
    dataset: str = field(default="all", metadata={"help": "a built-in relation or 'all'"})
    n_pairs: int = field(default=10, metadata={"help": "pairs sampled per relation (seeded)"})
    test_frac: float = field(default=0.5, metadata={"help": "share of facts held out for the curves"})
    n_random: int = field(default=30, metadata={"help": "random head sets per k (the control)"})
    threshold: float = field(default=0.8, metadata={"help": "share of the effect the minimal set must restore"})
    receiver: str = field(default="", metadata={"help": "receiver head as LAYER.HEAD (default: the top restore head)"})
    n_path_pairs: int = field(default=8, metadata={"help": "held-out pairs used for path and position patching"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples"})
    known_only: bool = field(default=True, metadata={"help": "keep facts the model knows (as the head sweep does)"})
    n_rerank: int = field(
        default=30, metadata={"help": "bootstrap resamples that re-rank the heads for the minimal k's CI (0 = skip)"}
    )
    n_split_seeds: int = field(default=5, metadata={"help": "split seeds for the minimal k's distribution (0 = skip)"})
    k_max: int = field(default=64, metadata={"help": "largest k the re-ranked and per-seed searches try"})
    circuit: bool = field(default=True, metadata={"help": "the edge circuit stage (EAP-IG ranking, faithfulness)"})
    circuit_pairs: int = field(
        default=6, metadata={"help": "equal-length pairs per side (train / held-out) for the edge circuit (0 = all)"}
    )
    ig_steps: int = field(default=5, metadata={"help": "EAP-IG interpolation steps of the input embeddings"})
    n_exact_edges: int = field(
        default=12, metadata={"help": "edges compared with exact patching: this many top + as many random"}
    )
    n_exact_pairs: int = field(default=4, metadata={"help": "held-out pairs for the exact edge comparison"})
    n_edge_random: int = field(default=5, metadata={"help": "random edge sets of the circuit's size (the null)"})
    circuit_seeds: int = field(
        default=1,
        metadata={
            "help": "split seeds the edge circuit is run on (1: the main split; 5 adds about 8 minutes on 2 cores)"
        },
    )
    seed: int = 0
    device: str = field(default="", metadata={"help": "cpu, cuda, cuda:1, ... (default: cuda if available)"})
    dtype: str = field(default="float32", metadata={"help": f"one of {DTYPES}"})
    n_devices: int = n_devices_flag()
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
        if self.n_rerank < 0 or self.n_split_seeds < 0 or self.k_max < 1:
            raise ValueError("need --n-rerank >= 0, --n-split-seeds >= 0 and --k-max >= 1")
        if self.n_devices < 1:
            raise ValueError("--n-devices must be >= 1")
        if self.circuit_pairs < 0 or self.ig_steps < 1 or self.n_exact_edges < 2 or self.n_exact_pairs < 2:
            raise ValueError("need --circuit-pairs >= 0, --ig-steps >= 1, --n-exact-edges >= 2, --n-exact-pairs >= 2")
        if self.n_edge_random < 1 or self.circuit_seeds < 1:
            raise ValueError("--n-edge-random and --circuit-seeds must be >= 1")
        if self.receiver:
            parse_head(self.receiver)


def parse_head(text: str) -> tuple[int, int]:
    try:
        layer, head = (int(x) for x in text.replace("L", "").replace("H", ".").strip(".").split("."))
    except ValueError:
        raise ValueError(f"a head is LAYER.HEAD (e.g. 20.5), got {text!r}") from None
    return layer, head


# ---------------------------------------------------------------------------------------------
# the computation


def run(cfg: LocaliseConfig, model: HookedTransformer | None, run_dir: RunDir) -> LocaliseResult:
    """Top-k curves, path patching into the receiver and its source positions; writes the run."""
    import time

    import torch

    from mechlie.causal import circuits
    from mechlie.core.io import save_tensors
    from mechlie.core.kv import load_model_split
    from mechlie.read.directions import split_by_fact
    from mechlie.report import figures as figlib
    from mechlie.studies import localise_variance as lv

    torch.manual_seed(cfg.seed)
    t0 = time.time()
    if model is None:  # layers may be split over several GPUs, in a chosen dtype
        model = load_model_split(cfg.model, device=cfg.device, dtype=cfg.dtype, n_devices=cfg.n_devices)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if cfg.receiver:
        circuits.check_heads(model, [parse_head(cfg.receiver)], what="receiver")
    t1 = time.time()
    pairs, single, known = _known_pairs(cfg, model)
    split = split_by_fact([p.fact_id for p in pairs], test_frac=cfg.test_frac, seed=cfg.seed)
    train, test = [pairs[i] for i in split.train], [pairs[i] for i in split.test]
    log.info("%s: %d pairs (%d train / %d held-out), %d heads", cfg.model, len(pairs), len(train), len(test), L * H)
    summary: dict = {
        "kind": "localise",
        "model": cfg.model,
        "dataset": cfg.dataset,
        "n_pairs": len(pairs),
        "n_train": len(train),
        "n_test": len(test),
        "n_heads": L * H,
        "n_layers": L,
        "known_filter": known,
    }
    tensors: dict[str, torch.Tensor] = {}
    times: dict[str, float] = {"load_model": t1 - t0, "single_heads": time.time() - t1}
    curves = _topk_curves(cfg, model, train, test, summary, tensors)
    times["topk_curves"] = time.time() - t0 - sum(times.values())
    if cfg.n_rerank and curves["restore"].minimal_k:
        rr, tensors["restore_rerank_minimal_k"] = lv.reranked_ci(
            model, lv.rows(single, split.train), test, curves["restore"].ranking, cfg
        )
        summary["topk_restore"]["minimal_k_rerank"] = rr
        times["rerank"] = time.time() - t0 - sum(times.values())
    receiver = parse_head(cfg.receiver) if cfg.receiver else curves["restore"].ranking[0]
    if receiver[0] == 0:
        raise ValueError(
            f"the receiver L{receiver[0]}H{receiver[1]} is in block 0, so no head sends to it; pass --receiver"
        )
    path_pairs = test[: cfg.n_path_pairs]
    names, channels = _path(cfg, model, path_pairs, receiver, summary, tensors)
    _positions(cfg, model, path_pairs, receiver, summary, tensors)
    times["path_and_positions"] = time.time() - t0 - sum(times.values())
    summary["receiver_attention"] = lv.receiver_attention(model, test, receiver, cfg)
    if cfg.n_split_seeds:
        summary["split_seeds"] = lv.split_seeds(model, pairs, single, cfg)
        times["split_seeds"] = time.time() - t0 - sum(times.values())
    if cfg.circuit:
        from mechlie.studies.localise_circuit import circuit_stage

        circuit_stage(model, cfg, train, test, summary, tensors)
        times["edge_circuit"] = time.time() - t0 - sum(times.values())
        if cfg.circuit_seeds > 1 and "skipped" not in summary["circuit"]:
            from mechlie.studies.localise_circuit import circuit_split_seeds

            summary["circuit_seeds"] = circuit_split_seeds(model, cfg, pairs, summary["circuit"])
            times["circuit_seeds"] = time.time() - t0 - sum(times.values())
    summary["stage_seconds"] = {k: round(v, 1) for k, v in times.items()}
    meta = {"receiver": list(receiver), "senders": names, "channels": list(channels)}
    save_tensors(run_dir.file("scores.safetensors"), tensors, meta)
    summary["seconds"] = round(time.time() - t0, 1)
    run_dir.write_json("summary.json", summary)  # the figures are drawn from the saved files
    result = LocaliseResult.load(run_dir.path)
    summary["figures"] = figlib.save_figures(result.figures(), run_dir.path)
    return LocaliseResult(run_dir.path, summary)


def _known_pairs(cfg: LocaliseConfig, model):
    """The pairs analysed (known facts unless ``known_only`` is off), their per-pair single-head
    effects, and what the filter did. One single-head pass over every loaded pair: the known filter
    reads its honest runs; the re-ranked bootstrap and the split seeds rank heads on its subsets."""
    from mechlie.core.pairs import PairError, load_builtin
    from mechlie.studies import localise_variance as lv

    loaded = load_builtin(cfg.dataset, "fewshot", tokenizer=model.tokenizer, n=cfg.n_pairs, seed=cfg.seed)
    single_all = lv.single_head_effects(model, loaded, cfg.batch_size)
    keep, known = lv.known_rows(single_all, loaded, cfg.known_only)
    pairs = [loaded[i] for i in keep]
    if len({p.fact_id for p in pairs}) < 2:
        raise PairError(f"only {len(pairs)} known pairs of {len(loaded)}: use more pairs or --no-known-only")
    return pairs, lv.rows(single_all, keep), known


def _topk_curves(cfg: LocaliseConfig, model, train, test, summary: dict, tensors: dict) -> dict:
    from mechlie.causal import circuits

    # one set of settings for both directions' curves
    opts = {"n_random": cfg.n_random, "threshold": cfg.threshold, "n_boot": cfg.n_boot, "seed": cfg.seed}
    curves = {}
    for direction in ("restore", "induce"):
        c = circuits.topk_curve(model, train, test, direction=direction, batch_size=cfg.batch_size, **opts)
        curves[direction] = c
        summary[f"topk_{direction}"] = c.summary()
        tensors[f"{direction}_train_effect"] = c.train_effect
        tensors[f"{direction}_all_k_effect"] = c.all_k_effect
        tensors[f"{direction}_random_effects"] = c.random_effects
    return curves


def _path(cfg: LocaliseConfig, model, path_pairs, receiver, summary: dict, tensors: dict):
    """Path patching into ``receiver``: the ten senders with the largest summed effect go to the
    summary; every sender's effect per channel to ``path_effect``."""
    from mechlie.causal import circuits

    pr = circuits.path_patch(model, path_pairs, receiver)
    est = pr.effect_ci(n_boot=cfg.n_boot, seed=cfg.seed)
    names = [str(s) for s in pr.senders]
    tensors["path_p_truth"], tensors["path_logit_diff"] = pr.p_truth, pr.logit_diff
    tensors["path_effect"] = est.mean
    order = est.mean.sum(1).abs().argsort(descending=True)[:10].tolist()
    tops = [{"sender": names[i], **{ch: est.at(i, c).to_dict() for c, ch in enumerate(pr.channels)}} for i in order]
    summary["path"] = {"receiver": list(receiver), "n_pairs": len(path_pairs), "note": pr.note, "top_senders": tops}
    return names, pr.channels


def _positions(cfg: LocaliseConfig, model, path_pairs, receiver, summary: dict, tensors: dict) -> None:
    """The receiver's key/value inputs patched one source position at a time."""
    from mechlie.causal import circuits
    from mechlie.core.stats import bootstrap, bootstrap_tensor

    rp = circuits.receiver_positions(model, path_pairs, receiver)
    n = len(path_pairs)
    pos_est = bootstrap_tensor(lambda i: rp.effect("logit_diff", i), n, n_boot=cfg.n_boot, seed=cfg.seed)
    tensors["positions_logit_diff"], tensors["positions_differs"] = rp.logit_diff, rp.differs
    tensors["positions_attention"] = rp.attention
    tensors["positions_source_logit_diff"] = rp.source.logit_diff
    tensors["positions_target_logit_diff"] = rp.target.logit_diff
    differs = rp.differs.mean(0) > 0
    eff = pos_est.mean
    best = eff.abs().argsort(descending=True)[:8].tolist()
    # Each pair's own differing tokens (its demonstrations' answers sit at other offsets than
    # another pair's): summed effect there vs at its other positions, normalized on the pair means.
    own = {}
    for name, m in (("own_differing", rp.differs), ("own_identical", 1 - rp.differs)):

        def split(i, m=m):
            gap = rp.source.logit_diff[i].mean() - rp.target.logit_diff[i].mean()
            return ((rp.logit_diff[i] - rp.target.logit_diff[i, None]) * m[i]).sum(1).mean() / gap

        own[name] = bootstrap(split, n, n_boot=cfg.n_boot, seed=cfg.seed).to_dict()
    own["attention_own_differing"] = float((rp.attention * rp.differs).sum(1).mean())
    own["n_own_differing_per_pair"] = float(rp.differs.sum(1).mean())
    summary["positions"] = {
        "offsets": list(rp.offsets),
        "effect": eff.tolist(),
        "lo": pos_est.lo.tolist(),
        "hi": pos_est.hi.tolist(),
        "differing_offsets": [rp.offsets[j] for j in differs.nonzero().squeeze(1).tolist()],
        "sum_effect_differing": float(eff[differs].sum()) if differs.any() else 0.0,
        "sum_effect_other": float(eff[~differs].sum()),
        "attention_on_differing": float(rp.attention[:, differs].sum(1).mean()),
        "attention": rp.attention.mean(0).tolist(),
        "top_positions": [
            {"offset": rp.offsets[j], "differs": bool(differs[j]), **pos_est.at(j).to_dict()} for j in best
        ],
        **own,
    }


# ---------------------------------------------------------------------------------------------
# figures and the printed report, from the saved files

CAPTIONS = {
    "localise_topk_restore": "restore: the top-k heads patched jointly (honest into lying), beside random k-sets.",
    "localise_topk_induce": "induce: the top-k heads patched jointly (lying into honest), beside random k-sets.",
    "localise_path_senders": "Each sender's effect through the receiver's query, key and value inputs.",
    "localise_path_heatmap": "Every earlier head and MLP: its path effect into the receiver, per input channel.",
    "localise_receiver_positions": "Which source positions the receiver takes the lie from.",
    "localise_circuit": "The senders with the largest path effects into the receiver, which writes the logits.",
    "localise_faithfulness": "Share of the logit difference the top edges restore on held-out pairs (MIB-style).",
    "localise_edge_circuit": "The circuit's top edges, labelled with their exact single-edge effects.",
}


def topk_figures(s: dict, ds: str) -> dict[str, go.Figure]:
    """The top-k curves, both directions, with CI bands and the random k-sets."""
    from mechlie.report import figures as figlib

    figs = {}
    for direction in ("restore", "induce"):
        c = s.get(f"topk_{direction}")
        if not c:
            continue
        where = f"{s['model']}, {ds}, n={c.get('n_test_pairs', s['n_test'])} held-out pairs"
        fig = figlib.lines_ci(
            c["ks"],
            {
                "top-k heads, ranked on training pairs (95% CI over pairs)": (
                    [e["mean"] for e in c["top"]],
                    [e["lo"] for e in c["top"]],
                    [e["hi"] for e in c["top"]],
                ),
                "random k-sets (mean, 95% of draws)": (c["random_mean"], c["random_lo"], c["random_hi"]),
            },
            f"{direction.capitalize()}: k heads patched together ({where})",
            x_label="k (heads patched together, log)",
            y_label="normalized logit-diff effect",
        )
        fig.update_xaxes(type="log")
        fig.add_hline(y=c["threshold"], line_dash="dot", line_color="#555", annotation_text=f"{c['threshold']:.0%}")
        figs[f"localise_topk_{direction}"] = fig
    return figs


def path_figures(s: dict, ds: str, scores: tuple[dict, dict] | None) -> dict[str, go.Figure]:
    """Top senders by channel, receiver positions (with attention), and, from ``scores.safetensors``,
    the full sender x channel matrix and the circuit diagram."""
    from mechlie.report import figures as figlib

    figs = {}
    p, q = s["path"], s["positions"]
    r = p["receiver"]
    tops = p.get("top_senders") or []
    if tops:
        chans = [k for k in tops[0] if k != "sender"]
        figs["localise_path_senders"] = figlib.bars_ci(
            [t["sender"] for t in tops],
            {ch: [(t[ch]["mean"], t[ch]["lo"], t[ch]["hi"]) for t in tops] for ch in chans},
            f"Path patching into L{r[0]}H{r[1]}: top senders by channel ({s['model']}, {ds}, n={p['n_pairs']} pairs)",
            y_label="normalized effect (restore)",
        )
    if q.get("effect"):
        diff = set(q.get("differing_offsets", []))
        attention = {"attention (lying run)": q["attention"]} if q.get("attention") else None
        figs["localise_receiver_positions"] = figlib.errorbars(
            [f"{o}{'*' if o in diff else ''}" for o in q["offsets"]],
            {"effect": (q["effect"], q["lo"], q["hi"])},
            f"L{r[0]}H{r[1]}'s keys/values from the honest run, one source position at a time "
            f"({s['model']}, {ds}, n={p['n_pairs']} pairs; * = tokens differ)",
            y_label="normalized effect",
            secondary=attention,
            secondary_label="attention",
        )
        # Offsets are numbers and the differing ones carry a "*": a numeric axis would drop those.
        figs["localise_receiver_positions"].update_xaxes(type="category")
    if scores is not None and "path_effect" in scores[0]:
        effect, meta = scores[0]["path_effect"], scores[1]
        figs["localise_path_heatmap"] = figlib.heatmap(
            effect.T,
            f"Path patching into L{r[0]}H{r[1]}: sender x channel (restore, normalized; {s['model']}, {ds})",
            x_label="sender",
            y_label="receiver input",
            colorbar="norm. effect",
            zmid=0.0,
            x_ticks=meta["senders"],
            y_ticks=meta["channels"],
        )
        figs["localise_path_heatmap"].update_xaxes(title_text="")  # the title says "sender"; it would cover the names
        minimal = s.get("topk_restore", {}).get("minimal_set", [])
        figs["localise_circuit"] = circuit_figure(r, meta["senders"], effect, meta["channels"], minimal)
    return figs


def circuit_figure(receiver, senders, effect, channels, minimal_set, top: int = 8) -> go.Figure:
    """Components as nodes (the senders with the largest path effects, the receiver, the logits);
    edges labelled with the path effect, width by size."""
    import plotly.graph_objects as go

    from mechlie.report import figures as figlib

    order = effect.sum(1).abs().argsort(descending=True)[:top].tolist()
    fig = go.Figure()
    rx, ry = 1.0, 0.5
    ys = [i / max(1, len(order) - 1) for i in range(len(order))]
    for y, i in zip(ys, order):
        best_c = int(effect[i].abs().argmax())
        w = float(effect[i, best_c])
        color = "#d62728" if w > 0 else "#1f77b4"
        text = f"{senders[i]} -> {channels[best_c]}: {w:+.3f}"
        line = {"width": 1 + 30 * abs(w), "color": color}
        fig.add_trace(go.Scatter(x=[0, rx], y=[y, ry], mode="lines", line=line, hoverinfo="text", text=text))
        # label near the sender's end of its edge, where edges are still apart
        label = f"{channels[best_c]} {w:+.2f}"
        fig.add_annotation(x=0.2, y=y + 0.2 * (ry - y), text=label, showarrow=False, font={"size": 10}, yshift=8)
    marker = {"size": 18, "color": "#7f7f7f"}
    names = [senders[i] for i in order]
    fig.add_trace(
        go.Scatter(x=[0] * len(order), y=ys, mode="markers+text", text=names, textposition="middle left", marker=marker)
    )
    fig.add_trace(go.Scatter(x=[rx, 2.0], y=[ry, ry], mode="lines", line={"width": 3, "color": "#2ca02c"}))
    in_min = tuple(receiver) in {tuple(h) for h in minimal_set}
    label = f"L{receiver[0]}H{receiver[1]}" + (" (in minimal set)" if in_min else "")
    fig.add_trace(
        go.Scatter(
            x=[rx, 2.0],
            y=[ry, ry],
            mode="markers+text",
            text=[label, "answer logits"],
            textposition="top center",
            marker={"size": [26, 20], "color": ["#d62728", "#2ca02c"]},
        )
    )
    fig.update_layout(showlegend=False, xaxis={"visible": False, "range": [-0.6, 2.4]}, yaxis={"visible": False})
    return figlib.styled(
        fig, "Circuit: path effects into the top lying head (restore; red = toward honest)", width=900, height=560
    )


def report_text(s: dict, cfg: dict, run_dir) -> str:
    """What the localise script prints: the curves, the top senders and the receiver's positions."""
    n_layers = s.get("n_layers") or 1
    out = [
        f"{s['model']}: {s['n_pairs']} pairs ({s['n_train']} train / {s['n_test']} held-out), "
        f"{n_layers}x{s['n_heads'] // n_layers} = {s['n_heads']} heads"
    ]
    for direction in ("restore", "induce"):
        c = s[f"topk_{direction}"]
        msg = (
            f"{c['minimal_k']} heads ({100 * c['minimal_share']:.1f}% of {c['n_heads']}), 95% CI "
            f"[{c['minimal_k_ci'][0]:.0f}, {c['minimal_k_ci'][1]:.0f}]"
            + (" over test pairs with the ranking fixed" if "minimal_k_rerank" in c else "")
            if c["minimal_k"]
            else f"no top-k set reaches {c['threshold']:.0%}"
        )
        out.append(f"\n{direction}: minimal set for {c['threshold']:.0%} of the logit difference: {msg}")
        rows = zip(c["ks"], c["top"], c["random_mean"], c["random_lo"], c["random_hi"])
        for k, e, rm, rl, rh in rows:
            out.append(
                f"  k={k:>3}: top-k {_ci(e, '+.3f')} | random k-sets {rm:+.3f} "
                f"(2.5-97.5%: {rl:+.3f}..{rh:+.3f}, {cfg.get('n_random', '?')} draws)"
            )
    p, q = s["path"], s["positions"]
    r = p["receiver"]
    out.append(
        f"\nPath patching into L{r[0]}H{r[1]} (restore; 1 = honest; 95% CI over {p['n_pairs']} pairs)"
        + (f"\n  ({p['note']})" if p.get("note") else "")
    )
    for t in p["top_senders"]:
        chans = [k for k in t if k != "sender"]
        out.append(f"  {t['sender']:>7}: " + " | ".join(f"{ch} {_ci(t[ch], '+.3f')}" for ch in chans))
    out.append(
        f"\nReceiver key/value inputs by source position (restore, one position at a time): summed effect "
        f"{q['sum_effect_differing']:+.3f} at the {len(q['differing_offsets'])} positions where the prompts differ vs "
        f"{q['sum_effect_other']:+.3f} elsewhere; attention from the final token on differing positions "
        f"{q['attention_on_differing']:.2f}"
    )
    od, oi = q["own_differing"], q["own_identical"]
    out.append(
        f"  per pair, at its own {q['n_own_differing_per_pair']:.1f} differing tokens (the demonstrations' answers): "
        f"{_ci(od, '+.3f')} vs its other positions {_ci(oi, '+.3f')}; attention on them "
        f"{q['attention_own_differing']:.2f}"
    )
    for t in q["top_positions"]:
        out.append(f"  offset {t['offset']:>4}{' (differs)' if t['differs'] else '          '}: {_ci(t, '+.3f')}")
    from mechlie.studies.localise_circuit import circuit_lines
    from mechlie.studies.localise_variance import variance_lines

    out += ["\n" + line for line in variance_lines(s) + circuit_lines(s)]
    out.append(f"\nWrote {run_dir}/ in {s.get('seconds', '?')} s")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# the result


def _ci(d: dict, spec: str = ".2f") -> str:
    return ci_text(d, spec)


class LocaliseResult(StudyResult):
    """A localise run: ``summary.json`` (curves, top senders, positions) and ``scores.safetensors``."""

    study = "localise"
    required = ("model", "n_pairs", "n_test", "topk_restore", "path", "positions")

    def _dataset(self) -> str:
        return self._summary.get("dataset") or self.config().get("dataset", "?")

    def title(self) -> str:
        s = self._summary
        return f"Localise: {s['model']}, {self._dataset()}, n={s['n_pairs']} pairs"

    def figures(self) -> dict[str, go.Figure]:
        s, ds = self._summary, self._dataset()
        for direction in ("restore", "induce"):
            c = s.get(f"topk_{direction}")
            missing = [
                k for k in ("ks", "top", "random_mean", "random_lo", "random_hi", "threshold") if k not in (c or {})
            ]
            if c and missing:
                raise RunFormatError(f"{self.run_dir / 'summary.json'} lacks {missing}: rerun the localise study")
        figs = topk_figures(s, ds)
        figs.update(path_figures(s, ds, self._scores()))
        from mechlie.studies.localise_circuit import circuit_figures

        figs.update(circuit_figures(s))
        return figs

    def _scores(self) -> tuple[dict, dict] | None:
        from mechlie.core.io import load_tensors

        path = self.run_dir / "scores.safetensors"
        return load_tensors(path) if path.is_file() else None

    def captions(self) -> dict[str, str]:
        return dict(CAPTIONS)

    def headline(self) -> list[str]:
        s = self._summary
        lines: list[str] = []
        for direction in ("restore", "induce"):
            c = s.get(f"topk_{direction}")
            if not c:
                continue
            if c.get("minimal_k"):
                lo, hi = c["minimal_k_ci"]
                lines.append(
                    f"- {direction}: {c['minimal_k']} heads ({100 * c['minimal_share']:.1f}% of {c['n_heads']}) reach "
                    f"{c['threshold']:.0%} of the effect (95% CI of k [{lo:.0f}, {hi:.0f}]"
                    + (", ranking fixed; re-ranked CI below" if "minimal_k_rerank" in c else "")
                    + "); top: "
                    + ", ".join(f"L{l}H{h}" for l, h in c["minimal_set"][:8])
                    + "."
                )
            else:
                lines.append(f"- {direction}: no top-k set reaches {c['threshold']:.0%} of the effect.")
        p = s["path"]
        tops = p.get("top_senders") or []
        if tops:
            chans = [k for k in tops[0] if k != "sender"]
            r = p["receiver"]
            lines.append(
                f"- Path patching into L{r[0]}H{r[1]}: top senders "
                + ", ".join(f"{t['sender']} ({', '.join(f'{ch} {_ci(t[ch])}' for ch in chans)})" for t in tops[:3])
                + "."
            )
        q = s["positions"]
        if q.get("effect"):
            lines.append(
                f"- Receiver inputs: summed effect {q['sum_effect_differing']:+.3f} at the positions where the prompts "
                f"differ vs {q['sum_effect_other']:+.3f} elsewhere; attention on differing positions "
                f"{q['attention_on_differing']:.2f}."
            )
        from mechlie.studies.localise_circuit import circuit_lines
        from mechlie.studies.localise_variance import variance_lines

        return lines + [f"- {line}" for line in variance_lines(s) + circuit_lines(s)]

    def report(self) -> str:
        return report_text(self._summary, self.config(), self.run_dir)


STUDY = register(Study("localise", LocaliseConfig, run, LocaliseResult, load_model=False))
