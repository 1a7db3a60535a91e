"""The summary, headline, report and figures of the generalisation study
(:mod:`mechlie.studies.generalisation`), drawn from its saved files only.

The headline's first line is the leave-one-relation-out AUROC of every model (on-policy labels at the
configured position, the first probe kind), with its CI over facts, its CI over held-out relations and
its bars (both nulls' q95 of the per-draw mean, and the surprisal baseline). The issue's goals are
stated as measured: LORO AUROC >= 0.90 above both nulls, and the probe >= 0.05 above surprisal on mixed
facts (the lower end of the CI over facts of the difference is reported beside it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import plotly.graph_objects as go

UNIT_NAMES = {"relation": "LORO", "setup": "LOSO", "template": "LOTO"}
GOAL_AUROC = 0.90
GOAL_MARGIN = 0.05


def _strip_units(held: dict) -> dict:
    return {k: v for k, v in held.items() if k not in ("units",)} | {"n_skipped": len(held.get("skipped", {}))}


def _setup_rates(lie_rates: dict) -> dict:
    """The lie rate of each setup (sampled answers of known facts; Wilson CI over facts)."""
    out = {}
    for setup, tables in lie_rates.items():
        row = next((r for r in tables["sampled"] if r["relation"] == "all"), None)
        if row:
            keep = ("lie_rate", "lie_rate_lo", "lie_rate_hi", "n_known", "n_answers", "lie", "truth_under_lie_setup")
            out[setup] = {k: row[k] for k in keep} | {"junk": row["junk"], "paraphrase": row["paraphrase"]}
    return out


def summarise(cfg: Any, per_model: dict) -> dict:
    """``summary.json``: per model the lie rates per setup, the pooled matrix cells and the curve points
    (every held-out unit and the per-relation lie rates stay in ``results.json``)."""
    models = {}
    for m, a in per_model.items():
        facts = a["facts"]
        models[m] = {
            "n_relations": sum(1 for v in facts.values() if "used" in v),
            "n_facts": sum(v.get("used", 0) for v in facts.values()),
            "skipped_relations": {r: v["skipped"] for r, v in facts.items() if "skipped" in v},
            "layers_read": a["layers_read"],
            "lie_rates": _setup_rates(a["lie_rates"]),
            "answer_counts": a["answer_counts"],
            "skipped_setups": a["skipped_setups"],
            "matrix": {
                rd: {
                    "rows": e["rows"],
                    **{k: {by: _strip_units(h) for by, h in m_.items()} for k, m_ in e["matrix"].items()},
                }
                for rd, e in a["readings"].items()
            },
            "curve": {k: {axis: c[axis]["points"] for axis in ("relations", "setups")} for k, c in a["curve"].items()},
            "time_s": a.get("time_s", {}),
        }
    any_m = next(iter(per_model.values()))
    return {
        "kind": "generalisation",
        "models": list(per_model),
        "position": cfg.position,
        "probes": list(cfg.probes),
        "n_relations": max(v["n_relations"] for v in models.values()),
        "n_null": cfg.n_null,
        "n_random": cfg.n_random,
        "layers_read": any_m["layers_read"],
        "per_model": models,
        "goals": goals(cfg.position, list(cfg.probes), models),
    }


def _cell(s: dict, model: str, position: str, kind: str, by: str = "relation") -> dict | None:
    return s["per_model"][model]["matrix"].get(f"on-policy/{position}", {}).get(kind, {}).get(by)


def goals(position: str, probes: list[str], models: dict) -> dict:
    """Per model and probe kind: is LORO AUROC >= 0.90 and above both nulls, and is the probe >= 0.05
    above surprisal on mixed facts? Measured values beside each verdict."""
    out = {}
    s = {"per_model": models}
    for m in models:
        for kind in probes:
            c = _cell(s, m, position, kind)
            if not c or not c.get("n_units"):
                out[f"{m} / {kind}"] = {"measured": False}
                continue
            a = c["auroc"]["mean"]
            mixed = c.get("mixed", {}).get("probe_minus_surprisal")
            out[f"{m} / {kind}"] = {
                "loro_auroc": a,
                "above_nulls": c["above_nulls"],
                "auroc_goal_met": a >= GOAL_AUROC and c["above_nulls"],
                "mixed_margin": None if mixed is None else mixed["mean"],
                "mixed_margin_lo": None if mixed is None else mixed["lo"],
                "margin_goal_met": margin_verdict(mixed) == "met",
            }
    return out


def _margin(g: dict) -> dict | None:
    return None if g["mixed_margin"] is None else {"mean": g["mixed_margin"], "lo": g["mixed_margin_lo"]}


def margin_verdict(mixed: dict | None) -> str:
    """The mixed-facts goal: "met" only when the mean margin over surprisal is >= GOAL_MARGIN *and*
    its CI excludes 0; a mean that reaches it with a CI crossing 0 is "not established"."""
    if mixed is None or mixed.get("mean") is None:
        return "not measured"
    if mixed["mean"] < GOAL_MARGIN:
        return "not met"
    return "met" if mixed["lo"] > 0 else "not established"


def _ci(d: dict) -> str:
    return f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def _held(c: dict, unit: str) -> str:
    a = c["auroc"]
    txt = f"{_ci(a)} (CI over facts; over {unit}s [{a['units_lo']:.3f}, {a['units_hi']:.3f}], n={a['n_units']})"
    bars = [
        f"{n} null q95 {c[k]['q95']:.3f}"
        for n, k in (("permutation", "null_permutation"), ("random", "null_random"))
        if k in c
    ]
    if "surprisal" in c:
        bars.append(f"surprisal {c['surprisal']['mean']:.3f}")
    return txt + " vs " + ", ".join(bars)


def headline(s: dict) -> list[str]:
    """Markdown lines; the first is the LORO headline of every model (see the module docstring)."""
    pos, kind = s["position"], s["probes"][0]
    first = []
    for m in s["models"]:
        c = _cell(s, m, pos, kind)
        first.append(f"{m} {_held(c, 'relation')}" if c and c.get("n_units") else f"{m}: not measured")
    lines = [f"- **Leave-one-relation-out AUROC** (on-policy lies, {pos}, {kind}): " + "; ".join(first)]
    for m in s["models"]:
        c = _cell(s, m, pos, kind)
        mixed = (c or {}).get("mixed")
        if mixed:
            d = mixed["probe_minus_surprisal"]
            lines.append(
                f"- {m}, mixed facts ({mixed['n_prompts']} prompts with a sampled lie and a sampled truth): "
                f"probe {_ci(mixed['probe'])}, surprisal {_ci(mixed['surprisal'])}, difference {_ci(d)}"
            )
        for by in ("setup", "template"):
            cc = _cell(s, m, pos, kind, by)
            if cc and cc.get("n_units"):
                lines.append(f"- {m}, leave one {by} out: {_held(cc, by)}")
        rates = s["per_model"][m]["lie_rates"]
        lines.append(
            f"- {m}, lie rates (sampled answers of known facts, Wilson CI): "
            + ", ".join(
                f"{k} {v['lie_rate']:.2f} [{v['lie_rate_lo']:.2f}, {v['lie_rate_hi']:.2f}]" for k, v in rates.items()
            )
        )
        skipped = s["per_model"][m]["skipped_setups"]
        if skipped:
            lines.append(f"- {m}, setups skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    for name, g in s["goals"].items():
        if g.get("measured", True):
            lines.append(
                f"- goal ({name}): LORO >= {GOAL_AUROC} above nulls {'met' if g['auroc_goal_met'] else 'not met'} "
                f"({g['loro_auroc']:.3f}); >= {GOAL_MARGIN} above surprisal on mixed facts "
                f"{margin_verdict(_margin(g))}"
                + (
                    ""
                    if g["mixed_margin"] is None
                    else f" ({g['mixed_margin']:+.3f}, CI low {g['mixed_margin_lo']:+.3f})"
                )
            )
    return lines


def _curve_text(points: list[dict]) -> str:
    return ", ".join(
        f"{p['n']}: {_ci(p['auroc'])} (perm q95 {p.get('null_permutation', {}).get('q95', float('nan')):.3f})"
        for p in points
        if p.get("n_units")
    )


def report_text(s: dict) -> str:
    """What the script prints: the headline, every matrix cell, the curves and the stage times."""
    out = ["", *headline(s), ""]
    for m in s["models"]:
        pm = s["per_model"][m]
        out.append(f"{m}: {pm['n_relations']} relations, {pm['n_facts']} facts, read layers {pm['layers_read']}")
        for rd, e in pm["matrix"].items():
            out.append(f"  {rd} rows {e['rows']}")
            for kind in s["probes"]:
                for by, name in UNIT_NAMES.items():
                    c = e.get(kind, {}).get(by)
                    if c and c.get("n_units"):
                        out.append(f"    {kind:13s} {name}: {_held(c, by)}")
        for kind, cv in pm["curve"].items():
            out.append(f"  curve {kind}, training relations -> held-out AUROC: {_curve_text(cv['relations'])}")
            out.append(f"  curve {kind}, training setups -> held-out AUROC: {_curve_text(cv['setups'])}")
        out.append(f"  time (s): {pm['time_s']}")
    return "\n".join(out)


def captions(s: dict) -> dict[str, str]:
    pos = s["position"]
    out = {
        "lie_rates": "Lie rate per setup (sampled answers to the lying prompts of known facts), "
        "Wilson 95% CI over facts.",
        "curve_relations": f"Held-out AUROC (on-policy, {pos}) against the number of training relations; "
        "95% CI over facts; dashed: permutation-null q95.",
        "curve_setups": f"Held-out AUROC (on-policy, {pos}) against the number of training setups; "
        "95% CI over facts; dashed: permutation-null q95.",
    }
    for m in s["models"]:
        out[f"matrix_{_stem(m)}"] = (
            f"{m}: held-out AUROC per reading and probe, one relation / setup / template held out at a time; "
            "95% CI over facts; markers: permutation-null and random-direction q95."
        )
    return out


def _stem(model: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "_", model).strip("_")


def figures(s: dict, results: dict) -> dict[str, go.Figure]:
    """The matrix of each model, the two curves and the lie rates (plotly, :mod:`mechlie.report.figures`)."""
    from mechlie.report import figures as F

    figs = {}
    cats = list(UNIT_NAMES.values())
    for m in s["models"]:
        series, marks = {}, []
        for rd, e in s["per_model"][m]["matrix"].items():
            for kind in s["probes"]:
                cells = [e.get(kind, {}).get(by) or {} for by in UNIT_NAMES]
                get = lambda c, k: c.get("auroc", {}).get(k, float("nan")) if c.get("n_units") else float("nan")  # noqa: E731
                series[f"{rd} {kind}"] = tuple([get(c, k) for c in cells] for k in ("mean", "lo", "hi"))
                marks.append(
                    {
                        "permutation q95": [c.get("null_permutation", {}).get("q95") for c in cells],
                        "random q95": [c.get("null_random", {}).get("q95") for c in cells],
                        "surprisal": [c.get("surprisal", {}).get("mean") for c in cells],
                    }
                )
        fig = F.errorbars(cats, series, f"{m}: held-out AUROC (relation, setup, template held out)", y_label="AUROC")
        symbols = {"permutation q95": "line-ew-open", "random q95": "x-thin-open", "surprisal": "diamond-open"}
        for i, mk in enumerate(marks):
            for name, values in mk.items():
                if any(v is not None for v in values):
                    F.null_markers(fig, cats, values, name, group=i, symbol=symbols[name])
                    fig.data[-1].showlegend = not any(
                        t.name == name and t.showlegend is not False for t in fig.data[:-1]
                    )
        figs[f"matrix_{_stem(m)}"] = fig
    for axis, label in (("relations", "training relations"), ("setups", "training setups")):
        xs: list[int] = sorted(
            {p["n"] for m in s["models"] for cv in s["per_model"][m]["curve"].values() for p in cv[axis]}
        )
        series = {}
        for m in s["models"]:
            for kind, cv in s["per_model"][m]["curve"].items():
                by_n = {p["n"]: p for p in cv[axis] if p.get("n_units")}
                val = lambda n, k: by_n[n]["auroc"][k] if n in by_n else float("nan")  # noqa: E731
                series[f"{m} {kind}"] = tuple([val(n, k) for n in xs] for k in ("mean", "lo", "hi"))
                null = [
                    by_n[n].get("null_permutation", {}).get("q95", float("nan")) if n in by_n else float("nan")
                    for n in xs
                ]
                series[f"{m} {kind} permutation q95"] = (null, None, None)
        title = f"Held-out AUROC against the number of {label} (on-policy, {s['position']})"
        fig = F.lines_ci(xs, series, title, x_label=label, y_label="held-out AUROC")
        figs[f"curve_{axis}"] = fig.update_xaxes(type="log", tickvals=xs) if axis == "relations" else fig
    setups = list(dict.fromkeys(k for m in s["models"] for k in s["per_model"][m]["lie_rates"]))
    rates = {
        m: tuple(
            [s["per_model"][m]["lie_rates"].get(st, {}).get(k, float("nan")) for st in setups]
            for k in ("lie_rate", "lie_rate_lo", "lie_rate_hi")
        )
        for m in s["models"]
    }
    figs["lie_rates"] = F.errorbars(
        setups, rates, "Lie rate per setup (sampled answers, known facts)", y_label="lie rate"
    )
    return figs
