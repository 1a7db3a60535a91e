"""The one figure library: plot functions that return plotly figures, and one save function.

One style for every figure (the ``mechlie`` plotly template: white, one font, one colour cycle
:data:`COLORS`; titles wrapped to the figure's width, since they name the model, the data and n).
Wherever a number has a 95% CI it is drawn: error bars (:func:`errorbars`, :func:`bars_ci`) or
shaded bands (``lines(..., bands=...)``, :func:`lines_ci`); a null or control level is a dashed
line (``hlines``) or a marker per bar (:func:`null_markers`).

Plot functions never show a figure. :func:`save_figures` writes a batch as HTML (self-contained,
opens offline), SVG and PNG, each file atomically: images render to temporary names in the target
folder and are renamed into place only when the whole batch has rendered (one Chromium start for
the batch). When kaleido cannot render, ``required=True`` raises having written nothing, and
``required=False`` (run-time figures) writes the HTML, logs why once, and :func:`png_problem` says so.
"""

from __future__ import annotations

import logging
import os
import textwrap
import warnings
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from mechlie.core.io import atomic_write_text

log = logging.getLogger(__name__)

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f", "#17becf")
FORMATS = ("html", "svg", "png")
IMAGE_FORMATS = ("svg", "png")
_png_problem: str | None = None

pio.templates["mechlie"] = go.layout.Template(
    layout=go.Layout(
        font={"family": "DejaVu Sans, Arial, sans-serif", "size": 13},
        title={"font": {"size": 15}, "x": 0.02, "xanchor": "left"},
        paper_bgcolor="white",
        plot_bgcolor="white",
        colorway=list(COLORS),
        xaxis={"showline": True, "linecolor": "#444", "ticks": "outside", "gridcolor": "#eee", "zeroline": False},
        yaxis={"showline": True, "linecolor": "#444", "ticks": "outside", "gridcolor": "#eee", "zerolinecolor": "#999"},
        legend={"bgcolor": "rgba(255,255,255,0.8)"},
        margin={"l": 70, "r": 30, "t": 70, "b": 60},
    )
)


def styled(fig: go.Figure, title: str, *, width: int = 800, height: int = 450, **layout) -> go.Figure:
    """The house template, and the title wrapped to the figure's width (a cut title would lose the
    model, the data or n). A title holding ``<br>`` is taken as already broken into lines."""
    if "<br>" in title:
        lines = title.split("<br>")
    else:
        lines = textwrap.wrap(title, width=max(40, int(width / 8.2))) or [""]
    extra = 18 * (len(lines) - 1)
    fig.update_layout(
        template="mechlie", title="<br>".join(lines), width=width, height=height + extra, margin={"t": 70 + extra}
    )
    if layout:
        fig.update_layout(**layout)
    return fig


def rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def _floats(v) -> list[float]:
    return [float("nan") if x is None else float(x) for x in (v.tolist() if hasattr(v, "tolist") else v)]


def heatmap(
    values,
    title: str,
    *,
    x_label: str = "head",
    y_label: str = "layer",
    colorbar: str = "",
    zmid: float | None = None,
    text: Sequence[Sequence[str]] | None = None,
    x_ticks: Sequence[str] | None = None,
    y_ticks: Sequence[str] | None = None,
    annotate: bool = False,
) -> go.Figure:
    """A [rows, cols] heatmap (a tensor or nested lists), row 0 at the bottom; ``zmid`` centres a
    diverging scale; ``x_ticks`` / ``y_ticks`` name the columns / rows; ``annotate`` prints each value."""
    z = values.detach().float().cpu().numpy() if hasattr(values, "detach") else values
    kw: dict = {}
    if x_ticks is not None:
        kw["x"] = list(x_ticks)
    if y_ticks is not None:
        kw["y"] = list(y_ticks)
    if annotate:
        rows = z.tolist() if hasattr(z, "tolist") else z
        kw["text"] = [["" if v is None or v != v else f"{v:.2f}" for v in row] for row in rows]
        kw["texttemplate"] = "%{text}"
    elif text is not None:
        kw["text"] = text
    fig = go.Figure(
        go.Heatmap(
            z=z,
            colorscale="RdBu_r" if zmid is not None else "Viridis",
            zmid=zmid,
            colorbar={"title": colorbar},
            hovertemplate=f"{y_label} %{{y}}, {x_label} %{{x}}: %{{z:.3f}}<extra></extra>",
            **kw,
        )
    )
    fig.update_layout(xaxis_title=x_label, yaxis_title=y_label)
    if x_ticks is not None:  # an axis typed "category" with no labels of its own cannot render
        fig.update_xaxes(type="category")
    if y_ticks is not None:
        fig.update_yaxes(type="category")
    return styled(fig, title, width=760, height=620)


def side_by_side(figs: Sequence[go.Figure], titles: Sequence[str], title: str) -> go.Figure:
    """The first trace of each figure, in one row of subplots."""
    out = make_subplots(rows=1, cols=len(figs), subplot_titles=list(titles))
    for i, f in enumerate(figs):
        trace = f.data[0]
        if isinstance(trace, go.Heatmap):
            trace.update(colorbar={"x": (i + 1) / len(figs) - 0.02, "len": 0.8})
        out.add_trace(trace, row=1, col=i + 1)
    return styled(out, title, width=450 * len(figs), height=550)


def lines(
    x: Sequence,
    series: dict[str, Sequence[float]],
    title: str,
    *,
    x_label: str = "layer",
    y_label: str = "",
    bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> go.Figure:
    """Lines; ``bands[name] = (lo, hi)`` shades a series' 95% CI in its own colour."""
    bands = bands or {}
    if set(bands) - set(series):
        raise ValueError(f"bands for unknown series: {sorted(set(bands) - set(series))}")
    fig = go.Figure()
    xs = list(x)
    for i, (name, ys) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        if name in bands:
            lo, hi = (_floats(v) for v in bands[name])
            fig.add_trace(
                go.Scatter(
                    x=xs + xs[::-1],
                    y=hi + lo[::-1],
                    fill="toself",
                    fillcolor=rgba(color, 0.18),
                    line={"width": 0},
                    hoverinfo="skip",
                    showlegend=False,
                    legendgroup=name,
                    name=f"{name} 95% CI",
                )
            )
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=_floats(ys),
                mode="lines+markers",
                name=name + (" (95% CI)" if name in bands else ""),
                line={"color": color},
                marker={"size": 5},
                legendgroup=name,
            )
        )
    fig.update_layout(xaxis_title=x_label, yaxis_title=y_label)
    return styled(fig, title, width=900, height=480)


def lines_ci(
    x: Sequence,
    series: dict[str, tuple[Sequence[float], Sequence[float] | None, Sequence[float] | None]],
    title: str,
    *,
    x_label: str = "layer",
    y_label: str = "",
) -> go.Figure:
    """:func:`lines` with ``series[name] = (mean, lo, hi)`` (lo/hi None: no band)."""
    bands = {n: (lo, hi) for n, (_, lo, hi) in series.items() if lo is not None and hi is not None}
    return lines(x, {n: m for n, (m, _, _) in series.items()}, title, x_label=x_label, y_label=y_label, bands=bands)


def bars(groups: dict[str, dict[str, float]], title: str, *, y_label: str = "") -> go.Figure:
    """Grouped bars without CIs: ``groups[series][category] = value``."""
    fig = go.Figure()
    for name, vals in groups.items():
        fig.add_trace(go.Bar(name=name, x=list(vals), y=_floats(vals.values())))
    fig.update_layout(barmode="group", yaxis_title=y_label)
    return styled(fig, title, width=900, height=450)


def _ci_bar(x: list, name: str, m, lo, hi, color: str, group: int) -> go.Bar:
    m, lo, hi = _floats(m), _floats(lo), _floats(hi)
    if not len(m) == len(lo) == len(hi) == len(x):
        raise ValueError(f"series {name!r}: means, lo and hi need one value per label")
    return go.Bar(
        x=x,
        y=m,
        name=name,
        offsetgroup=str(group),  # null_markers(group=i) lines up with these bars
        marker_color=color,
        error_y={
            "type": "data",
            "symmetric": False,
            "array": [h - v for h, v in zip(hi, m)],
            "arrayminus": [v - low for v, low in zip(m, lo)],
            "color": "#333",
            "thickness": 1.2,
            "width": 3,
        },
    )


def errorbars(
    labels: Sequence[str],
    series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    title: str,
    *,
    y_label: str = "",
    hlines: dict[str, float] | None = None,
    secondary: dict[str, Sequence[float]] | None = None,
    secondary_label: str = "",
    ci_suffix: str = " (95% CI)",
) -> go.Figure:
    """Grouped bars with 95% CI error bars: ``series[name] = (means, lo, hi)`` over ``labels``.

    ``hlines`` draws labelled dashed reference lines (e.g. a null bar); ``secondary`` adds a second
    panel below with plain bars on the same labels (e.g. rank stability, in [0, 1]).
    """
    rows = 2 if secondary else 1
    fig = make_subplots(
        rows=rows, cols=1, shared_xaxes=True, row_heights=[0.65, 0.35] if rows == 2 else None, vertical_spacing=0.08
    )
    x = list(labels)
    for i, (name, (m, lo, hi)) in enumerate(series.items()):
        fig.add_trace(_ci_bar(x, f"{name}{ci_suffix}", m, lo, hi, COLORS[i % len(COLORS)], i), row=1, col=1)
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
    for j, (name, ys) in enumerate((secondary or {}).items()):
        color = COLORS[(len(series) + len(hlines or {}) + j) % len(COLORS)]
        fig.add_trace(go.Bar(x=x, y=_floats(ys), name=name, marker_color=rgba(color, 0.7)), row=2, col=1)
    if secondary:
        fig.update_yaxes(title_text=secondary_label, range=[0, 1.05], row=2, col=1)
    fig.update_yaxes(title_text=y_label, row=1, col=1)
    fig.update_layout(barmode="group")
    width = max(700, 60 * len(x) * max(1, len(series)) + 300)
    return styled(fig, title, width=width, height=600 if secondary else 460)


def bars_ci(
    categories: Sequence[str],
    series: dict[str, Sequence[tuple[float, float, float]]],
    title: str,
    *,
    y_label: str = "",
    hline: float | None = None,
    hline_name: str = "",
    symmetric_hline: bool = False,
) -> go.Figure:
    """:func:`errorbars` with ``series[name][i] = (mean, lo, hi)``, and one annotated reference
    line ``hline`` (``symmetric_hline``: also at ``-hline``, for a null of |value| that bounds both signs)."""
    as_columns = {n: tuple([v[k] for v in vals] for k in range(3)) for n, vals in series.items()}
    fig = errorbars(categories, as_columns, title, y_label=y_label, ci_suffix="")
    if hline is not None:
        fig.add_hline(
            y=hline, line_dash="dash", line_color="#555", annotation_text=hline_name, annotation_position="top left"
        )
        if symmetric_hline:
            fig.add_hline(y=-hline, line_dash="dash", line_color="#555")
    return fig


def null_markers(
    fig: go.Figure,
    categories: Sequence[str],
    values: Sequence[float | None],
    name: str,
    *,
    group: int | None = None,
    symbol: str = "line-ew-open",
) -> go.Figure:
    """Mark a per-category null / control level (e.g. the 95th percentile of a null) on a bar
    chart; ``group=i`` puts each mark on series ``i``'s bar."""
    kw = {}
    if group is not None:
        fig.update_layout(scattermode="group")
        kw = {"offsetgroup": str(group)}
    fig.add_trace(
        go.Scatter(
            x=list(categories),
            y=list(values),
            mode="markers",
            name=name,
            marker={"symbol": symbol, "size": 22, "color": "#222", "line": {"width": 2.5, "color": "#222"}},
            **kw,
        )
    )
    return fig


def _render_images(figs: dict[str, go.Figure], out_dir: Path, formats: Sequence[str]) -> dict[tuple[str, str], Path]:
    """Render every (figure, image format) to a temporary file in ``out_dir``; raise on any failure."""
    jobs = [(stem, fmt) for stem in figs for fmt in formats]
    tmps = {job: out_dir / f".{job[0]}.{os.getpid()}.tmp.{job[1]}" for job in jobs}
    if not jobs:
        return tmps
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The kopts argument is ignored")
            # kaleido renders at its own default size unless told the layout's (700 x 500 cuts titles)
            pio.write_images(
                [figs[stem] for stem, _ in jobs],
                [str(tmps[j]) for j in jobs],
                width=[figs[stem].layout.width for stem, _ in jobs],
                height=[figs[stem].layout.height for stem, _ in jobs],
                scale=[2 if fmt == "png" else 1 for _, fmt in jobs],
            )
        for t in tmps.values():
            if not t.is_file() or t.stat().st_size == 0:
                raise OSError(f"kaleido wrote no image to {t}")
    except BaseException:
        for t in tmps.values():
            t.unlink(missing_ok=True)
        raise
    return tmps


def save_figures(
    figs: dict[str, go.Figure], out_dir: str | Path, *, formats: Sequence[str] = FORMATS, required: bool = False
) -> dict[str, dict[str, str | None]]:
    """Write ``out_dir/<stem>.<fmt>`` for every figure and format; returns ``{stem: {fmt: path}}``.

    Images are all rendered before any file is renamed into place. When kaleido cannot render:
    ``required=True`` raises, having written nothing; otherwise the HTML is still written, image
    paths are None, and the reason is logged once (see :func:`png_problem`).
    """
    global _png_problem
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [f for f in formats if f in IMAGE_FORMATS]
    tmps: dict[tuple[str, str], Path] = {}
    if images and (required or _png_problem is None):
        try:
            tmps = _render_images(figs, out_dir, images)
        except Exception as e:  # kaleido raises several types when Chromium is missing or broken
            if required:
                raise
            _png_problem = (
                f"PNG figures skipped: kaleido could not render ({type(e).__name__}: {str(e)[:200]}). "
                "Install Chromium (Debian: apt-get install chromium) for static images; HTML is written."
            )
            log.warning(_png_problem)
    out: dict[str, dict[str, str | None]] = {stem: {} for stem in figs}
    for stem, fig in figs.items():
        for fmt in formats:
            final = out_dir / f"{stem}.{fmt}"
            if fmt == "html":
                atomic_write_text(final, fig.to_html(include_plotlyjs=True, full_html=True))
                out[stem][fmt] = str(final)
            elif (stem, fmt) in tmps:
                os.replace(tmps[(stem, fmt)], final)
                out[stem][fmt] = str(final)
            else:
                out[stem][fmt] = None
    return out


def save_all(
    figs: dict[str, go.Figure], out_dir: str | Path, formats: Sequence[str] = IMAGE_FORMATS
) -> dict[str, dict[str, str]]:
    """:func:`save_figures` of write-up images (SVG + PNG), all or nothing."""
    return save_figures(figs, out_dir, formats=formats, required=True)  # type: ignore[return-value]


def save_figure(fig: go.Figure, stem: str | Path, *, png: bool = True) -> dict[str, str | None]:
    """One figure: ``stem.html`` and (``png``) ``stem.svg`` / ``stem.png``; image paths None when
    kaleido cannot render."""
    stem = Path(stem)
    formats = FORMATS if png else ("html",)
    return save_figures({stem.name: fig}, stem.parent, formats=formats)[stem.name]


def png_problem() -> str | None:
    """Why images are not being written, or None."""
    return _png_problem


__all__ = [
    "COLORS",
    "FORMATS",
    "IMAGE_FORMATS",
    "bars",
    "bars_ci",
    "errorbars",
    "heatmap",
    "lines",
    "lines_ci",
    "null_markers",
    "png_problem",
    "rgba",
    "save_all",
    "save_figure",
    "save_figures",
    "side_by_side",
    "styled",
]
