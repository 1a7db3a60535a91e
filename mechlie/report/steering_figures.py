"""Figures of steering results (returned, never shown; save with mechlie.report.plotting.save_figure).

- :func:`dose_heatmap`: alpha x layer heatmap of one metric for one kind, from sweep points.
- :func:`frontier_figure`: recovery vs KL on neutral text, every sweep point, each kind's Pareto
  front, and the evaluated (validation-chosen) points with 95% CIs and their random controls' spread.

Alpha is signed everywhere: directions point honest -> lying, so alpha < 0 steers toward honesty.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mechlie.studies.steering_eval import SweepPoint, pareto


def dose_heatmap(points: Sequence[SweepPoint], kind: str, metric: str = "p_truth"):
    """alpha x layer heatmap of ``metric`` ("p_truth", "recovered" or "kl") for one kind."""
    from mechlie.report.plotting import heatmap

    mine = [p for p in points if p.kind == kind]
    if not mine:
        raise ValueError(f"no sweep points for kind {kind!r}")
    if metric not in ("p_truth", "recovered", "kl"):
        raise ValueError(f"metric must be p_truth, recovered or kl, got {metric!r}")
    layers = sorted({p.layer for p in mine})
    alphas = sorted({p.alpha for p in mine})
    grid = torch.full((len(alphas), len(layers)), float("nan"))
    for p in mine:
        grid[alphas.index(p.alpha), layers.index(p.layer)] = getattr(p, metric)
    label = {"p_truth": "P(truth), lying prompts", "recovered": "gap recovered", "kl": "KL on neutral text (nats)"}[
        metric
    ]
    fig = heatmap(
        grid,
        f"{label}: {kind} on the {mine[0].split} facts (alpha < 0 = toward honesty)",
        x_label="layer",
        y_label="alpha",
        colorbar=metric,
        x_ticks=[str(l) for l in layers],
        y_ticks=[f"{a:g}" for a in alphas],
        text=[[f"{v:.3f}" for v in row] for row in grid.tolist()],
    )
    return fig.update_traces(texttemplate="%{text}")  # print the values in the cells


def _ci_point(x, y, name: str, symbol: str, size: int):
    """One marker at ``(x.mean, y.mean)`` with asymmetric error bars ``[lo, hi]`` on both axes
    (``x`` and ``y`` are :class:`mechlie.core.stats.Estimate`)."""
    import plotly.graph_objects as go

    err = lambda e: {"type": "data", "symmetric": False, "array": [e.hi - e.mean], "arrayminus": [e.mean - e.lo]}  # noqa: E731
    return go.Scatter(
        x=[x.mean],
        y=[y.mean],
        mode="markers",
        name=name,
        marker={"symbol": symbol, "size": size},
        error_x=err(x),
        error_y=err(y),
    )


def frontier_figure(points: Sequence[SweepPoint], evaluated: dict | None = None, kl_budget: float | None = 0.1):
    """Honesty recovered vs KL on neutral text.

    ``points``: sweep points (their Pareto front drawn as a line per kind). ``evaluated[name]``: a
    result of :func:`mechlie.studies.steering_eval.evaluate`, drawn with 95% CIs on both axes, and its
    control's spread over random draws (2.5-97.5% quantiles) as an open marker.
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, r in (evaluated or {}).items():
        fig.add_trace(_ci_point(r["kl"], r["recovered"], f"{name} (chosen on val, test 95% CI)", "diamond", 13))
        c = r.get("control")
        if c:
            label = f"{name} random, {c['n_draws']} draws (95% of draws)"
            fig.add_trace(_ci_point(c["kl"], c["recovered"], label, "x-open", 11))
    for kind in dict.fromkeys(p.kind for p in points):
        mine = [p for p in points if p.kind == kind]
        front = pareto(mine)
        fig.add_trace(
            go.Scatter(
                x=[max(p.kl, 1e-6) for p in mine],
                y=[p.recovered for p in mine],
                mode="markers",
                name=f"{kind} ({mine[0].split})",
                text=[f"layer {p.layer}, alpha {p.alpha:g}, {p.setting.param}" for p in mine],
                marker={"size": 8},
            )
        )
        fig.add_trace(
            go.Scatter(
                x=[max(p.kl, 1e-6) for p in front],
                y=[p.recovered for p in front],
                mode="lines",
                name=f"{kind} frontier",
            )
        )
    fig.add_hline(y=1.0, line_dash="dash", annotation_text="honest baseline")
    if kl_budget is not None:
        fig.add_vline(x=kl_budget, line_dash="dot", annotation_text=f"KL budget {kl_budget:g}")
    fig.update_layout(
        title="Honesty recovered on lying prompts vs side effects on neutral text",
        xaxis_title="mean KL(clean || steered) per token (nats)",
        yaxis_title="share of honest-lying P(truth) gap closed",
        xaxis_type="log",
        width=950,
        height=560,
    )
    return fig


__all__ = ["dose_heatmap", "frontier_figure"]
