"""Figures of a steering run, drawn from its saved ``summary.json`` and ``sweep.json`` with the one
figure library (:mod:`mechlie.report.figures`); returned, never shown.

- ``steering_recovered`` / ``steering_kl``: each method at its validation-chosen setting on test
  (95% CI over facts, over neutral lines) beside its random draws of the same size;
- ``steering_frontier``: recovery vs KL on neutral text: every validation sweep point, each
  method's Pareto front, the chosen points on test with CIs on both axes and their random draws;
- ``steering_resid_dose`` / ``steering_resid_kl``: alpha x layer heatmaps of the residual kind's sweep.

Alpha is signed everywhere: directions point honest -> lying, so alpha < 0 steers toward honesty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mechlie.report import figures as fl
from mechlie.studies.steering_eval import SweepPoint, pareto
from mechlie.studies.steering_methods import Setting

if TYPE_CHECKING:
    import plotly.graph_objects as go


def _est(d: dict) -> tuple[float, float, float]:
    nan = lambda x: float("nan") if x is None else float(x)  # noqa: E731
    return nan(d["mean"]), nan(d["lo"]), nan(d["hi"])


def sweep_points(saved: list[dict]) -> list[SweepPoint]:
    """Sweep points read back from ``sweep.json``."""
    nan = lambda x: float("nan") if x is None else float(x)  # noqa: E731
    return [
        SweepPoint(Setting(**p["setting"]), p["split"], nan(p["p_truth"]), nan(p["recovered"]), nan(p["kl"]))
        for p in saved
    ]


def _text(s: Setting) -> str:
    return (f"L{s.layer} " if s.layer >= 0 else "") + f"α={s.alpha:g}" + (f" {s.param}" if s.param else "")


def bars(ev: dict, where: str) -> dict[str, go.Figure]:
    """Recovered and KL of each method's chosen setting on test, beside its random draws."""
    methods = list(ev)
    chosen, rand = "chosen setting, test", "random draws of the same size"
    return {
        "steering_recovered": fl.bars_ci(
            methods,
            {
                f"{chosen} (95% CI over facts)": [_est(ev[m]["recovered"]) for m in methods],
                f"{rand} (mean, 95% of draws)": [_est(ev[m]["control"]["recovered"]) for m in methods],
            },
            f"Share of the honest−lying P(truth) gap closed on lying prompts ({where})",
            y_label="gap recovered",
            hline=1.0,
            hline_name="honest baseline",
        ),
        "steering_kl": fl.bars_ci(
            methods,
            {chosen: [_est(ev[m]["kl"]) for m in methods], rand: [_est(ev[m]["control"]["kl"]) for m in methods]},
            f"Side effect: KL(clean ‖ steered) per token on neutral text ({where})",
            y_label="KL (nats)",
        ),
    }


def _ci_point(kl: dict, rec: dict, name: str, marker: dict):
    """One marker at (KL, recovered) with asymmetric error bars ``[lo, hi]`` on both axes."""
    import plotly.graph_objects as go

    x, y = _est(kl), _est(rec)
    err = lambda e: {"type": "data", "symmetric": False, "array": [e[2] - e[0]], "arrayminus": [e[0] - e[1]]}  # noqa: E731
    return go.Scatter(
        x=[max(x[0], 1e-6)], y=[y[0]], mode="markers", name=name, marker=marker, error_x=err(x), error_y=err(y)
    )


def _kl_recovered(pts: list[SweepPoint], **style) -> go.Scatter:
    """Sweep points at (KL, recovered), KL floored at 1e-6 for the log axis."""
    import plotly.graph_objects as go

    return go.Scatter(x=[max(p.kl, 1e-6) for p in pts], y=[p.recovered for p in pts], **style)


def frontier(sweep: dict[str, list[dict]], ev: dict, where: str, kl_budget: float | None) -> go.Figure:
    """Recovery vs KL: validation sweep points and Pareto fronts, chosen points on test, random draws."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (m, saved) in enumerate(sweep.items()):
        if not saved:
            continue
        c = fl.COLORS[i % len(fl.COLORS)]
        pts = sweep_points(saved)
        marker, text = {"color": c, "size": 6, "opacity": 0.45}, [_text(p.setting) for p in pts]
        fig.add_trace(_kl_recovered(pts, mode="markers", name=f"{m} (validation sweep)", marker=marker, text=text))
        fig.add_trace(_kl_recovered(pareto(pts), mode="lines", name=f"{m} frontier", line={"color": c, "width": 1}))
        if m in ev:
            r = ev[m]
            edge = {"color": "#222", "width": 1}
            fig.add_trace(
                _ci_point(
                    r["kl"],
                    r["recovered"],
                    f"{m} chosen on val, test (95% CI)",
                    {"color": c, "size": 12, "symbol": "diamond", "line": edge},
                )
            )
            ctl = r["control"]
            fig.add_trace(
                _ci_point(
                    ctl["kl"],
                    ctl["recovered"],
                    f"{m} random, {ctl.get('n_draws', '?')} draws (95% of draws)",
                    {"color": c, "size": 10, "symbol": "x-open"},
                )
            )
    fig.add_hline(y=1.0, line_dash="dash", line_color="#555", annotation_text="honest baseline")
    if kl_budget is not None:
        fig.add_vline(x=kl_budget, line_dash="dot", line_color="#555", annotation_text=f"KL budget {kl_budget:g}")
    fig.update_layout(
        xaxis_type="log", xaxis_title="KL per token on neutral text (nats, log)", yaxis_title="gap recovered"
    )
    title = f"Honesty recovered vs side effects ({where}; sweep on validation facts, chosen points on test)"
    return fl.styled(fig, title, width=950, height=560)


def dose(saved: list[dict], metric: str, model: str) -> go.Figure:
    """alpha x layer heatmap of ``metric`` (``"recovered"`` or ``"kl"``) of the residual kind's sweep."""
    pts = [p for p in sweep_points(saved) if p.layer >= 0]
    if not pts:
        raise ValueError("no residual sweep points at a layer")
    if metric not in ("p_truth", "recovered", "kl"):
        raise ValueError(f"metric must be p_truth, recovered or kl, got {metric!r}")
    layers = sorted({p.layer for p in pts})
    alphas = sorted({p.alpha for p in pts})
    grid = torch.full((len(alphas), len(layers)), float("nan"))
    for p in pts:
        grid[alphas.index(p.alpha), layers.index(p.layer)] = getattr(p, metric)
    label = {"p_truth": "P(truth) of lying prompts", "recovered": "gap recovered", "kl": "KL on neutral text"}[metric]
    return fl.heatmap(
        grid,
        f"Residual steering on {pts[0].split} facts: {label} by layer and α ({model})",
        x_label="layer",
        y_label="α (< 0: toward honesty)",
        colorbar=metric,
        zmid=0.0 if metric == "recovered" else None,
        x_ticks=[str(l) for l in layers],
        y_ticks=[f"{a:g}" for a in alphas],
        annotate=True,
    )


def steering_figures(
    summary: dict, sweep: dict[str, list[dict]], where: str, kl_budget: float | None = None
) -> dict[str, go.Figure]:
    """Every figure of a steering run (see the module docstring), by file stem."""
    ev = summary["evaluation_on_test"]
    figs = bars(ev, where)
    figs["steering_frontier"] = frontier(sweep, ev, where, kl_budget)
    if any(p["setting"].get("layer", -1) >= 0 for p in sweep.get("resid", [])):
        figs["steering_resid_dose"] = dose(sweep["resid"], "recovered", summary["model"])
        figs["steering_resid_kl"] = dose(sweep["resid"], "kl", summary["model"])
    return figs


__all__ = ["bars", "dose", "frontier", "steering_figures", "sweep_points"]
