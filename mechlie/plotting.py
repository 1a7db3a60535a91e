"""Figures. Plot functions return a plotly figure and never show it; :func:`save_figure` writes it.

Every figure is written as interactive HTML (self-contained, so it opens offline) and, when
kaleido can find a Chromium, as a static PNG. Without one, the HTML is still written and the
reason the PNG was not is logged once and returned.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from mechlie.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)
_png_problem: str | None = None


def heatmap(
    values: Tensor,
    title: str,
    *,
    x_label: str = "head",
    y_label: str = "layer",
    colorbar: str = "",
    zmid: float | None = None,
    text: Sequence[Sequence[str]] | None = None,
    x_ticks: Sequence[str] | None = None,
    y_ticks: Sequence[str] | None = None,
) -> go.Figure:
    """A [rows, cols] heatmap; rows are drawn bottom-up (layer 0 at the bottom)."""
    z = values.detach().float().cpu().numpy()
    fig = go.Figure(
        go.Heatmap(
            z=z, x=list(x_ticks) if x_ticks else None, y=list(y_ticks) if y_ticks else None,
            colorscale="RdBu_r" if zmid is not None else "Viridis", zmid=zmid,
            colorbar={"title": colorbar}, text=text,
            hovertemplate=f"{y_label} %{{y}}, {x_label} %{{x}}: %{{z:.3f}}<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, width=700, height=600)
    return fig


def side_by_side(figs: Sequence[go.Figure], titles: Sequence[str], title: str) -> go.Figure:
    """Put the first trace of each figure in one row of subplots."""
    out = make_subplots(rows=1, cols=len(figs), subplot_titles=list(titles))
    for i, f in enumerate(figs):
        trace = f.data[0]
        if isinstance(trace, go.Heatmap):
            trace.update(colorbar={"x": (i + 1) / len(figs) - 0.02, "len": 0.8})
        out.add_trace(trace, row=1, col=i + 1)
    out.update_layout(title=title, width=450 * len(figs), height=550)
    return out


def lines(
    x: Sequence, series: dict[str, Sequence[float]], title: str, *, x_label: str = "layer", y_label: str = ""
) -> go.Figure:
    fig = go.Figure()
    for name, ys in series.items():
        fig.add_trace(go.Scatter(x=list(x), y=[float(v) for v in ys], mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, width=800, height=450)
    return fig


def bars(groups: dict[str, dict[str, float]], title: str, *, y_label: str = "") -> go.Figure:
    """Grouped bars: ``groups[series][category] = value``."""
    fig = go.Figure()
    for name, vals in groups.items():
        fig.add_trace(go.Bar(name=name, x=list(vals), y=[float(v) for v in vals.values()]))
    fig.update_layout(title=title, barmode="group", yaxis_title=y_label, width=900, height=450)
    return fig


def save_figure(fig: go.Figure, stem: str | Path, *, png: bool = True) -> dict[str, str | None]:
    """Write ``stem.html`` and ``stem.png``; returns their paths (PNG None, with a reason logged)."""
    global _png_problem
    stem = Path(stem)
    html = atomic_write_text(stem.with_suffix(".html"), fig.to_html(include_plotlyjs=True, full_html=True))
    out: dict[str, str | None] = {"html": str(html), "png": None}
    if not png:
        return out
    if _png_problem is None:
        try:
            data = fig.to_image(format="png", scale=1)
            out["png"] = str(atomic_write_bytes(stem.with_suffix(".png"), data))
            return out
        except Exception as e:  # kaleido raises several types when Chromium is missing or broken
            _png_problem = (
                f"PNG figures skipped: kaleido could not render ({type(e).__name__}: {str(e)[:200]}). "
                "Install Chromium (Debian: apt-get install chromium) for static images; HTML is written."
            )
            log.warning(_png_problem)
    return out


def png_problem() -> str | None:
    """Why PNGs are not being written, or None."""
    return _png_problem
