"""The localise study's edge circuit: which edges carry the lie, how faithful the circuit is, and
how well attribution ranks edges. Definitions and signs: :mod:`mechlie.causal.edges`.

1. Edges are ranked on **training** pairs by their EAP-IG score (signed: the edges that move the
   lying run toward the honest one first, as MIB's CPR ranks them; ``ig_steps`` interpolation steps
   of the input embeddings).
2. **Faithfulness curve** on **held-out** pairs: the circuit of the top share of edges (the rest at
   the lying run's values), its effect normalized over pair means (0 = lying, 1 = honest) with a
   95% bootstrap CI over held-out pairs, at the shares :data:`SHARES` (0 and 1 are the lying and
   honest runs by construction and are not run). The smallest share of the grid whose mean reaches
   ``threshold`` is the circuit; beside it, ``n_edge_random`` random edge sets of the same size.
3. **Attribution vs exact** on held-out pairs: the ``n_exact_edges`` edges with the largest
   training |EAP-IG| plus as many drawn at random from the rest (so the set is chosen on other pairs
   than it is scored on, and spans small edges too), each patched alone (exact edge patching).
   Spearman (over those edges, of the pair-mean effects) and the overlap of the top half by |effect|,
   for EAP and EAP-IG, each with a 95% percentile bootstrap CI over **pairs** (the edges fixed).

Only pairs whose honest and lying prompts have the same number of tokens enter (positions aligned
one to one); the count left out is in the summary. ``circuit_pairs`` caps the pairs per side.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import plotly.graph_objects as go

log = logging.getLogger("mechlie")

SHARES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
GOAL_SHARE, GOAL_SPEARMAN = 0.05, 0.9


def _equal(model, pairs, cap: int, what: str, dropped: dict) -> list:
    from mechlie.causal.edges import equal_length

    keep = equal_length(model, pairs)
    dropped[what] = len(pairs) - len(keep)
    out = [pairs[i] for i in keep]
    return out[:cap] if cap else out


def circuit_stage(model, cfg, train, test, summary: dict, tensors: dict) -> None:
    """Rank edges (train), the faithfulness curve and its null (held-out), attribution vs exact."""
    summary["circuit"] = circuit_on(model, cfg, train, test, tensors)


def circuit_on(model, cfg, train, test, tensors: dict) -> dict:
    """The circuit stage on one split (``cfg.seed`` seeds its null, its bootstrap and its random edges);
    ``{"skipped": why, ...}`` when too few pairs have equal lengths."""
    from mechlie.causal import edges as E

    g = E.build_graph(model)
    dropped: dict[str, int] = {}
    tr = _equal(model, train, cfg.circuit_pairs, "train", dropped)
    te = _equal(model, test, cfg.circuit_pairs, "test", dropped)
    log.info("edge circuit: %d edges; %d train / %d held-out pairs (unequal lengths left out: %s)",
             g.n_edges, len(tr), len(te), dropped)  # fmt: skip
    if len(tr) < 1 or len(te) < 2:
        why = f"too few equal-length pairs ({len(tr)} train, {len(te)} held-out; need 1 and 2)"
        log.warning("edge circuit skipped: %s", why)
        return {"skipped": why, "unequal_length_left_out": dropped}
    rank = E.attribute_edges(model, g, tr, method="eap_ig", steps=cfg.ig_steps).normalized()
    edges = g.edges
    order = rank[edges[:, 0], edges[:, 1]].argsort(descending=True)
    c = {
        "n_edges": g.n_edges,
        "n_senders": len(g.senders),
        "n_receivers": len(g.receivers),
        "n_train": len(tr),
        "n_test": len(te),
        "unequal_length_left_out": dropped,
        "ranking": f"EAP-IG ({cfg.ig_steps} steps over the input embeddings), signed, on training pairs",
        "threshold": cfg.threshold,
    }
    c.update(_curve(model, g, te, edges[order], cfg, tensors))
    c["agreement"], c["edges"] = _agreement(model, g, te, rank, cfg, tensors)
    c["goal"] = {
        "max_share": GOAL_SHARE,
        "min_spearman": GOAL_SPEARMAN,
        "size_met": c["minimal_share"] is not None and c["minimal_share"] <= GOAL_SHARE,
        "spearman_met": {m: c["agreement"][m]["spearman"]["mean"] >= GOAL_SPEARMAN for m in ("eap", "eap_ig")},
    }
    tensors["circuit_rank_score"] = rank
    return c


def circuit_split_seeds(model, cfg, pairs, main: dict) -> dict:
    """The edge circuit on ``cfg.circuit_seeds`` split seeds (the main split's ``main`` and the next
    seeds): each split ranks edges on its own training facts and measures on its own held-out facts
    (:func:`circuit_on`). Per seed: the minimal share, the effect of the main split's circuit size
    (the same share of the grid) with its CI, the random null, and EAP / EAP-IG agreement with exact
    patching; across seeds, mean and SD. The splits share facts: the spread is split-to-split."""
    from dataclasses import replace

    from mechlie.read.directions import split_by_fact

    facts = [p.fact_id for p in pairs]
    runs = [(cfg.seed, main)]
    for s in range(cfg.seed + 1, cfg.seed + cfg.circuit_seeds):
        sp = split_by_fact(facts, test_frac=cfg.test_frac, seed=s)
        c = circuit_on(model, replace(cfg, seed=s), [pairs[i] for i in sp.train], [pairs[i] for i in sp.test], {})
        runs.append((s, c))
        log.info("edge circuit, split seed %d: minimal share %s", s, c.get("minimal_share"))
    at = main["shares"].index(main["minimal_share"]) if main.get("minimal_share") is not None else None
    rows = []
    for s, c in runs:
        if "skipped" in c:
            rows.append({"seed": s, "skipped": c["skipped"]})
            continue
        a = c["agreement"]
        rows.append(
            {
                "seed": s,
                "n_train": c["n_train"],
                "n_test": c["n_test"],
                "minimal_share": c["minimal_share"],
                "minimal_size": c["minimal_size"],
                "effect_at_main_share": c["curve"][at] if at is not None else None,
                "null_mean": c["null"]["mean"],
                "null_hi": c["null"]["hi"],
                **{f"spearman_{m}": a[m]["spearman"] for m in ("eap", "eap_ig")},
                "size_met": c["goal"]["size_met"],
                "spearman_met": c["goal"]["spearman_met"],
            }
        )
    ok = [r for r in rows if "skipped" not in r]

    def agg(values: list[float]) -> dict:
        v = torch.tensor(values, dtype=torch.float64)
        return {"values": values, "mean": float(v.mean()), "sd": float(v.std()) if len(v) > 1 else 0.0}

    out = {
        "seeds": rows,
        "n_seeds": len(rows),
        "n_skipped": len(rows) - len(ok),
        "main_share": main.get("minimal_share"),
        "n_not_reached": sum(r["minimal_share"] is None for r in ok),
        "size_met": sum(r["size_met"] for r in ok),
        "spearman_met": {m: sum(r["spearman_met"][m] for r in ok) for m in ("eap", "eap_ig")},
        "what": (
            "each split seed ranks edges (EAP-IG) on its own training facts and measures the faithfulness curve, "
            "its random null and attribution vs exact on its own held-out facts; the splits share facts, so the "
            "spread is split-to-split variation"
        ),
    }
    reached = [r["minimal_share"] for r in ok if r["minimal_share"] is not None]
    if reached:
        out["minimal_share"] = agg(reached)
    if at is not None and ok:
        out["effect_at_main_share"] = agg([r["effect_at_main_share"]["mean"] for r in ok])
    for m in ("eap", "eap_ig"):
        if ok:
            out[f"spearman_{m}"] = agg([r[f"spearman_{m}"]["mean"] for r in ok])
    return out


def _curve(model, g, te, ranked, cfg, tensors: dict) -> dict:
    """Faithfulness at each share of :data:`SHARES`; the minimal share and its random-edge null."""
    from mechlie.causal.edges import circuit_forward
    from mechlie.causal.effects import normalized_effect_ci

    n_e = len(ranked)
    sizes = [max(1, math.ceil(s * n_e)) for s in SHARES]
    res = circuit_forward(model, g, te, g.masks([ranked[:k] for k in sizes]))
    est = normalized_effect_ci(res.logit_diff, res.corrupt, res.clean, n_boot=cfg.n_boot, seed=cfg.seed)
    effects = [est.at(i).to_dict() for i in range(len(sizes))]
    hit = [i for i, e in enumerate(effects) if e["mean"] >= cfg.threshold]
    i_min = hit[0] if hit else None
    size = sizes[i_min] if hit else math.ceil(GOAL_SHARE * n_e)
    gen = torch.Generator().manual_seed(cfg.seed)
    rand = [ranked[torch.randperm(n_e, generator=gen)[:size]] for _ in range(cfg.n_edge_random)]
    null = circuit_forward(model, g, te, g.masks(rand))
    draws = null.effect()
    ref = effects[i_min]["mean"] if hit else float(res.effect()[sizes.index(size)] if size in sizes else float("nan"))
    tensors["circuit_curve_logit_diff"] = res.logit_diff
    tensors["circuit_clean_logit_diff"], tensors["circuit_corrupt_logit_diff"] = res.clean, res.corrupt
    tensors["circuit_random_effects"] = draws
    return {
        "shares": list(SHARES),
        "sizes": sizes,
        "curve": effects,
        "minimal_share": SHARES[i_min] if hit else None,
        "minimal_size": sizes[i_min] if hit else None,
        "minimal_effect": effects[i_min] if hit else None,
        "null": {
            "size": size,
            "n_draws": len(rand),
            "mean": float(draws.mean()),
            "lo": float(draws.quantile(0.025)),
            "hi": float(draws.quantile(0.975)),
            "share_at_least_circuit": float((draws >= ref).float().mean()),
        },
    }


def _agreement(model, g, te, rank, cfg, tensors: dict) -> tuple[dict, list]:
    """Exact single-edge patches vs EAP and EAP-IG on held-out pairs (see the module docstring)."""
    from mechlie.causal.edges import attribute_edges, patch_edges
    from mechlie.core.stats import bootstrap, bootstrap_tensor, spearman

    edges = g.edges
    score = rank[edges[:, 0], edges[:, 1]].abs()
    top = score.argsort(descending=True)[: cfg.n_exact_edges]
    rest = torch.ones(len(edges), dtype=torch.bool)
    rest[top] = False
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    others = rest.nonzero().squeeze(1)
    pick = torch.cat([top, others[torch.randperm(len(others), generator=gen)[: cfg.n_exact_edges]]])
    chosen = edges[pick]
    pairs = te[: cfg.n_exact_pairs]
    exact = patch_edges(model, g, pairs, g.masks([e[None] for e in chosen]))
    ex = exact.logit_diff - exact.corrupt[:, None]  # [n, m] patched - lying
    gap = exact.clean - exact.corrupt
    est = {m: attribute_edges(model, g, pairs, method=m, steps=cfg.ig_steps).scores[:, chosen[:, 0], chosen[:, 1]]
           for m in ("eap", "eap_ig")}  # fmt: skip
    k = max(1, len(chosen) // 2)

    def overlap(a, b) -> float:
        ta, tb = set(a.abs().argsort(descending=True)[:k].tolist()), set(b.abs().argsort(descending=True)[:k].tolist())
        return len(ta & tb) / k

    n, opts = len(pairs), {"n_boot": cfg.n_boot, "seed": cfg.seed, "method": "percentile"}
    out = {
        "n_pairs": n,
        "n_edges": len(chosen),
        "k": k,
        "ci": "95% percentile bootstrap over pairs (edges fixed)",
        "selection": f"{len(top)} top |EAP-IG| on training pairs + {len(chosen) - len(top)} random others",
    }
    for m, e in est.items():
        out[m] = {
            "spearman": bootstrap(lambda i, e=e: spearman(e[i].mean(0), ex[i].mean(0)), n, **opts).to_dict(),
            "top_k_overlap": bootstrap(lambda i, e=e: overlap(e[i].mean(0), ex[i].mean(0)), n, **opts).to_dict(),
        }
    tensors["circuit_exact_edges"], tensors["circuit_exact_effect"] = chosen, ex
    tensors["circuit_eap_effect"], tensors["circuit_eap_ig_effect"] = est["eap"], est["eap_ig"]
    ci = bootstrap_tensor(lambda i: ex[i].mean(0) / gap[i].mean(), n, n_boot=cfg.n_boot, seed=cfg.seed)
    norm = {m: e.mean(0) / gap.mean() for m, e in est.items()}
    rows = [
        {
            "edge": g.edge_name(chosen[j]),
            "sender": g.senders[int(chosen[j, 0])],
            "receiver": g.receivers[int(chosen[j, 1])],
            "train_eap_ig": float(rank[chosen[j, 0], chosen[j, 1]]),
            "exact": ci.at(j).to_dict(),
            "eap": float(norm["eap"][j]),
            "eap_ig": float(norm["eap_ig"][j]),
        }
        for j in range(len(top))
    ]
    return out, rows


# ---------------------------------------------------------------------------------------------
# lines and figures, from the summary


def circuit_lines(s: dict) -> list[str]:
    """The circuit's headline: its size, faithfulness with CI, the null, and attribution agreement."""
    c = s.get("circuit")
    if not c:
        return []
    if "skipped" in c:
        return [f"Edge circuit skipped: {c['skipped']}."]
    nl, n_e = c["null"], c["n_edges"]
    if c["minimal_share"] is not None:
        e = c["minimal_effect"]
        size = (
            f"Edge circuit: the top {c['minimal_size']} of {n_e} edges ({100 * c['minimal_share']:.1f}%, ranked on "
            f"{c['n_train']} training pairs) restore {e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}] of the logit "
            f"difference on {c['n_test']} held-out pairs"
        )
    else:
        size = f"Edge circuit: no share up to {100 * c['shares'][-1]:.0f}% of {n_e} edges restores {c['threshold']:.0%}"
    lines = [
        f"{size}; {nl['n_draws']} random sets of {nl['size']} edges: {nl['mean']:+.3f} "
        f"(2.5-97.5%: {nl['lo']:+.3f}..{nl['hi']:+.3f}; share >= the circuit {nl['share_at_least_circuit']:.2f})."
    ]
    a = c["agreement"]
    parts = []
    for m, label in (("eap", "EAP"), ("eap_ig", "EAP-IG")):
        sp, ov = a[m]["spearman"], a[m]["top_k_overlap"]
        parts.append(
            f"{label} Spearman {sp['mean']:+.2f} [{sp['lo']:+.2f}, {sp['hi']:+.2f}], top-{a['k']} overlap "
            f"{ov['mean']:.2f} [{ov['lo']:.2f}, {ov['hi']:.2f}]"
        )
    lines.append(
        f"Attribution vs exact edge patching ({a['n_edges']} edges: {a['selection']}; {a['n_pairs']} held-out "
        f"pairs, CI over pairs): " + "; ".join(parts) + "."
    )
    lines += seed_lines(s)
    gl = c["goal"]
    lines.append(
        f"Goal (<= {gl['max_share']:.0%} of edges restoring >= {c['threshold']:.0%}): "
        f"{'met' if gl['size_met'] else 'not met'}; Spearman >= {gl['min_spearman']}: "
        + ", ".join(f"{m} {'met' if ok else 'not met'}" for m, ok in gl["spearman_met"].items())
        + "."
    )
    return lines


def seed_lines(s: dict) -> list[str]:
    """The circuit over split seeds (``--circuit-seeds``), when the run has it."""
    cs = s.get("circuit_seeds")
    if not cs:
        return []
    n, ok = cs["n_seeds"], cs["n_seeds"] - cs["n_skipped"]
    parts = []
    if "minimal_share" in cs:
        ms = cs["minimal_share"]
        vals = ", ".join(f"{100 * v:.1f}%" for v in ms["values"])
        parts.append(
            f"minimal share {100 * ms['mean']:.1f}% +/- {100 * ms['sd']:.1f}% ({vals}; "
            f"{cs['n_not_reached']} of {ok} never reach the threshold)"
        )
    if "effect_at_main_share" in cs:
        e = cs["effect_at_main_share"]
        parts.append(
            f"the main split's share ({100 * cs['main_share']:.1f}%) restores {e['mean']:+.3f} +/- {e['sd']:.3f}"
        )
    for m, label in (("eap", "EAP"), ("eap_ig", "EAP-IG")):
        if f"spearman_{m}" in cs:
            sp = cs[f"spearman_{m}"]
            parts.append(f"{label} Spearman {sp['mean']:+.2f} +/- {sp['sd']:.2f}")
    skipped = f"; {cs['n_skipped']} skipped (too few equal-length pairs)" if cs["n_skipped"] else ""
    sm = cs["spearman_met"]
    return [
        f"Over {n} split seeds (mean +/- SD, each ranked on its own training facts{skipped}): "
        + "; ".join(parts)
        + f". Size goal met in {cs['size_met']} of {ok}; Spearman >= {GOAL_SPEARMAN} met in {sm['eap']} (EAP) "
        f"and {sm['eap_ig']} (EAP-IG) of {ok}."
    ]


def circuit_figures(s: dict) -> dict[str, go.Figure]:
    """The faithfulness curve with its null, attribution vs exact, and the circuit's top edges."""
    from mechlie.report import figures as figlib

    c = s.get("circuit")
    if not c or "skipped" in c:
        return {}
    xs = [100 * x for x in c["shares"]]
    nl = c["null"]
    fig = figlib.lines_ci(
        xs,
        {
            "top edges by training EAP-IG (95% CI over held-out pairs)": (
                [e["mean"] for e in c["curve"]],
                [e["lo"] for e in c["curve"]],
                [e["hi"] for e in c["curve"]],
            ),
        },
        f"Faithfulness: share of the logit difference restored by the circuit ({s['model']}, "
        f"n={c['n_test']} held-out pairs; random {nl['size']}-edge sets: {nl['mean']:+.2f} "
        f"[{nl['lo']:+.2f}, {nl['hi']:+.2f}])",
        x_label=f"edges kept (% of {c['n_edges']}, log)",
        y_label="normalized logit-diff effect",
    )
    fig.update_xaxes(type="log")
    fig.add_hline(y=c["threshold"], line_dash="dot", line_color="#555", annotation_text=f"{c['threshold']:.0%}")
    return {"localise_faithfulness": fig, "localise_edge_circuit": edge_circuit_figure(s)}


def _node_xy(name: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    """Sender/receiver node position: x = block (embed before block 0, logits after the last), y = head."""
    base = name.split(".")[0]
    if base == "embed":
        return -1.0, n_heads / 2
    if base == "logits":
        return float(n_layers), n_heads / 2
    if base.startswith("MLP"):
        return int(base[3:]) + 0.5, float(n_heads)
    layer, rest = base[1:].split("H") if "H" in base else base[1:].split("KV")
    return float(layer), float(rest)


def edge_circuit_figure(s: dict) -> go.Figure:
    """The circuit's top edges (those compared with exact patching), width and colour by the exact
    single-edge effect (red = toward honest), hover text with its CI and the attribution scores."""
    import plotly.graph_objects as go

    from mechlie.report import figures as figlib

    c = s["circuit"]
    L, H = s.get("n_layers") or 1, (s["n_heads"] // (s.get("n_layers") or 1))
    fig = go.Figure()
    nodes: dict[str, tuple[float, float]] = {}
    for e in c["edges"]:
        (x0, y0), (x1, y1) = _node_xy(e["sender"], L, H), _node_xy(e["receiver"], L, H)
        nodes[e["sender"]], nodes[e["receiver"].split(".")[0]] = (x0, y0), (x1, y1)
        w = e["exact"]
        text = (
            f"{e['edge']}: exact {w['mean']:+.3f} [{w['lo']:+.3f}, {w['hi']:+.3f}]; EAP {e['eap']:+.3f}, "
            f"EAP-IG {e['eap_ig']:+.3f}"
        )
        line = {"width": 1 + 20 * min(1.0, abs(w["mean"])), "color": "#d62728" if w["mean"] > 0 else "#1f77b4"}
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", line=line, hoverinfo="text", text=text))
        fig.add_annotation(
            x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=f"{w['mean']:+.2f}", showarrow=False, font={"size": 9}
        )
    names = list(nodes)
    fig.add_trace(
        go.Scatter(
            x=[nodes[n][0] for n in names],
            y=[nodes[n][1] for n in names],
            mode="markers+text",
            text=names,
            textposition="top center",
            marker={"size": 14, "color": "#7f7f7f"},
        )
    )
    fig.update_layout(
        showlegend=False,
        xaxis={"title": "block (embed left, logits right)"},
        yaxis={"title": "head (MLP at the top)"},
    )
    return figlib.styled(
        fig,
        f"Edge circuit: the {len(c['edges'])} edges with the largest training EAP-IG, labelled with their exact "
        f"effect (restore; {c['agreement']['n_pairs']} held-out pairs; {s['model']})",
        width=1000,
        height=600,
    )
