"""Write-up figures and ``report.md`` from saved runs, without recomputing anything.

A run folder is recognised by its kind (a registry: :func:`register_kind`), read only from the
files the script saved, and turned into a :class:`RunReport`: figures in the house style of
:mod:`mechlie.report.figstyle` (95% CIs as error bars or bands wherever the saved data allow a
bootstrap over pairs), titles that name the model, the dataset and n, and the headline numbers
as Markdown. :func:`write_figures` writes a run's figures as SVG + PNG under ``RUN/figures/``;
:func:`write_report` gathers several runs into one ``report.md``.

Everything is built in memory first: a missing file, a run of an unknown kind or an older format
raises :class:`RunFormatError` before anything is written, and images are renamed into place only
when all have rendered.

Kinds: ``head_sweep`` (``analyses/head_sweep.py``), ``patching_sweep``, ``function_vectors``,
``steering`` (``analyses/steering_demo.py``), ``detection`` (``analyses/detect.py``) and
``sae_features`` (``analyses/sae_features.py``). Adding one is one function::

    @register_kind("my_kind", detect=lambda run: (run / "my_result.safetensors").is_file())
    def my_kind(run: Path) -> RunReport: ...
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import plotly.graph_objects as go
import torch

from mechlie.report import figstyle
from mechlie.core.io import ResultFileError, UserError, atomic_write_text


class RunFormatError(UserError, ValueError):
    """A folder that is not a run this module can read: unknown kind, older format, missing file."""


@dataclass
class RunReport:
    kind: str
    run: Path
    title: str
    headline: list[str]  # Markdown bullet lines
    figures: dict[str, go.Figure] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Kind:
    name: str
    detect: Callable[[Path], bool]
    build: Callable[[Path], RunReport]


KINDS: dict[str, Kind] = {}


def register_kind(name: str, detect: Callable[[Path], bool]):
    """Decorator: ``build(run_dir) -> RunReport`` for runs where ``detect(run_dir)`` is true."""

    def deco(build: Callable[[Path], RunReport]) -> Callable[[Path], RunReport]:
        KINDS[name] = Kind(name, detect, build)
        return build

    return deco


def summary_kind(name: str, *legacy_keys: str) -> Callable[[Path], bool]:
    """A ``detect`` for :func:`register_kind`: the run's ``summary.json`` says ``kind: name``, or (runs
    written before summaries carried a kind) it holds every one of ``legacy_keys``."""

    def detect(run: Path) -> bool:
        s = json.loads((run / "summary.json").read_text())
        return s.get("kind") == name or (bool(legacy_keys) and all(k in s for k in legacy_keys))

    return detect


def _json(path: Path) -> dict:
    if not path.is_file():
        raise RunFormatError(f"missing results file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{path} is not valid JSON ({e}); rerun the script that wrote it") from e


def _need(d: dict, keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise RunFormatError(
            f"{path} lacks {missing}: it was written by an older version of mechlie (or another script); "
            "rerun the script that made this run"
        )


def detect_kind(run: str | Path) -> str:
    """The kind of run folder ``run``; :class:`RunFormatError` if it is none that is registered."""
    run = Path(run)
    if not run.is_dir():
        raise RunFormatError(f"{run} is not a folder")
    if not (run / "summary.json").is_file():
        raise RunFormatError(f"{run} has no summary.json: not a finished mechlie run")
    for kind in KINDS.values():
        if kind.detect(run):
            return kind.name
    raise RunFormatError(f"{run} is not a run of a kind make_figures knows ({', '.join(sorted(KINDS))})")


def build_report(run: str | Path) -> RunReport:
    run = Path(run)
    return KINDS[detect_kind(run)].build(run)


def write_figures(run: str | Path, out_dir: str | Path | None = None) -> dict[str, dict[str, str]]:
    """Render every figure of ``run`` into ``out_dir`` (default ``run/figures``) as SVG + PNG."""
    rep = build_report(run)
    return figstyle.save_all(rep.figures, Path(out_dir) if out_dir is not None else Path(run) / "figures")


def write_report(runs: list[str | Path], out: str | Path) -> Path:
    """Figures of every run (under ``out``'s folder, one subfolder per run) and ``out`` (Markdown).

    Args:
        runs: run folders (any registered kind).
        out: the report path, e.g. ``report/report.md``.

    Example:
        >>> write_report(["results/head_sweep/smollm2-...", "results/sae_features/..."], "report/report.md")
    """
    out = Path(out)
    reports = [build_report(r) for r in runs]  # every run is read before anything is written
    names = [f"{rep.kind}-{Path(rep.run).name}" for rep in reports]
    if len(set(names)) != len(names):
        raise RunFormatError("two runs of the same kind have the same folder name; pass distinct runs")
    lines = [
        "# mechlie report",
        "",
        "Generated by `python analyses/make_figures.py "
        + " ".join(str(r) for r in runs)
        + f" --out {out}` from the saved runs (nothing recomputed).",
        "",
    ]
    for rep, name in zip(reports, names):
        written = figstyle.save_all(rep.figures, out.parent / name)
        lines += [f"## {rep.title}", "", f"Run: `{rep.run}` (kind `{rep.kind}`)", ""] + rep.headline + [""]
        for stem, paths in written.items():
            rel = os.path.relpath(paths["png"], out.parent)
            lines += [
                f"![{rep.captions.get(stem, stem)}]({rel})",
                "",
                f"*{rep.captions.get(stem, stem)}* ([SVG]({os.path.relpath(paths['svg'], out.parent)}))",
                "",
            ]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def _num(x, p: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{p}f}"  # JSON stores NaN as null


def _fmt(m: float, lo: float, hi: float, p: int = 2) -> str:
    return f"{m:.{p}f} [{lo:.{p}f}, {hi:.{p}f}]"


# ---------------------------------------------------------------------------------------------
# head sweep


def _load_result(run: Path, stem: str) -> dict:
    """``stem.safetensors`` (mechlie.core.io) or ``stem.pt`` (older head sweeps), as nested dicts."""
    st, pt = run / f"{stem}.safetensors", run / f"{stem}.pt"
    if st.is_file():
        from mechlie.core.io import load_tensors

        return load_tensors(st)[0]
    if pt.is_file():
        try:
            return torch.load(pt, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign pickle
            raise ResultFileError(f"{pt} could not be read ({type(e).__name__}: {e}); rerun the head sweep") from e
    raise RunFormatError(f"missing results file: {st.name} (or {pt.name}) in {run}")


def _is_head_sweep(run: Path) -> bool:
    s = json.loads((run / "summary.json").read_text())
    if s.get("kind") == "head_sweep":
        return True
    # Older head sweeps have no "kind": their summary has a patching block and a patching file.
    # (Function-vector runs also list top_heads_by_patching, but have no patching file.)
    has_file = any((run / f"patching.{ext}").is_file() for ext in ("safetensors", "pt"))
    return "top_heads_by_patching" in s and isinstance(s.get("patching"), dict) and has_file


def _normalized_ci(patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor, n_boot: int = 1000):
    """Normalized patching effect per component with a bootstrap CI over pairs (means normalized)."""
    from mechlie.core.stats import bootstrap_tensor

    def stat(i: torch.Tensor) -> torch.Tensor:
        lo, hi = corrupt[i].mean(), clean[i].mean()
        return (patched[i].mean(0) - lo) / (hi - lo)

    return bootstrap_tensor(stat, patched.shape[0], n_boot=n_boot)


@register_kind("head_sweep", detect=_is_head_sweep)
def head_sweep_report(run: Path) -> RunReport:
    s = _json(run / "summary.json")
    _need(s, ("model", "n_pairs", "patching", "top_heads_by_patching"), run / "summary.json")
    cfg = s.get("config") or _json(run / "config.json")
    cfg = cfg.get("config", cfg)  # cli-style config.json nests the settings
    model, dataset, fmt = s["model"], cfg.get("dataset", "?"), cfg.get("fmt", cfg.get("format", "?"))
    patch = _load_result(run, "patching")
    for k in ("z", "resid_pre"):
        if k not in patch:
            raise RunFormatError(f"{run}/patching has no {k!r} results: written by an older version; rerun")
    z = patch["z"]
    n_patch = z["logit_diff"].shape[0]
    est = _normalized_ci(z["logit_diff"].float(), z["clean"]["logit_diff"].float(), z["corrupt"]["logit_diff"].float())
    L, H = est.mean.shape
    order = est.mean.flatten().argsort(descending=True)[:15].tolist()
    labels = [f"L{i // H}H{i % H}" for i in order]
    m, lo, hi = est.mean.flatten(), est.lo.flatten(), est.hi.flatten()
    where = f"{model}, {dataset} ({fmt}), n={n_patch} pairs"
    figs = {
        "head_patching": figstyle.heatmap(
            est.mean, f"Patching each head's z honest→lying, final token ({where})", colorbar="norm. effect", zmid=0.0
        ),
        "top_heads": figstyle.bars_ci(
            labels,
            {"logit diff (95% CI over pairs)": [(float(m[i]), float(lo[i]), float(hi[i])) for i in order]},
            f"Top heads by patching effect, 0 = lying, 1 = honest ({where})",
            y_label="normalized effect",
        ),
    }
    r = patch["resid_pre"]
    re_ = _normalized_ci(r["logit_diff"].float(), r["clean"]["logit_diff"].float(), r["corrupt"]["logit_diff"].float())
    rp = _normalized_ci(r["p_truth"].float(), r["clean"]["p_truth"].float(), r["corrupt"]["p_truth"].float())
    series = {
        "resid_pre patching, logit diff": (re_.mean.tolist(), re_.lo.tolist(), re_.hi.tolist()),
        "resid_pre patching, P(truth)": (rp.mean.tolist(), rp.lo.tolist(), rp.hi.tolist()),
    }
    figs["layer_patching"] = figstyle.lines_ci(
        range(re_.mean.shape[0]), series, f"Residual patching per layer ({where})", y_label="normalized effect"
    )
    captions = {
        "head_patching": "Normalized effect of patching each head's z from the honest into the lying run.",
        "top_heads": "The 15 heads with the largest effect, 95% bootstrap CI over patched pairs.",
        "layer_patching": "Patching the residual stream (input of block l), 95% CI bands over pairs.",
    }
    ra = s.get("resid_auroc", {})
    if "per_layer" in ra:
        auroc_series = {"held-out AUROC": (ra["per_layer"], ra.get("per_layer_lo"), ra.get("per_layer_hi"))}
        for key, name in (
            ("null_mean", "label-swap null (mean)"),
            ("null_q95", "label-swap null (95th pct.)"),
            ("random_mean", "random direction (mean)"),
            ("shuffled", "shuffled labels"),  # older head sweeps
            ("random", "random direction"),
        ):
            if key in ra:
                auroc_series[name] = (ra[key], None, None)
        figs["layer_auroc"] = figstyle.lines_ci(
            range(len(ra["per_layer"])),
            auroc_series,
            f"Residual honest→lying direction per layer ({model}, {dataset}, n={s['n_pairs']})",
            y_label="AUROC",
        )
        captions["layer_auroc"] = "Held-out AUROC of each layer's difference-of-means direction, beside its controls."
    b = s["patching"]
    top = s["top_heads_by_patching"][:5]
    best = order[0]
    headline = [
        f"- {s['n_pairs']} pairs; P(truth) honest {b['honest_p_truth']:.3f} vs lying {b['lying_p_truth']:.3f} "
        f"on the {n_patch} patched pairs.",
        f"- Top head by patching: {labels[0]}, effect "
        f"{_fmt(float(m[best]), float(lo[best]), float(hi[best]))} (95% CI over pairs); "
        "next: " + ", ".join(f"L{t['layer']}H{t['head']} ({_num(t['effect'])})" for t in top[1:]) + ".",
        f"- Residual patching reaches {re_.mean.max():.2f} at layer {int(re_.mean.argmax())}.",
    ]
    return RunReport("head_sweep", run, f"Head sweep: {where}", headline, figs, captions)


# ---------------------------------------------------------------------------------------------
# SAE features


@register_kind("sae_features", detect=summary_kind("sae_features"))
def sae_report(run: Path) -> RunReport:
    from mechlie.core.io import load_tensors

    s = _json(run / "summary.json")
    _need(s, ("model", "sites", "n_known_pairs"), run / "summary.json")
    if not (run / "features.safetensors").is_file():
        raise RunFormatError(f"missing results file: {run / 'features.safetensors'}")
    tensors, _ = load_tensors(run / "features.safetensors")
    figs, captions, headline = {}, {}, []
    for site, r in s["sites"].items():
        _need(r, ("features", "causal", "sae", "null_max_diff", "n_test"), run / "summary.json")
        tag = site.replace("blocks.", "b").replace(".hook_", "_").replace(".attn", "").replace(":", "h")
        where = f"{s['model']}, {site}, n={r['n_test']} held-out pairs"
        feats = r["features"]
        figs[f"{tag}_features"] = figstyle.bars_ci(
            [f"f{f['feature']}" for f in feats],
            {"f(lying) − f(honest)": [(f["diff"], f["lo"], f["hi"]) for f in feats]},
            f"SAE features of the lie direction ({where})",
            y_label="activation difference",
            hline=r["null_max_diff"],
            hline_name="95% null of the max |difference| (label swaps)",
            symmetric_hline=True,
        )
        captions[f"{tag}_features"] = (
            f"Top features at {site} chosen on training pairs, mean lying − honest "
            "activation on held-out pairs with 95% bootstrap CIs; dashed: the null of the largest |difference|."
        )
        t = tensors.get(site)
        if t is not None and "cosine_all" in t:
            fig = go.Figure(
                go.Scatter(
                    x=t["diff_train_all"].tolist(),
                    y=t["cosine_all"].tolist(),
                    mode="markers",
                    marker={"size": 4, "opacity": 0.5},
                    name="all features",
                )
            )
            fig.update_layout(
                xaxis_title="f(lying) − f(honest), training pairs", yaxis_title="cos(W_dec row, diff-of-means)"
            )
            figs[f"{tag}_cosine"] = figstyle.styled(
                fig, f"Decoder cosine with the lie direction vs. activation difference ({s['model']}, {site})"
            )
            captions[f"{tag}_cosine"] = (
                "Every feature: its honest→lying activation difference and its decoder row's cosine with the "
                "difference-of-means direction."
            )
        for mode, c in r["causal"].items():
            fig = go.Figure(
                go.Histogram(
                    x=c["random_deltas"],
                    name=f"{len(c['random_deltas'])} random matched sets",
                    marker_color="#999",
                    nbinsx=30,
                )
            )
            fig.add_vline(x=c["delta"], line_color=figstyle.COLORS[1], line_width=2)
            fig.add_vrect(x0=c["delta_lo"], x1=c["delta_hi"], fillcolor=figstyle.COLORS[1], opacity=0.15, line_width=0)
            fig.update_layout(xaxis_title="ΔP(truth) on lying prompts", yaxis_title="random draws", showlegend=True)
            figs[f"{tag}_causal_{mode}"] = figstyle.styled(
                fig, f"{mode.capitalize()} top features vs. matched random features ({where})"
            )
            captions[f"{tag}_causal_{mode}"] = (
                f"Red: ΔP(truth) when the top features are {mode}d at the final token "
                "(band: 95% CI over pairs); grey: the same for random features of matched mean activation."
            )
        op = r.get("on_policy")
        if op and op.get("features"):
            ofe = op["features"]
            figs[f"{tag}_on_policy"] = figstyle.bars_ci(
                [f"f{f['feature']}" for f in ofe],
                {"f(lie) − f(truth)": [(f["diff"], f["lo"], f["hi"]) for f in ofe]},
                f"SAE features of on-policy lies vs truths, same lying prompts ({s['model']}, {site}, "
                f"n={op['n_test']} held-out pairs)",
                y_label="activation difference",
                hline=op["null_max_diff"],
                hline_name="95% null of the max |difference| (label swaps)",
                symmetric_hline=True,
            )
            captions[f"{tag}_on_policy"] = (
                "Answers sampled under the lying prompt, at the first answer token: lies minus truths, per pair "
                "(means of its samples), features chosen on training pairs, 95% CIs over held-out pairs."
            )
            fr = op.get("framing_features") or []
            if fr:
                figs[f"{tag}_framing_on_policy"] = figstyle.bars_ci(
                    [f"f{f['feature']}" for f in fr],
                    {"f(lie) − f(truth), on-policy": [(f["diff"], f["lo"], f["hi"]) for f in fr]},
                    f"The lie direction's (framing) features on on-policy lies vs truths ({s['model']}, {site}, "
                    f"n={op['n_test']} pairs)",
                    y_label="activation difference",
                    hline=op["null_max_diff"],
                    hline_name="on-policy null of the max",
                    symmetric_hline=True,
                )
                captions[f"{tag}_framing_on_policy"] = (
                    "Do the features that separate honest from lying prompts also separate the lies the model "
                    "tells from its truths under the same prompt? 95% CIs over held-out pairs."
                )
        q = r["sae"].get("quality")
        if q:
            headline.append(
                f"- **{site}** (d_sae {r['d_sae']}): L0 {q['l0']:.1f}, "
                f"explained variance {q['explained_variance']:.3f}, "
                f"CE loss recovered {_fmt(q['ce_recovered'], q['ce_recovered_lo'], q['ce_recovered_hi'])} "
                f"(zero-ablation baseline, {q['n_lines']} held-out lines)."
            )
        top = feats[0]
        headline.append(
            f"- Top feature f{top['feature']}: lying − honest {_fmt(top['diff'], top['lo'], top['hi'], 3)} "
            f"(null of the max {r['null_max_diff']:.3f}), effect size {top['effect_size']:.2f}, "
            f"decoder cosine {top['cosine']:.2f}."
        )
        if op:
            counts = f"{op['n_lie']} sampled lies, {op['n_truth']} truths, {op['n_pairs_with_both']} pairs with both"
            if op.get("features"):
                t0 = op["features"][0]
                headline.append(
                    f"- On-policy ({counts}): top feature f{t0['feature']} lie − truth "
                    f"{_fmt(t0['diff'], t0['lo'], t0['hi'], 3)} (null of the max {op['null_max_diff']:.3f}, "
                    f"{op['n_test']} held-out pairs)."
                )
            else:
                headline.append(f"- On-policy: {counts}; {op.get('too_few', 'no decomposition')}.")
        for mode, c in r["causal"].items():
            headline.append(
                f"- {mode} {len(c['features'])} top features: ΔP(truth) "
                f"{_fmt(c['delta'], c['delta_lo'], c['delta_hi'], 3)} vs. "
                f"random matched features (95th pct. {c['random_q95']:+.3f}, p = {c['p_value']:.3f})."
            )
    heads = s.get("heads")
    if heads:
        rows = heads["rows"]
        names = [row["head"] for row in rows]
        tri = lambda d: (d["mean"], d["lo"], d["hi"])  # noqa: E731
        n = rows[0]["n"]
        figs["heads_demo_attention"] = figstyle.bars_ci(
            names,
            {
                "honest prompt": [tri(row["share_honest"]) for row in rows],
                "lying prompt": [tri(row["share_lying"]) for row in rows],
            },
            f"Final-token attention on the demonstrations' answers ({s['model']}, n={n} pairs)",
            y_label="share of attention",
        )
        figs["heads_dla"] = figstyle.bars_ci(
            names,
            {
                "honest prompt": [tri(row["dla_honest"]) for row in rows],
                "lying prompt": [tri(row["dla_lying"]) for row in rows],
            },
            f"Direct logit attribution, truth − lie, of each head ({s['model']}, n={n} pairs)",
            y_label="logit",
        )
        captions["heads_demo_attention"] = (
            "Share of the final token's attention on the demo answers, 95% CI over pairs."
        )
        captions["heads_dla"] = "Each head's direct push toward the truth (positive) or the lie, 95% CI over pairs."
        for row in rows:
            headline.append(
                f"- {row['head']}: attention on demo answers honest {_fmt(*tri(row['share_honest']))}, lying "
                f"{_fmt(*tri(row['share_lying']))}; DLA honest {_fmt(*tri(row['dla_honest']))}, "
                f"lying {_fmt(*tri(row['dla_lying']))}."
            )
        if (run / heads["html"]).is_file():
            headline.append(f"- circuitsvis attention patterns (honest vs lying): `{run / heads['html']}`")
    return RunReport(
        "sae_features",
        run,
        f"SAE features: {s['model']}, {s.get('dataset', '')}, {s['n_known_pairs']} known pairs",
        headline,
        figs,
        captions,
    )


# ---------------------------------------------------------------------------------------------
# patching sweep (analyses/patching_sweep.py)


@register_kind("patching_sweep", detect=summary_kind("patching_sweep", "component_ranking", "positions", "heads"))
def patching_sweep_report(run: Path) -> RunReport:
    from mechlie.core.io import load_tensors

    s = _json(run / "summary.json")
    _need(s, ("model", "n_pairs", "metric", "honest_mean", "lying_mean", "heads", "positions"), run / "summary.json")
    _need(s["heads"], ("top_exact", "spearman_attribution_vs_exact"), run / "summary.json")
    if not (run / "tensors.safetensors").is_file():
        raise RunFormatError(f"missing results file: {run / 'tensors.safetensors'}")
    t, _ = load_tensors(run / "tensors.safetensors")
    if "exact_delta_heads" not in t:
        raise RunFormatError(f"{run}/tensors.safetensors has no exact_delta_heads: an older version; rerun")
    where = f"{s['model']}, n={s['n_pairs']} pairs, {s['metric']}"
    norm = s["honest_mean"] - s["lying_mean"]
    top = s["heads"]["top_exact"]
    labels = [f"L{h['layer']}H{h['head']}" for h in top]
    tri = [(h["effect"]["mean"], h["effect"]["lo"], h["effect"]["hi"]) for h in top]
    figs = {
        "heads_exact": figstyle.heatmap(
            t["exact_delta_heads"] / norm,
            f"Exact final-position patching per head ({where})",
            colorbar="norm. effect",
            zmid=0.0,
        ),
        "top_heads_exact": figstyle.bars_ci(
            labels,
            {"normalized effect (95% CI over pairs)": tri},
            f"Top heads by exact patching ({where})",
            y_label="normalized effect",
        ),
    }
    captions = {
        "heads_exact": "Exact patching of each head's z from the honest into the lying run, normalized (1 = honest).",
        "top_heads_exact": "The top heads with 95% bootstrap CIs over pairs.",
    }
    p = s["positions"]
    ge = p.get("group_effect")
    if ge:
        layers = p.get("layers", [])
        series = {
            g: (
                [v[f"L{l}"]["mean"] for l in layers],
                [v[f"L{l}"]["lo"] for l in layers],
                [v[f"L{l}"]["hi"] for l in layers],
            )
            for g, v in ge.items()
        }
        figs["demo_groups"] = figstyle.lines_ci(
            layers, series, f"Patching each demonstration's tokens, residual ({where})", y_label="normalized effect"
        )
        captions["demo_groups"] = "Residual patching of each demonstration's tokens per layer, 95% CI bands over pairs."
    h0 = top[0]
    headline = [
        f"- Top head by exact patching: L{h0['layer']}H{h0['head']}, "
        f"{_fmt(h0['effect']['mean'], h0['effect']['lo'], h0['effect']['hi'])} (normalized, 95% CI over pairs).",
        f"- Attribution patching vs exact: Spearman {s['heads']['spearman_attribution_vs_exact']:.3f} over heads"
        + (
            f", {p['spearman_attribution_vs_exact']:.3f} over positions × layers."
            if "spearman_attribution_vs_exact" in p
            else "."
        ),
    ]
    if "max_effect" in p:
        m = p["max_effect"]
        headline.append(f"- Largest position × layer effect: {_fmt(m['mean'], m['lo'], m['hi'])} at {p.get('argmax')}.")
    return RunReport("patching_sweep", run, f"Patching sweep: {where}", headline, figs, captions)


# ---------------------------------------------------------------------------------------------
# function vectors (analyses/function_vectors.py)


@register_kind("function_vectors", detect=summary_kind("function_vectors", "top_heads_by_aie"))
def function_vectors_report(run: Path) -> RunReport:
    from mechlie.core.io import load_tensors
    from mechlie.core.stats import bootstrap_tensor

    s = _json(run / "summary.json")
    _need(s, ("model", "n_test", "top_heads_by_aie", "layer", "cosine_fv_vs_diff_of_means"), run / "summary.json")
    if not (run / "tensors.safetensors").is_file():
        raise RunFormatError(f"missing results file: {run / 'tensors.safetensors'}")
    t, meta = load_tensors(run / "tensors.safetensors")
    if "aie_truth_drop" not in t or not isinstance(meta, dict) or "layers" not in meta:
        raise RunFormatError(f"{run}/tensors.safetensors lacks aie_truth_drop or its layers: an older version; rerun")
    names = ("fv", "diff_of_means")  # mechlie.causal.function_vectors.VECTOR_NAMES: then the random directions
    layers = list(meta["layers"])
    where = f"{s['model']}, n={s['n_test']} test pairs"
    figs = {
        "aie": figstyle.heatmap(
            t["aie_truth_drop"],
            f"AIE: fall in P(truth), lying mean z into corrupted prompts ({where})",
            colorbar="ΔP",
            zmid=0.0,
        )
    }
    captions = {"aie": "Average indirect effect of each head (Todd et al. 2023), on the training pairs."}
    for name in ("honest_plus", "zero_shot_plus", "lying_minus"):
        key = f"{name}_p_truth"
        if key not in t:
            continue
        per_pair = t[key].float() - t[f"{name}_base_p_truth"].float()[:, None, None]  # [n, v, layer]
        est = bootstrap_tensor(lambda i, d=per_pair: d[i].mean(0), per_pair.shape[0])
        series = {v: (est.mean[j].tolist(), est.lo[j].tolist(), est.hi[j].tolist()) for j, v in enumerate(names)}
        rand = per_pair[:, len(names) :].mean(0)  # [r, layer]: each random direction's mean effect
        if len(rand):
            q = torch.quantile(rand, torch.tensor([0.025, 0.5, 0.975]), dim=0)
            series[f"{len(rand)} random directions (median, 95% range)"] = (q[1].tolist(), q[0].tolist(), q[2].tolist())
        figs[f"{name}_by_layer"] = figstyle.lines_ci(
            layers, series, f"{name}: ΔP(truth) by layer, equal norm ({where})", y_label="ΔP(truth)"
        )
        captions[f"{name}_by_layer"] = (
            "ΔP(truth) when each vector is added (subtracted for lying_minus) at the final position; bands: 95% CI "
            "over test pairs, and the central 95% of random directions."
        )
    top = s["top_heads_by_aie"][:5]
    headline = [
        "- Top heads by AIE: " + ", ".join(f"L{h['layer']}H{h['head']} ({h['truth_drop']:+.3f})" for h in top) + ".",
        f"- cos(FV, diff of means) at layer {s['layer']}: {s['cosine_fv_vs_diff_of_means']:+.3f}.",
    ]
    for name, iv in s.get("interventions_at_layer", {}).items():
        ci = iv.get("delta_p_truth_ci", {})
        if "fv" in ci and "diff_of_means" in ci:
            f, d = ci["fv"], ci["diff_of_means"]
            headline.append(
                f"- {name} at layer {s['layer']}: FV {_fmt(f['mean'], f['lo'], f['hi'], 3)}, "
                f"diff of means {_fmt(d['mean'], d['lo'], d['hi'], 3)}."
            )
    return RunReport("function_vectors", run, f"Function vectors: {where}", headline, figs, captions)


# ---------------------------------------------------------------------------------------------
# steering (analyses/steering_demo.py)


def _est(d: dict) -> tuple[float, float, float]:
    """(mean, lo, hi) of a saved :class:`mechlie.core.stats.Estimate` (``{"mean","lo","hi","n"}``)."""
    return (d["mean"], d["lo"], d["hi"])


def _config(run: Path) -> dict:
    """The run's settings from ``config.json`` (mechlie.core.cli nests them under ``config``), or {}."""
    p = run / "config.json"
    if not p.is_file():
        return {}
    c = _json(p)
    return c.get("config", c) if isinstance(c, dict) else {}


def _setting(st: dict) -> str:
    desc = f"L{st['layer']} " if st.get("layer", -1) >= 0 else ""
    return f"{desc}α={st['alpha']:g}" + (f" {st['param']}" if st.get("param") else "")


@register_kind("steering", detect=summary_kind("steering", "evaluation_on_test", "chosen_on_validation"))
def steering_report(run: Path) -> RunReport:
    s = _json(run / "summary.json")
    _need(s, ("model", "evaluation_on_test", "chosen_on_validation", "best", "baseline"), run / "summary.json")
    sweep = _json(run / "sweep.json")
    _need(sweep, ("sweep",), run / "sweep.json")
    ev = s["evaluation_on_test"]
    if not ev:
        raise RunFormatError(f"{run}/summary.json has no evaluated method: an unfinished run; rerun")
    for r in ev.values():
        _need(r, ("recovered", "kl", "control"), run / "summary.json")
    methods = list(ev)
    n = ev[methods[0]]["recovered"].get("n", "?")
    ds = _config(run).get("dataset", "?")
    where = f"{s['model']}, {ds}, n={n} test facts"
    figs = {
        "steering_recovered": figstyle.bars_ci(
            methods,
            {
                "chosen setting, test (95% CI over facts)": [_est(ev[m]["recovered"]) for m in methods],
                "random draws of the same size (mean, 95% of draws)": [
                    _est(ev[m]["control"]["recovered"]) for m in methods
                ],
            },
            f"Share of the honest−lying P(truth) gap closed on lying prompts ({where})",
            y_label="gap recovered",
            hline=1.0,
            hline_name="honest baseline",
        ),
        "steering_kl": figstyle.bars_ci(
            methods,
            {
                "chosen setting, test": [_est(ev[m]["kl"]) for m in methods],
                "random draws of the same size": [_est(ev[m]["control"]["kl"]) for m in methods],
            },
            f"Side effect: KL(clean ‖ steered) per token on neutral text ({where})",
            y_label="KL (nats)",
        ),
    }
    captions = {
        "steering_recovered": "Each method at its setting chosen on validation facts (KL budget), measured on test "
        "facts: share of the P(truth) gap closed, 95% CI over facts; beside random interventions of the same size.",
        "steering_kl": "The same settings' KL on held-out neutral text, 95% CI; beside the random draws.",
    }
    # Frontier: every validation sweep point, and the evaluated test points with CIs on both axes.
    fig = go.Figure()
    for i, (m, pts) in enumerate(sweep["sweep"].items()):
        if not pts:
            continue
        c = figstyle.COLORS[i % len(figstyle.COLORS)]
        fig.add_trace(
            go.Scatter(
                x=[max(p["kl"], 1e-6) for p in pts],
                y=[p["recovered"] for p in pts],
                mode="markers",
                name=f"{m} (validation sweep)",
                marker={"color": c, "size": 6, "opacity": 0.45},
                text=[_setting(p["setting"]) for p in pts],
            )
        )
        if m in ev:
            r = ev[m]
            kl, rec = _est(r["kl"]), _est(r["recovered"])
            fig.add_trace(
                go.Scatter(
                    x=[max(kl[0], 1e-6)],
                    y=[rec[0]],
                    mode="markers",
                    name=f"{m} chosen, test (95% CI)",
                    marker={"color": c, "size": 12, "symbol": "diamond", "line": {"color": "#222", "width": 1}},
                    error_x={
                        "type": "data",
                        "symmetric": False,
                        "array": [kl[2] - kl[0]],
                        "arrayminus": [kl[0] - kl[1]],
                    },
                    error_y={
                        "type": "data",
                        "symmetric": False,
                        "array": [rec[2] - rec[0]],
                        "arrayminus": [rec[0] - rec[1]],
                    },
                )
            )
    fig.add_hline(y=1.0, line_dash="dash", line_color="#555", annotation_text="honest baseline")
    fig.update_layout(
        xaxis_type="log", xaxis_title="KL per token on neutral text (nats, log)", yaxis_title="gap recovered"
    )
    figs["steering_frontier"] = figstyle.styled(
        fig, f"Honesty recovered vs side effects ({where}; sweep on validation facts, chosen points on test)", width=950
    )
    captions["steering_frontier"] = (
        "Every swept setting on validation facts (small markers) and each method's chosen setting on test facts "
        "(diamonds, 95% CIs on both axes)."
    )
    resid = [p for p in sweep["sweep"].get("resid", []) if p["setting"].get("layer", -1) >= 0]
    if resid:
        layers = sorted({p["setting"]["layer"] for p in resid})
        alphas = sorted({p["setting"]["alpha"] for p in resid})
        grid = torch.full((len(alphas), len(layers)), float("nan"))
        for p in resid:
            grid[alphas.index(p["setting"]["alpha"]), layers.index(p["setting"]["layer"])] = p["recovered"]
        figs["steering_resid_dose"] = figstyle.heatmap(
            grid,
            f"Residual steering on validation facts: gap recovered by layer and α ({s['model']})",
            x_label="layer",
            y_label="α (< 0: toward honesty)",
            colorbar="recovered",
            zmid=0.0,
            x_ticks=[str(l) for l in layers],
            y_ticks=[f"{a:g}" for a in alphas],
            annotate=True,
        )
        captions["steering_resid_dose"] = "Dose-response of the residual difference-of-means vector (validation)."
    b = s["best"]
    headline = [
        f"- Best method ({b.get('chosen_by', 'chosen on test by an older version')}), on test: "
        f"**{b['method']}** ({_setting(b['setting'])}): gap recovered "
        f"{_fmt(*_est(b['recovered']), 3)} at KL {_fmt(*_est(b['kl']), 3)} nats "
        f"(goal: {b.get('goal', '?')}: {'met' if b.get('goal_met') else 'NOT met'})."
    ]
    for m in methods:
        r = ev[m]
        c = r["control"]
        headline.append(
            f"- {m} ({_setting(s['chosen_on_validation'][m]['setting'])}): recovered {_fmt(*_est(r['recovered']), 3)}, "
            f"KL {_fmt(*_est(r['kl']), 3)}; {c.get('n_draws', '?')} random draws: recovered "
            f"{_fmt(*_est(c['recovered']), 3)} (mean, 95% of draws)."
        )
    return RunReport("steering", run, f"Steering: {where}", headline, figs, captions)


# ---------------------------------------------------------------------------------------------
# detection (analyses/detect.py)


@register_kind("detection", detect=summary_kind("detection", "loro", "detector", "key_cells"))
def detection_report(run: Path) -> RunReport:
    s = _json(run / "summary.json")
    _need(s, ("model", "n_pairs", "layer", "loro", "loro_on_policy", "key_cells", "detector"), run / "summary.json")
    mx = _json(run / "matrix.json")
    _need(mx, ("matrix",), run / "matrix.json")
    rels = _config(run).get("relations") or s.get("relations") or "?"
    rels = "+".join(rels) if isinstance(rels, list) else str(rels)
    where = f"{s['model']}, {rels}, n={s['n_pairs']} pairs, layer {s['layer']}"
    figs: dict[str, go.Figure] = {}
    captions: dict[str, str] = {}
    headline: list[str] = []
    # Leave-one-relation-out AUROC per probe, framing vs on-policy labels, with each null's 95th pct.
    probes = sorted(set(s["loro"]) | set(s["loro_on_policy"]))
    if probes:
        series, nulls = {}, {}
        for name, key in (("framing labels", "loro"), ("on-policy labels", "loro_on_policy")):
            d = s[key]
            nan = (float("nan"),) * 3
            series[name] = [(d[p]["mean_auroc"], d[p]["lo"], d[p]["hi"]) if p in d else nan for p in probes]
            nulls[name] = [d.get(p, {}).get("null_shuffled_q95") for p in probes]
        fig = figstyle.bars_ci(
            probes,
            series,
            f"Leave-one-relation-out AUROC of each probe ({where})",
            y_label="AUROC (mean over held-out relations)",
            hline=0.5,
            hline_name="chance",
        )
        for i, (name, vals) in enumerate(nulls.items()):
            if any(v is not None for v in vals):
                figstyle.null_markers(fig, probes, vals, f"{name}: shuffled-label null, 95th pct.", group=i)
        figs["detect_loro"] = fig
        captions["detect_loro"] = (
            "Probes trained on the other relations, tested on the held-out relation's test facts; 95% CI from "
            "the bootstrap over facts; markers: the 95th percentile of the shuffled-label null."
        )
        for p in probes:
            for name, key in (("framing", "loro"), ("on-policy", "loro_on_policy")):
                d = s[key].get(p)
                if d and d.get("mean_auroc") is not None:
                    beats = d.get("null_shuffled_q95") is not None and d["lo"] > d["null_shuffled_q95"]
                    headline.append(
                        f"- {p}, {name} labels, leave-one-relation-out AUROC {_fmt(d['mean_auroc'], d['lo'], d['hi'])}"
                        f" over {d.get('n_relations', '?')} relations; shuffled null 95th pct. "
                        f"{_num(d.get('null_shuffled_q95'))}, random-direction null {_num(d.get('null_random_q95'))}"
                        f" ({'CI above the null' if beats else 'no better than the control'})."
                    )
    # Key transfer cells.
    cells = [(p, c, v) for p, row in s["key_cells"].items() for c, v in row.items() if v.get("auroc") is not None]
    if cells:
        names = [f"{p}: {c}" for p, c, _ in cells]
        fig = figstyle.bars_ci(
            names,
            {"AUROC (95% CI over facts)": [(v["auroc"], v["lo"], v["hi"]) for _, _, v in cells]},
            f"Transfer AUROC, train set → test set ({where})",
            y_label="AUROC",
            hline=0.5,
            hline_name="chance",
        )
        figstyle.null_markers(fig, names, [v.get("null_shuffled_q95") for _, _, v in cells], "shuffled null, 95th pct.")
        figstyle.null_markers(
            fig, names, [v.get("null_random_q95") for _, _, v in cells], "random direction, 95th pct."
        )
        figs["detect_transfer"] = fig
        captions["detect_transfer"] = "Key train → test cells of the generalisation matrix, with both nulls."
    # The generalisation matrix, one heatmap per probe.
    for p, rows in mx["matrix"].items():
        train = list(rows)
        test = sorted({t for r in rows.values() for t in r})
        if not train or not test:
            continue
        grid = [[(rows[a].get(b) or {}).get("auroc") for b in test] for a in train]
        grid = [[float("nan") if v is None else v for v in row] for row in grid]
        figs[f"detect_matrix_{p}"] = figstyle.heatmap(
            grid,
            f"{p}: AUROC, probe trained on row, tested on column ({where})",
            x_label="test set",
            y_label="train set",
            colorbar="AUROC",
            zmid=0.5,
            x_ticks=test,
            y_ticks=train,
            annotate=True,
        )
        captions[f"detect_matrix_{p}"] = f"Generalisation matrix of the {p} probe (held-out facts)."
    # Calibrated detectors: held-out FPR and recall with CIs, at each target FPR.
    same = {k: v for k, v in s["detector"].items() if k != "path"} == {
        k: v for k, v in (s.get("detector_framing") or {}).items() if k != "path"
    }
    if same:  # detect.py saves the framing detector as the main one when on-policy rows were too few
        headline.append("- Too few on-policy rows for an on-policy detector: the main detector is the framing one.")
    for key, label in (("detector", "main"), ("detector_framing", "framing")):
        d = s.get(key)
        if not d or not d.get("calibration") or (same and key == "detector"):
            continue
        cal = d["calibration"]
        targets = sorted(cal, key=lambda t: (float(t.split()[0]), t))  # "0.05", "0.05 (honest-prompt controls only)"
        series = {"held-out false-positive rate": [_est(cal[t]["held_out_fpr"]) for t in targets]}
        for rname in sorted({r for t in targets for r in cal[t].get("recall", {})}):
            nan = (float("nan"),) * 3
            series[f"recall: {rname}"] = [
                _est(cal[t]["recall"][rname]) if rname in cal[t]["recall"] else nan for t in targets
            ]
        fig = figstyle.bars_ci(
            [f"target FPR {t}" for t in targets],
            series,
            f"{label.capitalize()} detector ({d.get('probe', '?')}, {d.get('site', '?')} site, layer "
            f"{d.get('layer', '?')}): calibrated on controls ({s['model']})",
            y_label="rate",
        )
        figs[f"detect_{label}_calibration"] = fig
        captions[f"detect_{label}_calibration"] = (
            "Threshold set on control text at each target false-positive rate; held-out FPR and recall, 95% CIs."
        )
        for t in targets:
            c = cal[t]
            rec = "; ".join(f"recall on {r} {_fmt(*_est(v))}" for r, v in c.get("recall", {}).items())
            headline.append(
                f"- {label} detector at target FPR {t}: held-out FPR {_fmt(*_est(c['held_out_fpr']), 3)}; {rec}."
            )
    lc = s.get("label_counts")
    if lc:
        headline.append("- On-policy label counts: " + ", ".join(f"{k} {v}" for k, v in lc.items()) + ".")
    return RunReport("detection", run, f"Lie detection: {where}", headline, figs, captions)


# ---------------------------------------------------------------------------------------------
# localise (analyses/localise.py)


@register_kind("localise", detect=summary_kind("localise", "topk_restore", "path", "positions"))
def localise_report(run: Path) -> RunReport:
    s = _json(run / "summary.json")
    _need(s, ("model", "n_pairs", "n_test", "topk_restore", "path", "positions"), run / "summary.json")
    ds = _config(run).get("dataset", "?")
    figs: dict[str, go.Figure] = {}
    captions: dict[str, str] = {}
    headline: list[str] = []
    for direction in ("restore", "induce"):
        c = s.get(f"topk_{direction}")
        if not c:
            continue
        _need(c, ("ks", "top", "random_mean", "random_lo", "random_hi", "threshold"), run / "summary.json")
        where = f"{s['model']}, {ds}, n={c.get('n_test_pairs', s['n_test'])} held-out pairs"
        fig = figstyle.lines_ci(
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
        how = "honest into lying" if direction == "restore" else "lying into honest"
        captions[f"localise_topk_{direction}"] = (
            f"{direction}: the top-k heads patched jointly ({how}), beside random k-sets."
        )
        if c.get("minimal_k"):
            lo, hi = c["minimal_k_ci"]
            headline.append(
                f"- {direction}: {c['minimal_k']} heads ({100 * c['minimal_share']:.1f}% of {c['n_heads']}) reach "
                f"{c['threshold']:.0%} of the effect (95% CI of k [{lo:.0f}, {hi:.0f}]); top: "
                + ", ".join(f"L{l}H{h}" for l, h in c["minimal_set"][:8])
                + "."
            )
        else:
            headline.append(f"- {direction}: no top-k set reaches {c['threshold']:.0%} of the effect.")
    p = s["path"]
    tops = p.get("top_senders") or []
    if tops:
        chans = [k for k in tops[0] if k != "sender"]
        r = p["receiver"]
        figs["localise_path_senders"] = figstyle.bars_ci(
            [t["sender"] for t in tops],
            {ch: [(t[ch]["mean"], t[ch]["lo"], t[ch]["hi"]) for t in tops] for ch in chans},
            f"Path patching into L{r[0]}H{r[1]}: top senders by channel ({s['model']}, {ds}, n={p['n_pairs']} pairs)",
            y_label="normalized effect (restore)",
        )
        captions["localise_path_senders"] = "Each sender's effect through the receiver's query, key and value inputs."

        def per_channel(t: dict) -> str:
            return ", ".join(f"{ch} {_fmt(t[ch]['mean'], t[ch]['lo'], t[ch]['hi'])}" for ch in chans)

        headline.append(
            f"- Path patching into L{r[0]}H{r[1]}: top senders "
            + ", ".join(f"{t['sender']} ({per_channel(t)})" for t in tops[:3])
            + "."
        )
    q = s["positions"]
    if q.get("effect"):
        diff = set(q.get("differing_offsets", []))
        labels = [f"{o}{'*' if o in diff else ''}" for o in q["offsets"]]
        r = p["receiver"]
        figs["localise_receiver_positions"] = figstyle.bars_ci(
            labels,
            {"effect (95% CI over pairs)": list(zip(q["effect"], q["lo"], q["hi"]))},
            f"L{r[0]}H{r[1]}'s keys/values from the honest run, one source position at a time "
            f"({s['model']}, {ds}, n={p['n_pairs']} pairs; * = tokens differ)",
            y_label="normalized effect",
        )
        captions["localise_receiver_positions"] = "Which source positions the receiver takes the lie from."
        headline.append(
            f"- Receiver inputs: summed effect {q['sum_effect_differing']:+.3f} at the positions where the prompts "
            f"differ vs {q['sum_effect_other']:+.3f} elsewhere; attention on differing positions "
            f"{q['attention_on_differing']:.2f}."
        )
    return RunReport("localise", run, f"Localise: {s['model']}, {ds}, n={s['n_pairs']} pairs", headline, figs, captions)
