"""Figures and the printed report of an SAE-features run (:mod:`mechlie.studies.sae_features`),
drawn from its saved ``summary.json`` and ``features.safetensors`` only."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from torch import Tensor


LABEL_SWAPS = "95% null of the max |difference| (label swaps)"


def _tri(d: dict) -> tuple[float, float, float]:
    return (d["mean"], d["lo"], d["hi"])


def site_figures(model: str, site: str, tag: str, r: dict, t: dict[str, Tensor] | None) -> dict[str, go.Figure]:
    """One site: its top features (CIs, null of the max), every feature's decoder cosine, the
    causal checks beside random matched features, and the on-policy decompositions."""
    import plotly.graph_objects as go

    from mechlie.report import figures as figlib

    where = f"{model}, {site}, n={r['n_test']} held-out pairs"
    figs = {
        f"{tag}_features": _feature_bars(
            r["features"], "f(lying) − f(honest)", f"SAE features of the lie direction ({where})", r, LABEL_SWAPS
        )
    }
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
        figs[f"{tag}_cosine"] = figlib.styled(
            fig, f"Decoder cosine with the lie direction vs. activation difference ({model}, {site})"
        )
    for mode, c in r["causal"].items():
        name = f"{len(c['random_deltas'])} random matched sets"
        fig = go.Figure(go.Histogram(x=c["random_deltas"], name=name, marker_color="#999", nbinsx=30))
        fig.add_vline(x=c["delta"], line_color=figlib.COLORS[1], line_width=2)
        fig.add_vrect(x0=c["delta_lo"], x1=c["delta_hi"], fillcolor=figlib.COLORS[1], opacity=0.15, line_width=0)
        fig.update_layout(xaxis_title="ΔP(truth) on lying prompts", yaxis_title="random draws", showlegend=True)
        figs[f"{tag}_causal_{mode}"] = figlib.styled(
            fig, f"{mode.capitalize()} top features vs. matched random features ({where})"
        )
    figs.update(_on_policy_figures(model, site, tag, r.get("on_policy")))
    return figs


def _on_policy_figures(model: str, site: str, tag: str, op: dict | None) -> dict[str, go.Figure]:
    if not op or not op.get("features"):
        return {}
    n = op["n_test"]
    figs = {}
    for name, feats, series, title, null_name in (
        (
            "on_policy",
            op["features"],
            "f(lie) − f(truth)",
            f"SAE features of on-policy lies vs truths, same lying prompts ({model}, {site}, n={n} held-out pairs)",
            LABEL_SWAPS,
        ),
        (
            "framing_on_policy",
            op.get("framing_features") or [],
            "f(lie) − f(truth), on-policy",
            f"The lie direction's (framing) features on on-policy lies vs truths ({model}, {site}, n={n} pairs)",
            "on-policy null of the max",
        ),
    ):
        if feats:
            figs[f"{tag}_{name}"] = _feature_bars(feats, series, title, op, null_name)
    return figs


def _feature_bars(feats: list[dict], series: str, title: str, r: dict, null_name: str) -> go.Figure:
    """Features' activation differences with 95% CIs, beside ``r``'s null of the largest |difference|."""
    from mechlie.report import figures as figlib

    return figlib.bars_ci(
        [f"f{f['feature']}" for f in feats],
        {series: [(f["diff"], f["lo"], f["hi"]) for f in feats]},
        title,
        y_label="activation difference",
        hline=r["null_max_diff"],
        hline_name=null_name,
        symmetric_hline=True,
    )


def head_figures(s: dict) -> dict[str, go.Figure]:
    """The chosen heads' attention on the demonstrations' answers and their DLA, honest vs lying."""
    from mechlie.report import figures as figlib

    heads = s.get("heads")
    if not heads:
        return {}
    rows = heads["rows"]
    names = [row["head"] for row in rows]
    n = rows[0]["n"]
    figs = {}
    for name, key, title, y_label in (
        (
            "heads_demo_attention",
            "share",
            f"Final-token attention on the demonstrations' answers ({s['model']}, n={n} pairs)",
            "share of attention",
        ),
        (
            "heads_dla",
            "dla",
            f"Direct logit attribution, truth − lie, of each head ({s['model']}, n={n} pairs)",
            "logit",
        ),
    ):
        series = {f"{side} prompt": [_tri(row[f"{key}_{side}"]) for row in rows] for side in ("honest", "lying")}
        figs[name] = figlib.bars_ci(names, series, title, y_label=y_label)
    return figs


def captions(s: dict, tag_of: Callable[[str], str]) -> dict[str, str]:
    out = {}
    for site, r in s["sites"].items():
        tag = tag_of(site)
        out[f"{tag}_features"] = (
            f"Top features at {site} chosen on training pairs, mean lying − honest "
            "activation on held-out pairs with 95% bootstrap CIs; dashed: the null of the largest |difference|."
        )
        out[f"{tag}_cosine"] = (
            "Every feature: its honest→lying activation difference and its decoder row's cosine with the "
            "difference-of-means direction."
        )
        for mode in r["causal"]:
            out[f"{tag}_causal_{mode}"] = (
                f"Red: ΔP(truth) when the top features are {mode}d at the final token "
                "(band: 95% CI over pairs); grey: the same for random features of matched mean activation."
            )
        out[f"{tag}_on_policy"] = (
            "Answers sampled under the lying prompt, at the first answer token: lies minus truths, per pair "
            "(means of its samples), features chosen on training pairs, 95% CIs over held-out pairs."
        )
        out[f"{tag}_framing_on_policy"] = (
            "Do the features that separate honest from lying prompts also separate the lies the model "
            "tells from its truths under the same prompt? 95% CIs over held-out pairs."
        )
    out["heads_demo_attention"] = "Share of the final token's attention on the demo answers, 95% CI over pairs."
    out["heads_dla"] = "Each head's direct push toward the truth (positive) or the lie, 95% CI over pairs."
    return out


# ---------------------------------------------------------------------------------------------
# what the script prints


def _site_text(site: str, res: dict) -> list[str]:
    q = res["sae"].get("quality")
    out = [f"\n== {site}: SAE d_sae={res['d_sae']} ({res['sae_path']})"]
    if q:
        out.append(
            f"L0 {q['l0']:.1f}, explained variance {q['explained_variance']:.3f}, CE recovered "
            f"{q['ce_recovered']:.3f} [{q['ce_recovered_lo']:.3f}, {q['ce_recovered_hi']:.3f}] "
            f"(CE clean {q['ce_clean']:.3f}, SAE {q['ce_sae']:.3f}, zero-abl. {q['ce_zero']:.3f}; "
            f"{q['n_lines']} held-out lines)"
        )
    out.append(
        f"top features, lying − honest on {res['n_test']} held-out pairs (null of the max: {res['null_max_diff']:.3f}):"
    )
    for r in res["features"]:
        ctx = r["corpus_contexts"][0]["context"] if r["corpus_contexts"] else ""
        out.append(
            f"  f{r['feature']:<5} {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] d={r['effect_size']:+.2f} "
            f"cos={r['cosine']:+.2f}  {ctx[-60:]!r}"
        )
    for m, c in res["causal"].items():
        out.append(
            f"causal ({m} {list(c['features'])}): ΔP(truth) {c['delta']:+.3f} "
            f"[{c['delta_lo']:+.3f}, {c['delta_hi']:+.3f}] "
            f"vs random matched features 95th pct {c['random_q95']:+.3f} "
            f"(p={c['p_value']:.3f}, {len(c['random_deltas'])} draws)"
        )
    return out


def _on_policy_text(site: str, res: dict) -> list[str]:
    out = [
        f"== {site}: {res['n_lie']} sampled lies, {res['n_truth']} truths; {res['n_pairs_with_both']} pairs with "
        f"both ({res['n_train']} train / {res['n_test']} test)"
    ]
    if "too_few" in res:
        return out + ["  " + res["too_few"]]
    out.append(f"  top features, lie − truth on held-out pairs (null of the max {res['null_max_diff']:.3f}):")
    for r in res["features"]:
        out.append(f"  f{r['feature']:<5} {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] d={r['effect_size']:+.2f}")
    out.append("  the framing (honest vs lying prompt) features on the same answers:")
    for r in res["framing_features"]:
        out.append(f"  f{r['feature']:<5} {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]")
    return out


def report_text(s: dict, cfg: dict, run_dir: Path) -> str:
    """What ``analyses/sae_features.py`` prints: each site's SAE and features, the on-policy
    features, the lying heads, and where the run is."""
    out: list[str] = []
    for site, res in s["sites"].items():
        out += _site_text(site, res)
    on_policy = {site: r["on_policy"] for site, r in s["sites"].items() if "on_policy" in r}
    if on_policy:
        counts = next(iter(on_policy.values())).get("label_counts")
        out.append(f"\nOn-policy answers, lying prompts ({cfg.get('on_policy_k', '?')} samples each): {counts}")
        for site, res in on_policy.items():
            out += _on_policy_text(site, res)
    if s.get("heads"):
        out.append(
            "\nLying heads: final-token attention on the demonstrations' answers, and DLA (truth − lie), "
            f"mean [95% CI] over {s['n_known_pairs']} pairs:"
        )
        out += ["  " + row["verdict"] for row in s["heads"]["rows"]]
    total = s.get("seconds", {}).get("total", "?")
    out.append(f"\ntotal {total} s; figures in {run_dir}; report: python analyses/make_figures.py {run_dir}")
    return "\n".join(out)
