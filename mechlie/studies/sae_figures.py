"""Figures and the printed report of an SAE-features run (:mod:`mechlie.studies.sae_features`),
drawn from its saved ``summary.json`` and ``features.safetensors`` only."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mechlie.sae.seeds import mean_sd_text as _ms

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from torch import Tensor


LABEL_SWAPS = "95% null of the max |difference| (label swaps)"


def _tri(d: dict) -> tuple[float, float, float]:
    return (d["mean"], d["lo"], d["hi"])


def _fmt(m: float, lo: float, hi: float, p: int = 2) -> str:
    return f"{m:.{p}f} [{lo:.{p}f}, {hi:.{p}f}]"


def _auc(d: dict) -> tuple[float, float, float]:
    return (d["auroc"], d["lo"], d["hi"])


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


def seed_figures(model: str, site: str, tag: str, r: dict) -> dict[str, go.Figure]:
    """Every SAE seed at one site: the causal checks (effect, CI, random 95th percentile; Holm-corrected
    p-values in the labels) and the k-sparse SAE probe beside the raw probe (held-out facts and relations)."""
    import plotly.graph_objects as go

    from mechlie.report import figures as figlib

    seeds = list(r["seeds"])
    figs = {}
    modes = sorted({m for x in r["seeds"].values() for m in x["causal"]})
    fig = go.Figure()
    for j, mode in enumerate(modes):
        cs = [(sd, r["seeds"][sd]["causal"][mode]) for sd in seeds if mode in r["seeds"][sd]["causal"]]
        x = [f"seed {sd}<br>p_holm {c['p_holm']:.3f}" for sd, c in cs]
        y = [c["delta"] for _, c in cs]
        err = [c["delta_hi"] - c["delta"] for _, c in cs]
        err_minus = [c["delta"] - c["delta_lo"] for _, c in cs]
        color = figlib.COLORS[j % len(figlib.COLORS)]
        fig.add_bar(
            x=x, y=y, name=f"{mode} top features", marker_color=color,
            error_y={"type": "data", "array": err, "arrayminus": err_minus},
        )  # fmt: skip
        fig.add_scatter(
            x=x, y=[c["random_q95"] for _, c in cs], mode="markers", name=f"{mode}: random 95th pct.",
            marker={"symbol": "line-ew-open", "size": 24, "color": "#555"},
        )  # fmt: skip
    fig.update_layout(yaxis_title="ΔP(truth) on lying prompts", barmode="group")
    figs[f"{tag}_causal_seeds"] = figlib.styled(fig, f"Causal check per SAE seed ({model}, {site}, n={r['n_test']})")
    rows: dict[str, list] = {}
    for sd in seeds:
        folds = r["seeds"][sd]["sparse_probe"]["folds"]
        for name, f in folds.items():
            rows.setdefault(name, []).append((sd, f))
    if rows:
        names = list(rows)
        fig = go.Figure()
        for sd in seeds:
            pts = [next((f for s_, f in rows[n] if s_ == sd), None) for n in names]
            fig.add_bar(
                x=names, y=[p["sae"]["auroc"] if p else None for p in pts], name=f"SAE k-sparse, seed {sd}",
                error_y={"type": "data", "array": [p["sae"]["hi"] - p["sae"]["auroc"] if p else 0 for p in pts],
                         "arrayminus": [p["sae"]["auroc"] - p["sae"]["lo"] if p else 0 for p in pts]},
            )  # fmt: skip
        raw = [rows[n][0][1]["raw"] for n in names]
        fig.add_bar(
            x=names, y=[p["auroc"] for p in raw], name="raw activations", marker_color="#333",
            error_y={"type": "data", "array": [p["hi"] - p["auroc"] for p in raw],
                     "arrayminus": [p["auroc"] - p["lo"] for p in raw]},
        )  # fmt: skip
        fig.add_scatter(
            x=names, y=[rows[n][0][1]["sae"]["null_q95"] for n in names], mode="markers",
            name="permutation null 95th pct. (SAE, first seed)", marker={"symbol": "line-ew-open", "size": 24},
        )  # fmt: skip
        fig.update_layout(yaxis_title="AUROC (lying vs honest prompt)", barmode="group", yaxis_range=[0, 1.05])
        figs[f"{tag}_sparse_probe"] = figlib.styled(
            fig, f"k-sparse SAE probe vs raw-activation probe, held out ({model}, {site})"
        )
    return figs


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
    for site, rr in s["sites"].items():
        tag = tag_of(site)
        r = next(iter(rr["seeds"].values()))  # the first seed's SAE
        out[f"{tag}_causal_seeds"] = (
            "ΔP(truth) when the top features of each SAE seed's SAE are set on held-out lying prompts (95% CI "
            "over pairs); marks: 95th percentile of matched random features; p_holm: Holm-corrected over "
            f"all {s['causal_correction']['n_tests']} causal tests run."
        )
        out[f"{tag}_sparse_probe"] = (
            "AUROC of a logistic probe on the top-k SAE features (k chosen on validation facts) and of one on "
            "the raw activations, on held-out facts and on each held-out relation (loro/...), 95% CIs over facts; "
            "marks: 95th percentile of the label-permutation null."
        )
        out[f"{tag}_features"] = (
            f"First SAE seed. Top features at {site} chosen on training pairs, mean lying − honest "
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
        if "split_seeds" in s:
            from mechlie.studies.sae_splits import caption

            out[f"{tag}_split_seeds"] = caption(s["split_seeds"])
    out["heads_demo_attention"] = "Share of the final token's attention on the demo answers, 95% CI over pairs."
    out["heads_dla"] = "Each head's direct push toward the truth (positive) or the lie, 95% CI over pairs."
    return out


# ---------------------------------------------------------------------------------------------
# the headline


def _verdicts(vs: list[str]) -> str:
    """Per-seed verdicts counted: "raw probe better in 3 of 3 SAE seeds"."""
    counts = {v: vs.count(v) for v in dict.fromkeys(vs)}
    return "; ".join(f"{v} in {n} of {len(vs)} SAE seeds" for v, n in counts.items())


def _causal_lines(r: dict, corr: dict) -> list[str]:
    out = []
    for mode, o in r["over_seeds"]["causal"].items():
        per = []
        for sd, x in r["seeds"].items():
            c = x["causal"].get(mode)
            if c:
                per.append(
                    f"seed {sd}: {_fmt(c['delta'], c['delta_lo'], c['delta_hi'], 3)}, gap share "
                    f"{_fmt(c['gap_recovered'], c['gap_recovered_lo'], c['gap_recovered_hi'])}, p {c['p_value']:.3f} "
                    f"→ Holm {c['p_holm']:.3f}"
                )
        k = len(next(iter(r["seeds"].values()))["causal"][mode]["features"])
        q95 = [x["causal"][mode]["random_q95"] for x in r["seeds"].values() if mode in x["causal"]]
        out.append(
            f"- {mode} {k} top features, in-relation (held-out facts' lying prompts): ΔP(truth) "
            f"{_ms(o['delta'], sign='+')} (matched random features' 95th pct. {sum(q95) / len(q95):+.3f}, mean over "
            f"seeds), share of the honest–lying gap "
            f"{_ms(o['gap_recovered'], 2)} over {o['n_seeds']} SAE seeds; **passes its Holm-corrected test "
            f"(α {corr['alpha']}, {corr['n_tests']} tests) in {o['passes_corrected']} of {o['n_seeds']} seeds** "
            f"(uncorrected p < 0.05 in {o['passes_uncorrected']}). Per seed: " + "; ".join(per) + "."
        )
    return out


def _probe_lines(r: dict) -> list[str]:
    o = r["over_seeds"]
    out = []
    first = next(iter(r["seeds"].values()))["sparse_probe"]
    ho = first["folds"].get("held_out")
    if "probe_held_out" in o and ho:
        p, raw = o["probe_held_out"], ho["raw"]
        out.append(
            f"- Do the features help? k-sparse SAE probe vs raw-activation probe, in-relation, on "
            f"{ho['sae']['n_facts']} held-out facts of the fitted relations: SAE AUROC {_ms(p['sae'])} over seeds "
            f"(first seed {_fmt(*_auc(ho['sae']))}, "
            f"k = {ho['sae']['chosen']}, null 95th pct. {ho['sae']['null_q95']:.2f}); raw "
            f"{_fmt(*_auc(raw))} (C = {raw['chosen']}, null {raw['null_q95']:.2f}); "
            f"SAE − raw {_ms(p['sae_minus_raw'], sign='+')}: {_verdicts(p['verdicts'])}."
        )
    lm = first.get("loro_mean")
    if "probe_loro" in o and lm:
        p = o["probe_loro"]
        out.append(
            f"- Held-out relations (leave one of {lm['n_relations']} out): SAE mean AUROC {_ms(p['sae'])} over seeds "
            f"(first seed {_fmt(*_tri(lm['sae']))}, CI over relations; null {lm['sae']['null_q95_mean']:.2f}), raw "
            f"{_fmt(*_tri(lm['raw']))} (null {lm['raw']['null_q95_mean']:.2f}); SAE − raw "
            f"{_ms(p['sae_minus_raw'], sign='+')}: {_verdicts(p['verdicts'])}."
        )
    return out


def _site_headline(site: str, r: dict, corr: dict) -> list[str]:
    o = r["over_seeds"]
    lines = []
    q = o.get("quality")
    first = next(iter(r["seeds"].values()))
    if q:
        q0 = first["sae"]["quality"]
        lines.append(
            f"- **{site}** (d_sae {r['d_sae']}, {o['n_seeds']} SAE seeds): L0 {_ms(q['l0'], 1)}, explained variance "
            f"{_ms(q['explained_variance'])}, CE loss recovered {_ms(q['ce_recovered'], 2)} (zero-ablation baseline, "
            f"{q0['n_lines']} held-out lines; first seed "
            f"{_fmt(q0['ce_recovered'], q0['ce_recovered_lo'], q0['ce_recovered_hi'])})."
        )
    top = first["features"][0]
    lines.append(
        f"- Top feature (first seed) f{top['feature']}: lying − honest {_fmt(top['diff'], top['lo'], top['hi'], 3)} "
        f"(null of the max {first['null_max_diff']:.3f}), effect size {top['effect_size']:.2f}, decoder cosine "
        f"{top['cosine']:.2f}; the top feature's |effect size| over seeds {_ms(o['top_effect_size'], 2)}."
    )
    op = first.get("on_policy")
    if op:
        counts = f"{op['n_lie']} sampled lies, {op['n_truth']} truths, {op['n_pairs_with_both']} pairs with both"
        if op.get("features"):
            t0 = op["features"][0]
            lines.append(
                f"- On-policy, first seed ({counts}): top feature f{t0['feature']} lie − truth "
                f"{_fmt(t0['diff'], t0['lo'], t0['hi'], 3)} (null of the max {op['null_max_diff']:.3f}, "
                f"{op['n_test']} held-out pairs)."
            )
        else:
            lines.append(f"- On-policy: {counts}; {op.get('too_few', 'no decomposition')}.")
    return lines + _causal_lines(r, corr) + _probe_lines(r)


def headline_lines(s: dict) -> list[str]:
    """The run's headline: the corpus exclusion, then per site the numbers over SAE seeds, the
    corrected causal verdict and the probe comparison; then the heads."""
    lines: list[str] = []
    ex = s.get("corpus_excluded") or {}
    if ex:
        counts = s.get("corpus_counts") or {}
        parts = ", ".join(f"{n} {kind}" for kind, n in counts.items()) if isinstance(counts, dict) else str(counts)
        lines.append(
            f"- SAE corpus: {parts} lines, none from the {s['n_analysed_facts']} analysed facts "
            "(every fact sampled for the study, before the known filter). Excluded: "
            + "; ".join(f"{why}: {n}" for why, n in ex.items() if why != "analysed facts")
            + "."
        )
    corr = s["causal_correction"]
    if corr["min_attainable_p_holm"] >= corr["alpha"]:
        lines.append(
            f"- With {corr['n_draws']} random draws no causal test can pass Holm over {corr['n_tests']} tests "
            f"(smallest attainable {corr['min_attainable_p_holm']:.3f}): raise --n-draws."
        )
    for site, r in s["sites"].items():
        lines += _site_headline(site, r, corr)
    if "split_seeds" in s:
        from mechlie.studies.sae_splits import headline_lines as split_lines

        lines += split_lines(s["split_seeds"])
    heads = s.get("heads")
    if heads:
        for row in heads["rows"]:
            lines.append(
                f"- {row['head']}: attention on demo answers honest {_fmt(*_tri(row['share_honest']))}, lying "
                f"{_fmt(*_tri(row['share_lying']))}; DLA honest {_fmt(*_tri(row['dla_honest']))}, "
                f"lying {_fmt(*_tri(row['dla_lying']))}."
            )
        if heads.get("html"):
            lines.append(f"- circuitsvis attention patterns (honest vs lying): `{heads['html']}` in the run folder")
    return lines


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
            f"[{c['delta_lo']:+.3f}, {c['delta_hi']:+.3f}], gap share {c['gap_recovered']:.2f} "
            f"[{c['gap_recovered_lo']:.2f}, {c['gap_recovered_hi']:.2f}] "
            f"vs random matched features 95th pct {c['random_q95']:+.3f} "
            f"(p={c['p_value']:.3f}, Holm {c['p_holm']:.3f}, {len(c['random_deltas'])} draws)"
        )
    for name, f in res["sparse_probe"]["folds"].items():
        a, b, d = f["sae"], f["raw"], f["sae_minus_raw"]
        out.append(
            f"probe {name}: SAE k={a['chosen']} {_fmt(*_auc(a), 3)} (null {a['null_q95']:.3f})"
            f" | raw C={b['chosen']} {_fmt(*_auc(b), 3)} (null {b['null_q95']:.3f})"
            f" | SAE − raw {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]: {f['verdict']}"
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
    out: list[str] = [
        f"SAE seeds {s['sae_seeds']}; corpus: {s.get('corpus_counts')}, kept out: {s.get('corpus_excluded')}"
    ]
    for site, r in s["sites"].items():
        for sd, res in r["seeds"].items():
            out += _site_text(f"{site} (SAE seed {sd})" if sd != str(s["sae_seeds"][0]) else site, res)
    c = s["causal_correction"]
    out.append(f"\ncausal tests corrected together: {c['method']}, {c['n_tests']} tests, alpha {c['alpha']}")
    out += ["  " + line for line in headline_lines(s) if "Holm-corrected" in line or "Do the features" in line]
    if "split_seeds" in s:
        from mechlie.studies.sae_splits import headline_lines as split_lines

        n = len(s["split_seeds"]["splits"])
        out.append(f"\nover {n} splits of the facts (each split Holm-corrected on its own):")
        out += ["  " + line for line in split_lines(s["split_seeds"])]
    on_policy = {
        site: next(iter(r["seeds"].values()))["on_policy"]
        for site, r in s["sites"].items()
        if "on_policy" in next(iter(r["seeds"].values()))
    }
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
