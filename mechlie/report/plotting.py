"""Figures. Plot functions return a plotly figure and never show it; :func:`save_figure` writes it.

One style for all: the white ``plotly_white`` template, one font and one colour cycle
(:data:`COLORS`), titles that name the model, the data and n. Wherever a number has a 95% CI it
is drawn: error bars (:func:`errorbars`) or shaded bands (``lines(..., bands=...)``).

Every figure is written as interactive HTML (self-contained, so it opens offline) and, when
kaleido can find a Chromium, as a static PNG. Without one, the HTML is still written and the
reason the PNG was not is logged once and returned.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from mechlie.core.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)
_png_problem: str | None = None

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f", "#17becf")


def _style(fig: go.Figure, title: str, *, width: int, height: int, **layout) -> go.Figure:
    fig.update_layout(
        template="plotly_white",
        title={"text": title, "x": 0.02, "xanchor": "left", "font": {"size": 14}},
        font={"family": "DejaVu Sans, Arial, sans-serif", "size": 12},
        colorway=list(COLORS),
        width=width,
        height=height,
        **layout,
    )
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)}, {int(h[2:4], 16)}, {int(h[4:6], 16)}, {alpha})"


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
            z=z,
            x=list(x_ticks) if x_ticks else None,
            y=list(y_ticks) if y_ticks else None,
            colorscale="RdBu_r" if zmid is not None else "Viridis",
            zmid=zmid,
            colorbar={"title": colorbar},
            text=text,
            hovertemplate=f"{y_label} %{{y}}, {x_label} %{{x}}: %{{z:.3f}}<extra></extra>",
        )
    )
    return _style(fig, title, width=760, height=620, xaxis_title=x_label, yaxis_title=y_label)


def side_by_side(figs: Sequence[go.Figure], titles: Sequence[str], title: str) -> go.Figure:
    """Put the first trace of each figure in one row of subplots."""
    out = make_subplots(rows=1, cols=len(figs), subplot_titles=list(titles))
    for i, f in enumerate(figs):
        trace = f.data[0]
        if isinstance(trace, go.Heatmap):
            trace.update(colorbar={"x": (i + 1) / len(figs) - 0.02, "len": 0.8})
        out.add_trace(trace, row=1, col=i + 1)
    return _style(out, title, width=450 * len(figs), height=550)


def lines(
    x: Sequence,
    series: dict[str, Sequence[float]],
    title: str,
    *,
    x_label: str = "layer",
    y_label: str = "",
    bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> go.Figure:
    """Lines; ``bands[name] = (lo, hi)`` shades a series' CI in its own colour."""
    bands = bands or {}
    if set(bands) - set(series):
        raise ValueError(f"bands for unknown series: {sorted(set(bands) - set(series))}")
    fig = go.Figure()
    xs = list(x)
    for i, (name, ys) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        if name in bands:
            lo, hi = (list(map(float, v)) for v in bands[name])
            fig.add_trace(
                go.Scatter(
                    x=xs + xs[::-1],
                    y=hi + lo[::-1],
                    fill="toself",
                    fillcolor=_rgba(color, 0.18),
                    line={"width": 0},
                    hoverinfo="skip",
                    showlegend=False,
                    legendgroup=name,
                )
            )
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=[float(v) for v in ys],
                mode="lines+markers",
                name=name + (" (95% CI)" if name in bands else ""),
                line={"color": color},
                legendgroup=name,
            )
        )
    return _style(fig, title, width=900, height=480, xaxis_title=x_label, yaxis_title=y_label)


def bars(groups: dict[str, dict[str, float]], title: str, *, y_label: str = "") -> go.Figure:
    """Grouped bars: ``groups[series][category] = value``."""
    fig = go.Figure()
    for name, vals in groups.items():
        fig.add_trace(go.Bar(name=name, x=list(vals), y=[float(v) for v in vals.values()]))
    return _style(fig, title, width=900, height=450, barmode="group", yaxis_title=y_label)


def errorbars(
    labels: Sequence[str],
    series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    title: str,
    *,
    y_label: str = "",
    hlines: dict[str, float] | None = None,
    secondary: dict[str, Sequence[float]] | None = None,
    secondary_label: str = "",
) -> go.Figure:
    """Grouped bars with 95% CI error bars: ``series[name] = (means, lo, hi)`` over ``labels``.

    ``hlines`` draws labelled reference lines (e.g. a null bar); ``secondary`` adds a second
    panel below with plain bars on the same labels (e.g. rank stability, in [0, 1]).
    """
    rows = 2 if secondary else 1
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.65, 0.35][:rows] if rows == 2 else None,
        vertical_spacing=0.08,
    )
    x = list(labels)
    for i, (name, (m, lo, hi)) in enumerate(series.items()):
        m, lo, hi = (list(map(float, v)) for v in (m, lo, hi))
        if not len(m) == len(lo) == len(hi) == len(x):
            raise ValueError(f"series {name!r}: means, lo and hi need one value per label")
        fig.add_trace(
            go.Bar(
                x=x,
                y=m,
                name=f"{name} (95% CI)",
                marker_color=COLORS[i % len(COLORS)],
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [h - v for h, v in zip(hi, m)],
                    "arrayminus": [v - low for v, low in zip(m, lo)],
                    "thickness": 1.2,
                    "width": 3,
                },
            ),
            row=1,
            col=1,
        )
    for j, (name, y) in enumerate((hlines or {}).items()):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[float(y)] * len(x),
                mode="lines",
                name=f"{name}: {float(y):.3f}",
                line={"dash": "dash", "color": COLORS[(len(series) + j) % len(COLORS)]},
            ),
            row=1,
            col=1,
        )
    if secondary:
        for j, (name, ys) in enumerate(secondary.items()):
            fig.add_trace(
                go.Bar(
                    x=x,
                    y=[float(v) for v in ys],
                    name=name,
                    marker_color=_rgba(COLORS[(len(series) + len(hlines or {}) + j) % len(COLORS)], 0.7),
                ),
                row=2,
                col=1,
            )
        fig.update_yaxes(title_text=secondary_label, range=[0, 1.05], row=2, col=1)
    fig.update_yaxes(title_text=y_label, row=1, col=1)
    return _style(fig, title, width=max(700, 60 * len(x) + 300), height=600 if secondary else 460, barmode="group")


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


def save_figures(figs: dict[str, go.Figure], out_dir: str | Path, *, png: bool = True) -> dict[str, dict]:
    """:func:`save_figure` for each figure (``out_dir / name``), with one Chromium kept open for
    all the PNGs: kaleido otherwise starts a browser per image (1-6 s each on 2 cores)."""
    server = False
    if png and _png_problem is None and len(figs) > 1:
        try:
            import kaleido

            kaleido.start_sync_server(silence_warnings=True)
            server = True
        except Exception as e:  # no server: save_figure falls back to one browser per image
            log.debug("kaleido server not started: %s", e)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The kopts argument is ignored")
            return {name: save_figure(fig, Path(out_dir) / name, png=png) for name, fig in figs.items()}
    finally:
        if server:
            kaleido.stop_sync_server(silence_warnings=True)


def png_problem() -> str | None:
    """Why PNGs are not being written, or None."""
    return _png_problem
