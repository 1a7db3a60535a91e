"""One style for write-up figures: a plotly template, CI error bars and bands, SVG + PNG output.

Figures here are for papers: white background, one font, one colour cycle, 95% CIs drawn as
error bars (bars, points) or bands (lines) wherever a number has one. :func:`save_all` writes
every figure of a batch as SVG and PNG through one kaleido session (one Chromium start for the
batch), each file atomically: images are rendered to temporary names in the target folder and
renamed into place only when the whole batch has rendered, so a failure leaves no figure half
written and no stale mix of old and new.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go
import plotly.io as pio

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f")
FORMATS = ("svg", "png")

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


def styled(fig: go.Figure, title: str, *, width: int = 800, height: int = 450) -> go.Figure:
    """The house template, and the title wrapped to the figure's width (long titles name model,
    dataset and n; a cut title would lose them)."""
    import textwrap

    lines = textwrap.wrap(title, width=max(40, int(width / 8.2))) or [""]
    fig.update_layout(
        template="mechlie",
        title="<br>".join(lines),
        width=width,
        height=height + 18 * (len(lines) - 1),
        margin={"t": 70 + 18 * (len(lines) - 1)},
    )
    return fig


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
    """Grouped bars with 95% CI error bars: ``series[name][i] = (mean, lo, hi)``."""
    fig = go.Figure()
    for i, (name, vals) in enumerate(series.items()):
        m = [v[0] for v in vals]
        fig.add_trace(
            go.Bar(
                name=name,
                offsetgroup=str(i),  # null_markers(group=i) lines up with these bars
                x=list(categories),
                y=m,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [v[2] - v[0] for v in vals],
                    "arrayminus": [v[0] - v[1] for v in vals],
                    "color": "#333",
                    "thickness": 1.2,
                },
            )
        )
    if hline is not None:
        fig.add_hline(
            y=hline, line_dash="dash", line_color="#555", annotation_text=hline_name, annotation_position="top left"
        )
        if symmetric_hline:  # the null of |value| bounds both signs
            fig.add_hline(y=-hline, line_dash="dash", line_color="#555")
    fig.update_layout(barmode="group", yaxis_title=y_label)
    return styled(fig, title, width=max(950, 60 * len(categories) * max(1, len(series)) + 200))


def lines_ci(
    x: Sequence,
    series: dict[str, tuple[Sequence[float], Sequence[float] | None, Sequence[float] | None]],
    title: str,
    *,
    x_label: str = "layer",
    y_label: str = "",
) -> go.Figure:
    """Lines with 95% CI bands: ``series[name] = (mean, lo, hi)`` (lo/hi None: no band)."""
    fig = go.Figure()
    for i, (name, (m, lo, hi)) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        if lo is not None and hi is not None:
            fig.add_trace(
                go.Scatter(
                    x=list(x) + list(x)[::-1],
                    y=list(hi) + list(lo)[::-1],
                    fill="toself",
                    fillcolor=_alpha(c, 0.18),
                    line={"width": 0},
                    hoverinfo="skip",
                    showlegend=False,
                    name=f"{name} 95% CI",
                )
            )
        fig.add_trace(
            go.Scatter(x=list(x), y=list(m), mode="lines+markers", name=name, line={"color": c}, marker={"size": 5})
        )
    fig.update_layout(xaxis_title=x_label, yaxis_title=y_label)
    return styled(fig, title)


def heatmap(
    values,
    title: str,
    *,
    x_label: str = "head",
    y_label: str = "layer",
    colorbar: str = "",
    zmid: float | None = None,
    x_ticks: Sequence[str] | None = None,
    y_ticks: Sequence[str] | None = None,
    annotate: bool = False,
) -> go.Figure:
    """A heatmap; ``x_ticks`` / ``y_ticks`` name the columns / rows; ``annotate`` prints each value."""
    z = values.detach().float().cpu().numpy() if hasattr(values, "detach") else values
    kw = {}
    if x_ticks is not None:
        kw["x"] = list(x_ticks)
    if y_ticks is not None:
        kw["y"] = list(y_ticks)
    if annotate:
        kw["text"] = [
            ["" if v != v else f"{v:.2f}" for v in row] for row in (z.tolist() if hasattr(z, "tolist") else z)
        ]
        kw["texttemplate"] = "%{text}"
    fig = go.Figure(
        go.Heatmap(
            z=z, colorscale="RdBu_r" if zmid is not None else "Viridis", zmid=zmid, colorbar={"title": colorbar}, **kw
        )
    )
    fig.update_layout(xaxis_title=x_label, yaxis_title=y_label)
    if x_ticks is not None or y_ticks is not None:
        fig.update_xaxes(type="category")
        fig.update_yaxes(type="category")
    return styled(fig, title, width=650, height=600)


def null_markers(
    fig: go.Figure,
    categories: Sequence[str],
    values: Sequence[float | None],
    name: str,
    *,
    group: int | None = None,
    symbol: str = "line-ew-open",
) -> go.Figure:
    """Mark a per-category null / control level (e.g. the 95th percentile of a null) on a
    :func:`bars_ci` chart; ``group=i`` puts each mark on series ``i``'s bar."""
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


def _alpha(hex_color: str, a: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{a})"


def save_all(
    figs: dict[str, go.Figure], out_dir: str | Path, formats: Sequence[str] = FORMATS
) -> dict[str, dict[str, str]]:
    """Write ``out_dir/<stem>.<fmt>`` for every figure and format, all or nothing.

    Returns ``{stem: {fmt: path}}``. Raises (having written nothing) when kaleido cannot render.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(stem, fmt) for stem in figs for fmt in formats]
    tmps = [out_dir / f".{stem}.{os.getpid()}.tmp.{fmt}" for stem, fmt in jobs]
    try:
        # kaleido renders at its own default size unless told the layout's (700 x 500 cuts titles)
        pio.write_images(
            [figs[stem] for stem, _ in jobs],
            [str(t) for t in tmps],
            width=[figs[stem].layout.width for stem, _ in jobs],
            height=[figs[stem].layout.height for stem, _ in jobs],
            scale=[2 if fmt == "png" else 1 for _, fmt in jobs],
        )
        for t in tmps:
            if not t.is_file() or t.stat().st_size == 0:
                raise OSError(f"kaleido wrote no image to {t}")
        out: dict[str, dict[str, str]] = {}
        for (stem, fmt), t in zip(jobs, tmps):
            final = out_dir / f"{stem}.{fmt}"
            os.replace(t, final)
            out.setdefault(stem, {})[fmt] = str(final)
        return out
    finally:
        for t in tmps:
            t.unlink(missing_ok=True)
