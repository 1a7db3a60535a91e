"""Figures, headline and printed report of a detection run (:mod:`mechlie.studies.detection`),
drawn from its saved ``summary.json``, ``matrix.json`` and ``curves.json`` only."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import plotly.graph_objects as go


def _num(x, p: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{p}f}"  # JSON stores NaN as null


def _fmt(m: float, lo: float, hi: float, p: int = 2) -> str:
    return f"{m:.{p}f} [{lo:.{p}f}, {hi:.{p}f}]"


def _est(d: dict) -> tuple[float, float, float]:
    return (d["mean"], d["lo"], d["hi"])


def _probes(s: dict) -> list[str]:
    return sorted(set(s["loro"]) | set(s["loro_on_policy"]))


def _same_detectors(s: dict) -> bool:
    """detect saves the framing detector as the main one when on-policy rows were too few."""
    strip = lambda d: {k: v for k, v in (d or {}).items() if k != "path"}  # noqa: E731
    return strip(s["detector"]) == strip(s.get("detector_framing"))


def _targets(cal: dict) -> list[str]:
    return sorted(cal, key=lambda t: (float(t.split()[0]), t))  # "0.05", "0.05 (honest-prompt controls only)"


def figures(s: dict, mx: dict, curves: dict, where: str) -> dict[str, go.Figure]:
    figs = {}
    figs.update(_loro_figure(s, where))
    figs.update(_transfer_figures(s, mx, where))
    figs.update(_calibration_figures(s))
    figs.update(_curve_figures(curves))
    figs.update(_apollo_figures(s))
    return figs


def _apollo_rows(ap: dict) -> dict[str, dict]:
    """Apollo's rows: every label kind x reading, then the surprisal baseline (``vs_controls``, ``mixed_facts``)."""
    rows = dict(ap.get("detectors") or {})
    if ap.get("surprisal"):
        rows["surprisal baseline (no training)"] = ap["surprisal"]
    return rows


def _pct(fpr: float) -> str:
    return f"{100 * fpr:g}%"


def _apollo_figures(s: dict) -> dict[str, go.Figure]:
    """Apollo's protocol: recall at the target FPR and AUROC against each control set, with CIs."""
    from mechlie.report import figures as figlib

    ap = s.get("apollo") or {}
    rows = _apollo_rows(ap)
    if not rows:
        return {}
    names = list(rows)
    sets = ["in-format", "own honest answers", "benign requests", "neutral text"]
    nan = (float("nan"),) * 3
    figs = {}
    for key, metric, label in (("recall", "recall", f"recall at {_pct(ap['fpr'])} FPR"), ("auroc", "auroc", "AUROC")):
        series = {
            f"vs {c}": [_est(r["vs_controls"][c][metric]) if r["vs_controls"].get(c) else nan for r in rows.values()]
            for c in sets
        }
        if key == "auroc":
            series["mixed facts: lies vs truths"] = [
                (m["auroc"], m["lo"], m["hi"]) if (m := r.get("mixed_facts")) else nan for r in rows.values()
            ]
        figs[f"detect_apollo_{key}"] = figlib.bars_ci(
            names,
            series,
            f"Apollo's protocol: {label}, test lies against each control set ({s['model']})",
            y_label=label,
            hline=0.5 if key == "auroc" else None,
            hline_name="chance" if key == "auroc" else "",
        )
    return figs


def _loro_figure(s: dict, where: str) -> dict[str, go.Figure]:
    """Leave-one-relation-out AUROC per probe, framing vs on-policy labels, with each null's 95th pct."""
    from mechlie.report import figures as figlib

    probes = _probes(s)
    if not probes:
        return {}
    series, nulls = {}, {}
    for name, key in (("framing labels", "loro"), ("on-policy labels", "loro_on_policy")):
        d = s[key]
        nan = (float("nan"),) * 3
        series[name] = [(d[p]["mean_auroc"], d[p]["lo"], d[p]["hi"]) if p in d else nan for p in probes]
        nulls[name] = [d.get(p, {}).get("null_shuffled_q95") for p in probes]
    fig = figlib.bars_ci(
        probes,
        series,
        f"Leave-one-relation-out AUROC of each probe ({where})",
        y_label="AUROC (mean over held-out relations)",
        hline=0.5,
        hline_name="chance",
    )
    for i, (name, vals) in enumerate(nulls.items()):
        if any(v is not None for v in vals):
            figlib.null_markers(fig, probes, vals, f"{name}: shuffled-label null, 95th pct.", group=i)
    return {"detect_loro": fig}


def _transfer_figures(s: dict, mx: dict, where: str) -> dict[str, go.Figure]:
    """The key transfer cells with both nulls, and the generalisation matrix, one heatmap per probe."""
    from mechlie.report import figures as figlib

    figs = {}
    cells = [(p, c, v) for p, row in s["key_cells"].items() for c, v in row.items() if v.get("auroc") is not None]
    if cells:
        names = [f"{p}: {c}" for p, c, _ in cells]
        fig = figlib.bars_ci(
            names,
            {"AUROC (95% CI over facts)": [(v["auroc"], v["lo"], v["hi"]) for _, _, v in cells]},
            f"Transfer AUROC, train set → test set ({where})",
            y_label="AUROC",
            hline=0.5,
            hline_name="chance",
        )
        figlib.null_markers(fig, names, [v.get("null_shuffled_q95") for _, _, v in cells], "shuffled null, 95th pct.")
        figlib.null_markers(fig, names, [v.get("null_random_q95") for _, _, v in cells], "random direction, 95th pct.")
        figs["detect_transfer"] = fig
    for p, rows in mx["matrix"].items():
        train = list(rows)
        test = sorted({t for r in rows.values() for t in r})
        if not train or not test:
            continue
        grid = [[(rows[a].get(b) or {}).get("auroc") for b in test] for a in train]
        grid = [[float("nan") if v is None else v for v in row] for row in grid]
        figs[f"detect_matrix_{p}"] = figlib.heatmap(
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
    return figs


def _calibration_figures(s: dict) -> dict[str, go.Figure]:
    """Calibrated detectors: held-out FPR and recall with CIs, at each target FPR."""
    from mechlie.report import figures as figlib

    figs = {}
    same = _same_detectors(s)
    for key, label in (("detector", "main"), ("detector_framing", "framing")):
        d = s.get(key)
        if not d or not d.get("calibration") or (same and key == "detector"):
            continue
        cal = d["calibration"]
        targets = _targets(cal)
        series = {"held-out false-positive rate": [_est(cal[t]["held_out_fpr"]) for t in targets]}
        for rname in sorted({r for t in targets for r in cal[t].get("recall", {})}):
            nan = (float("nan"),) * 3
            series[f"recall: {rname}"] = [
                _est(cal[t]["recall"][rname]) if rname in cal[t]["recall"] else nan for t in targets
            ]
        figs[f"detect_{label}_calibration"] = figlib.bars_ci(
            [f"target FPR {t}" for t in targets],
            series,
            f"{label.capitalize()} detector ({d.get('probe', '?')}, {d.get('site', '?')} site, layer "
            f"{d.get('layer', '?')}): calibrated on controls ({s['model']})",
            y_label="rate",
        )
    return figs


def _curve_figures(curves: dict) -> dict[str, go.Figure]:
    """Per-token detector scores along generated answers, and the pooled LORO ROCs (curves.json)."""
    import plotly.graph_objects as go

    from mechlie.report import figures as figlib

    figs = {}
    tok = curves.get("token_scores")
    if tok and tok.get("traces"):
        width = max(len(v) for v in tok["traces"].values())
        traces = {k: v + [float("nan")] * (width - len(v)) for k, v in tok["traces"].items()}
        fig = figlib.lines(
            range(width),
            traces,
            f"Detector score per generated token (lying prompts; {tok['site']} site, threshold {tok['threshold']:.2f})",
            x_label="generated token (0 = chosen at the final prompt token)",
            y_label="score",
        )
        fig.add_hline(y=tok["threshold"], line_dash="dash", line_color="#555", annotation_text="threshold")
        figs["detect_token_scores"] = fig
    if curves.get("roc"):
        fig = go.Figure([go.Scatter(x=r["fpr"], y=r["tpr"], mode="lines", name=k) for k, r in curves["roc"].items()])
        fig.add_trace(
            go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dash", "color": "#999"}, name="chance")
        )
        fig.update_layout(xaxis_title="false-positive rate", yaxis_title="true-positive rate")
        figs["detect_roc"] = figlib.styled(
            fig, "ROC on held-out relations (LORO, scores z-scored per relation)", width=700, height=600
        )
    return figs


def captions(s: dict, mx: dict) -> dict[str, str]:
    out = {
        "detect_loro": (
            "Probes trained on the other relations, tested on the held-out relation's test facts; 95% CI from "
            "the bootstrap over facts; markers: the 95th percentile of the shuffled-label null."
        ),
        "detect_transfer": "Key train → test cells of the generalisation matrix, with both nulls.",
        "detect_token_scores": "The main detector's score at each generated token of a few test lying prompts.",
        "detect_roc": "Pooled ROC of each probe on held-out relations, scores z-scored per relation.",
    }
    for p in mx["matrix"]:
        out[f"detect_matrix_{p}"] = f"Generalisation matrix of the {p} probe (held-out facts)."
    out["detect_apollo_recall"] = (
        "Apollo's protocol: threshold at the controls' 1 - FPR quantile (target FPR), recall on the test facts' lies; "
        "95% CIs resample facts and control units (threshold recomputed per draw). "
        "Surprisal: -log P(answer), no training."
    )
    out["detect_apollo_auroc"] = (
        "AUROC of test lies against each control set, and of lies vs truths on facts with both (mixed facts); 95% CIs."
    )
    for label in ("main", "framing"):
        out[f"detect_{label}_calibration"] = (
            "Threshold set on control text at each target false-positive rate; held-out FPR and recall, 95% CIs."
        )
    return out


def headline(s: dict) -> list[str]:
    """Markdown lines from ``summary.json`` only: first the Apollo-protocol detector (recall at 1% FPR
    on in-format controls) and the surprisal baseline, then LORO per probe and label kind (on-policy
    first, logistic first), each detector at each target FPR, the on-policy label counts. The on-policy
    read layer's choice (with its CI) follows the surprisal baseline when the summary has it."""
    lines: list[str] = _apollo_headline(s.get("apollo") or {}) + _surprisal_lines(s, "- ") + layer_scan_lines(s)
    probes = sorted(_probes(s), key=lambda p: p != "logistic")
    for p in probes:
        for name, key in (("on-policy", "loro_on_policy"), ("framing", "loro")):
            d = s[key].get(p)
            if d and d.get("mean_auroc") is not None:
                beats = d.get("null_shuffled_q95") is not None and d["lo"] > d["null_shuffled_q95"]
                lines.append(
                    f"- {p}, {name} labels, leave-one-relation-out AUROC {_fmt(d['mean_auroc'], d['lo'], d['hi'])}"
                    f" over {d.get('n_relations', '?')} relations; shuffled null 95th pct. "
                    f"{_num(d.get('null_shuffled_q95'))}, random-direction null {_num(d.get('null_random_q95'))}"
                    f" ({'CI above the null' if beats else 'no better than the control'})."
                )
    same = _same_detectors(s)
    if same:
        lines.append("- Too few on-policy rows for an on-policy detector: the main detector is the framing one.")
    for key, label in (("detector", "main"), ("detector_framing", "framing")):
        d = s.get(key)
        if not d or not d.get("calibration") or (same and key == "detector"):
            continue
        cal = d["calibration"]
        for t in _targets(cal):
            c = cal[t]
            rec = "; ".join(f"recall on {r} {_fmt(*_est(v))}" for r, v in c.get("recall", {}).items())
            lines.append(
                f"- {label} detector at target FPR {t}: held-out FPR {_fmt(*_est(c['held_out_fpr']), 3)}; {rec}."
            )
    lc = s.get("label_counts")
    if lc:
        lines.append("- On-policy label counts: " + ", ".join(f"{k} {v}" for k, v in lc.items()) + ".")
    return lines


# ---------------------------------------------------------------------------------------------
# what the script prints


def _f(x, p: int = 2) -> str:
    return f"{float('nan') if x is None else x:.{p}f}"  # NaN as the script printed it (JSON stores null)


def report_text(s: dict, mx: dict) -> str:
    """What ``analyses/detect.py`` prints: layers, label counts, LORO, the matrix, the key cells,
    the detectors and the timings."""
    ly = s["layers"]
    out = [
        f"\nlayer used: {s['layer']} ({s['layer_rule']} rule)",
        f"  framing rule: layer {ly['framing']['layer']} (validation AUROC {_f(s['val_auroc_layer']['framing'], 3)})",
        f"  on-policy rule: layer {ly['on-policy']['layer']} (validation AUROC "
        f"{_f(s['val_auroc_layer']['on-policy'], 3)}; {ly['on-policy']['rule']})",
        *layer_scan_lines(s, "  "),
        f"label counts (all relations): {s['label_counts']}",
    ]
    out += [f"  {r}: {c}" for r, c in s["label_counts_per_relation"].items()]
    out += _layer_scan_text(s)
    for name, key in (("framing", "loro"), ("on-policy", "loro_on_policy")):
        out.append(
            f"\nLeave-one-relation-out transfer, {name} labels (mean over held-out relations, each scored on all its"
            " facts; 95% CI over relations, then over facts; nulls: 95th pct. of the per-draw mean over relations):"
        )
        out.append(
            f"{'probe':<14} {'AUROC [CI relations]':>22} {'[CI facts]':>16} {'shuffled q95':>13} {'random q95':>11} "
            f"{'relations':>10}"
        )
        for k, v in s[key].items():
            ci = f"{v['mean_auroc']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
            ci_f = f"[{_f(v.get('lo_facts'), 3)}, {_f(v.get('hi_facts'), 3)}]"
            out.append(
                f"{k:<14} {ci:>22} {ci_f:>16} {_f(v['null_shuffled_q95'], 3):>13} {_f(v['null_random_q95'], 3):>11} "
                f"{v['n_relations']:>10}"
            )
    out += _matrix_text(mx["matrix"])
    for title, cells in (
        (f"layer {s['layer']}", s["key_cells"]),
        (f"layer {s['key_cells_other_layer']['layer']}", s["key_cells_other_layer"]["cells"]),
    ):
        out.append(
            f"\nframing vs on-policy labels, known filter, {title} (AUROC [95% CI]; shuffled / random null q95):"
        )
        for k, kc in cells.items():
            for name, c in kc.items():
                ci = f"{_f(c['auroc'], 3)} [{_f(c['lo'], 3)}, {_f(c['hi'], 3)}]"
                nulls = f"{_f(c['null_shuffled_q95'], 3)} / {_f(c['null_random_q95'], 3)}"
                out.append(f"  {k:<14} {name:<36} {ci}  {nulls}  (n facts {c['n_target_facts']})")
    out += _surprisal_lines(s, "  ")
    out += _detector_text(s)
    out += _apollo_text(s.get("apollo") or {})
    for name, g in (s.get("grad_features") or {}).items():
        out.append(f"grad features, {name}: LORO mean AUROC {_f(g['loro_mean_auroc'], 3)}")
    out.append(f"time: {s['time_s']}")
    return "\n".join(out)


def _matrix_text(matrix: dict) -> list[str]:
    out = []
    for k, rows in matrix.items():
        test_names = list(dict.fromkeys(t for r in rows.values() for t in r))
        out.append(f"\n{k}: AUROC, rows = train set, columns = test set")
        out.append(" " * 22 + " ".join(f"{c[:9]:>9}" for c in test_names))
        for a, row in rows.items():
            out.append(f"{a[:21]:<22}" + " ".join(f"{_f(row[c]['auroc']):>9}" for c in test_names))
    return out


def _detector_text(s: dict) -> list[str]:
    out = []
    for key in ("detector", "detector_framing"):
        d = s[key]
        out.append(f"\n{key} ({d['probe']}, layer {d['layer']}, {d['site']} site, {d['n_controls']} controls):")
        for fpr, cal in d["calibration"].items():
            h = cal["held_out_fpr"]
            out.append(
                f"  target FPR {fpr}: threshold {cal['threshold']:.3f} on {cal['n_calibration']} controls; "
                f"held-out FPR {h['mean']:.3f} [{h['lo']:.3f}, {h['hi']:.3f}] on {cal['n_held_out']}"
            )
            for name, r in cal["recall"].items():
                ci = f"{_f(r['mean'], 3)} [{_f(r['lo'], 3)}, {_f(r['hi'], 3)}]"
                out.append(f"    recall, {name}: {ci} (n facts {r['n']})")
    return out


def _cell(d: dict | None, key: str, p: int = 3) -> str:
    """``mean [lo, hi]`` of ``d[key]`` (an Estimate dict) or of ``d`` itself (``{key: mean, lo, hi}``)."""
    if not d:
        return "n/a"
    e = d[key] if isinstance(d.get(key), dict) else {"mean": d[key], "lo": d["lo"], "hi": d["hi"]}
    return f"{_f(e['mean'], p)} [{_f(e['lo'], p)}, {_f(e['hi'], p)}]"


def _apollo_headline(ap: dict) -> list[str]:
    main = ap.get("main")
    rows = _apollo_rows(ap)
    if not main or main not in rows:
        return []
    pct, d, sur = _pct(ap["fpr"]), rows[main]["vs_controls"], (ap.get("surprisal") or {}).get("vs_controls") or {}
    return [
        f"- Apollo detector ({main}), in-relation (held-out facts of the fitted relations): recall at {pct} FPR "
        f"on in-format controls {_cell(d['in-format'], 'recall', 2)} "
        f"(surprisal baseline {_cell(sur.get('in-format'), 'recall', 2)}); AUROC vs in-format controls "
        f"{_cell(d['in-format'], 'auroc', 2)} (surprisal {_cell(sur.get('in-format'), 'auroc', 2)}); mixed facts "
        f"{_cell(rows[main].get('mixed_facts'), 'auroc', 2)} (surprisal "
        f"{_cell((ap.get('surprisal') or {}).get('mixed_facts'), 'auroc', 2)})."
    ]


def _apollo_text(ap: dict) -> list[str]:
    """Apollo's table, and the script's one-line answer for its main detector (and the surprisal baseline)."""
    rows = _apollo_rows(ap)
    if not rows:
        return [f"\nApollo's protocol: no detector ({ap.get('skipped', 'no rows')})"] if ap else []
    pct = _pct(ap["fpr"])
    out = [
        f"\nApollo's protocol (layers {ap['layers']}, {ap['probe']}; controls {ap['n_controls']}; "
        f"{ap['n_test_lies']} test lies; in-relation: held-out facts of the fitted relations). Recall at {pct} FPR "
        "/ AUROC, 95% CI over facts and control units:"
    ]
    for name, r in rows.items():
        out.append(f"  {name}:")
        for c, v in r["vs_controls"].items():
            out.append(f"    vs {c:<20} recall {_cell(v, 'recall')}  AUROC {_cell(v, 'auroc')}")
        out.append(
            f"    lies vs truths (same lying prompts) AUROC: mixed facts {_cell(r.get('mixed_facts'), 'auroc')}, "
            f"all test facts {_cell(r.get('lies_vs_truths'), 'auroc')}"
        )
        out.append(f"    greedy lies only, vs in-format: recall {_cell(r.get('greedy_lies_vs_in_format'), 'recall')}")
    main = ap.get("main")
    if main:
        out.append(
            f"apollo detector: {main}, saved at {ap['path']}; score() vs its calibration scores: max |diff| "
            f"{_f(ap['score_check_max_abs_diff'], 6)} on {ap['score_check_n']} control prompts"
        )
        out.append(
            f"recall at {pct} FPR (in-format controls): {_cell(rows[main]['vs_controls']['in-format'], 'recall')}"
            " - in-relation: held-out facts of the relations the detector was fit on"
        )
    sur = (ap.get("surprisal") or {}).get("vs_controls") or {}
    if sur.get("in-format"):
        out.append(f"recall at {pct} FPR (in-format controls), surprisal baseline: {_cell(sur['in-format'], 'recall')}")
    return out


def _surprisal_lines(s: dict, lead: str) -> list[str]:
    """The surprisal baseline (no training) on the on-policy test rows (sampled lies vs truths of the test
    facts' lying prompts), beside the on-policy AUROCs: all test facts, and the mixed-facts cell."""
    sur = (s.get("apollo") or {}).get("surprisal")
    if not sur or not sur.get("lies_vs_truths"):
        return []
    return [
        f"{lead}surprisal baseline (-log P of the answer, no training), on-policy test rows (lies vs truths): "
        f"AUROC {_cell(sur['lies_vs_truths'], 'auroc')} over {sur['lies_vs_truths']['n_facts']} facts; "
        f"mixed facts {_cell(sur.get('mixed_facts'), 'auroc')}."
    ]


def _layer_ranges(layers: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def layer_scan_lines(s: dict, lead: str = "- ") -> list[str]:
    """One plain line on how the on-policy read layer was chosen (``summary["layer_scan"]``, from
    :func:`mechlie.studies.detection_steps.layer_scan`); none for a summary saved before it existed."""
    sc = s.get("layer_scan")
    if not sc:
        return []
    if sc.get("layer") is None:
        return [
            f"{lead}On-policy read layer: no layer scan ({sc.get('fallback', '?')}); the framing layer "
            f"{sc.get('framing_layer', '?')} is used."
        ]
    c, n = sc["layer"], sc["n_seeds"]
    m, sd, lo, hi = sc["mean"][c], sc["sd"][c], sc["lo"][c], sc["hi"][c]
    ov = sc["overlapping"]
    verdict = (
        f"the CIs of {len(ov)} other layers ({_layer_ranges(ov)}) overlap it, so this is a noise-level choice"
        if ov
        else "no other layer's CI overlaps it"
    )
    dom = sc.get("diff_of_means_layer")
    return [
        f"{lead}On-policy read layer {c}, chosen on validation facts of the training split with the reported "
        f"probe ({sc['fit']}), mean over {n} split seeds: validation AUROC {m:.2f} ± {_num(sd)} (SD over seeds), "
        f"95% CI [{lo:.2f}, {hi:.2f}] over {sc['n_val_facts']} validation facts pooled over seeds; {verdict} "
        f"(best layer in {100 * sc['p_best']:.0f}% of bootstrap draws)"
        + (f"; difference of means would choose layer {dom}." if dom is not None else ".")
    ]


def _layer_scan_text(s: dict) -> list[str]:
    """Per-layer table of the layer scan for the printed report (none for an older summary)."""
    sc = s.get("layer_scan")
    if not sc or sc.get("layer") is None:
        return []
    out = [
        f"\nlayer scan ({sc['fit']}, on-policy labels, {sc['n_seeds']} split seeds {sc['seeds']}; "
        f"95% CI over {sc['ci_over']}):",
        f"{'layer':>5} {'mean':>6} {'SD':>6} {'95% CI':>16}",
    ]
    for i, (m, sd, lo, hi) in enumerate(zip(sc["mean"], sc["sd"], sc["lo"], sc["hi"])):
        mark = " <- chosen" if i == sc["layer"] else (" overlaps" if i in sc["overlapping"] else "")
        out.append(f"{i:>5} {_f(m, 3):>6} {_f(sd, 3):>6} {'[' + _f(lo, 3) + ', ' + _f(hi, 3) + ']':>16}{mark}")
    return out
