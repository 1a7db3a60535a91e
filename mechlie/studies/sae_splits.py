"""The SAE study's headlines over split seeds (:mod:`mechlie.studies.sae_features`, ``n_split_seeds``).

The main split (``seed``) chooses features and probes on its training facts and reports on its
held-out facts. A split seed ``s`` (``seed + 1``, ..., ``seed + n_split_seeds - 1``) splits the same
known facts again by fact (:func:`mechlie.read.directions.split_by_fact`, ``test_frac``) and reruns,
with the same SAEs, every number that depends on the split:

- the top features, chosen on its training facts, and their lying − honest difference on its held-out facts;
- the causal check (ablate / clamp, :func:`mechlie.sae.lie_features`) on its held-out lying prompts,
  beside ``n_draws`` matched random feature sets drawn with seed ``s``, Holm-corrected over that
  split's own family (every site, SAE seed and mode: the same tests as the main split's family),
  because each split is a replicate of the whole study, not more tests of one hypothesis;
- the k-sparse SAE probe against the raw-activation probe on its held-out facts.

No SAE is retrained: its corpus holds no analysed fact, so it is independent of the split. Not
repeated: the leave-one-relation-out probes (their folds are relations, the same on every split),
the corpus contexts, on-policy features and head views (descriptive, not headline tests).

Over splits (:func:`over_splits`), per site: each number's mean ± SD over every (split, SAE seed)
run, the SD over splits (of each split's mean over SAE seeds) beside the SD over SAE seeds (of each
seed's mean over splits), so the two sources of run-to-run variance are told apart, and how many
runs pass. The main split's entries are its own run's numbers.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from mechlie.sae.seeds import mean_sd_text as _ms

if TYPE_CHECKING:
    import plotly.graph_objects as go

log = logging.getLogger("mechlie")

CAUSAL_KEYS = (
    "features", "delta", "delta_lo", "delta_hi", "gap_recovered", "gap_recovered_lo", "gap_recovered_hi",
    "random_q95", "p_value", "p_holm", "passes_corrected", "n_pairs",
)  # fmt: skip


def compact(res: dict, probe: dict | None) -> dict:
    """One (split, site, SAE seed) run's split-dependent numbers (the random draws' values left out)."""
    top = res["features"][0]
    out: dict = {
        "top_feature": top["feature"],
        "top_diff": [top["diff"], top["lo"], top["hi"]],
        "top_effect_size": top["effect_size"],
        "causal": {m: {k: c[k] for k in CAUSAL_KEYS if k in c} for m, c in res["causal"].items()},
    }
    if probe is not None:
        out["probe"] = {
            "sae": {k: probe["sae"][k] for k in ("auroc", "lo", "hi", "chosen", "null_q95")},
            "raw": {k: probe["raw"][k] for k in ("auroc", "lo", "hi", "chosen", "null_q95")},
            "sae_minus_raw": probe["sae_minus_raw"],
            "verdict": probe["verdict"],
        }
    return out


def main_split(summary: dict) -> dict:
    """The main split's entry, read off the run's own (Holm-corrected) results."""
    sites = {}
    for site, r in summary["sites"].items():
        seeds = {}
        for sd, x in r["seeds"].items():
            seeds[sd] = compact(x, x["sparse_probe"]["folds"].get("held_out"))
        sites[site] = {"n_test": r["n_test"], "seeds": seeds}
    return {"sites": sites, "correction": {k: summary["causal_correction"][k] for k in ("n_tests", "alpha")}}


def one_split(model, cfg, saes, pairs, finals: dict, split_seed: int) -> dict:
    """Every SAE's split-dependent numbers on the split of ``pairs`` by fact with ``split_seed``."""
    from mechlie import sae as S
    from mechlie.read.directions import split_by_fact
    from mechlie.studies.sae_seeds import correct_causal, raw_probes, sparse_probe

    split = split_by_fact([p.fact_id for p in pairs], cfg.test_frac, split_seed)
    sites = list(dict.fromkeys(t.site for _, t in saes))
    raw = raw_probes(pairs, finals, sites, split, cfg.probe_null, split_seed, relations=False)
    prompts = S.lying_prompts(model, [pairs[i] for i in split.test], cfg.batch_size)  # shared by every check
    out: dict = {}
    for seed, trained in saes:
        res, _ = S.lie_features(
            model, trained, pairs, split.train, split.test, k=cfg.k, k_causal=cfg.k_causal,
            n_draws=cfg.n_draws, batch_size=cfg.batch_size, seed=split_seed, n_contexts=0, prompts=prompts,
            final=(finals["honest"][trained.site], finals["lying"][trained.site]),
        )  # fmt: skip
        probe = sparse_probe(trained, pairs, finals, split, raw[trained.site], cfg.probe_null, split_seed, False)
        res["probe"] = probe["folds"].get("held_out")
        entry = out.setdefault(str(trained.site), {"n_test": len(split.test), "seeds": {}})
        entry["seeds"][str(seed)] = res
    # Holm over this split's own family; the entries then keep only their numbers.
    corr = correct_causal(out, cfg.n_draws, cfg.alpha)
    for r in out.values():
        r["seeds"] = {sd: compact(x, x["probe"]) for sd, x in r["seeds"].items()}
    return {"sites": out, "correction": {"n_tests": corr["n_tests"], "alpha": corr["alpha"]}}


def run_splits(model, cfg, saes, pairs, finals: dict, summary: dict) -> dict:
    """The main split and ``cfg.n_split_seeds - 1`` more (see the module docstring), with :func:`over_splits`."""
    splits = {str(cfg.seed): main_split(summary)}
    for s in range(cfg.seed + 1, cfg.seed + cfg.n_split_seeds):
        t0 = time.time()
        splits[str(s)] = one_split(model, cfg, saes, pairs, finals, s)
        splits[str(s)]["seconds"] = round(time.time() - t0, 1)
        log.info("SAE split seed %d in %.1f s", s, time.time() - t0)
    return {"main": cfg.seed, "splits": splits, "over": over_splits(splits)}


def _mean_sd_of_means(groups: dict[str, list[float]]) -> dict:
    from mechlie.sae.seeds import mean_sd

    return mean_sd([sum(v) / len(v) for v in groups.values()])


def _spread(values: dict[tuple[str, str], float]) -> dict:
    """Mean ± SD over every (split, SAE seed) value, the SD over splits and the SD over SAE seeds."""
    from mechlie.sae.seeds import mean_sd

    by_split: dict[str, list[float]] = {}
    by_seed: dict[str, list[float]] = {}
    for (split, seed), v in values.items():
        by_split.setdefault(split, []).append(v)
        by_seed.setdefault(seed, []).append(v)
    out = mean_sd(list(values.values()))
    out["sd_over_splits"] = _mean_sd_of_means(by_split)["sd"]
    out["sd_over_sae_seeds"] = _mean_sd_of_means(by_seed)["sd"]
    out["n_splits"], out["n_sae_seeds"] = len(by_split), len(by_seed)
    return out


def site_order(splits: dict) -> list[str]:
    """Every site, in the order the runs first name them (the config's order)."""
    return list(dict.fromkeys(site for r in splits.values() for site in r["sites"]))


def site_runs(splits: dict, site: str) -> list[tuple[str, str, dict]]:
    """``(split, SAE seed, entry)`` of every run at ``site``, split-major."""
    return [(sp, sd, x) for sp, r in splits.items() for sd, x in r["sites"].get(site, {"seeds": {}})["seeds"].items()]


def over_splits(splits: dict) -> dict:
    """Per site: every headline number over the (split, SAE seed) runs (:func:`_spread`) and the
    runs that pass, per mode and per split; the probe comparison's verdicts counted."""
    out: dict = {}
    for site in site_order(splits):
        runs = {(split, sd): x for split, sd, x in site_runs(splits, site)}
        o: dict = {
            "n_runs": len(runs),
            "top_effect_size": _spread({k: abs(x["top_effect_size"]) for k, x in runs.items()}),
        }
        o["causal"] = {}
        for mode in sorted({m for x in runs.values() for m in x["causal"]}):
            cs = {k: x["causal"][mode] for k, x in runs.items() if mode in x["causal"]}
            passes: dict[str, list[int]] = {}
            for (split, _), c in cs.items():
                passes.setdefault(split, []).append(int(c["passes_corrected"]))
            o["causal"][mode] = {
                "delta": _spread({k: c["delta"] for k, c in cs.items()}),
                "gap_recovered": _spread({k: c["gap_recovered"] for k, c in cs.items()}),
                "random_q95": _spread({k: c["random_q95"] for k, c in cs.items()}),  # the null, per run
                "passes_corrected": sum(int(c["passes_corrected"]) for c in cs.values()),
                "passes_uncorrected": sum(int(c["p_value"] < 0.05) for c in cs.values()),
                "n_runs": len(cs),
                "passes_per_split": {s: f"{sum(v)}/{len(v)}" for s, v in passes.items()},
            }
        probes = {k: x["probe"] for k, x in runs.items() if "probe" in x}
        if probes:
            raw_per_split = {split: p["raw"]["auroc"] for (split, _), p in probes.items()}
            verdicts = [p["verdict"] for p in probes.values()]
            o["probe_held_out"] = {
                "sae": _spread({k: p["sae"]["auroc"] for k, p in probes.items()}),
                "sae_null_q95": _spread({k: p["sae"]["null_q95"] for k, p in probes.items()}),
                "raw": _mean_sd_of_means({s: [v] for s, v in raw_per_split.items()}),
                "sae_minus_raw": _spread({k: p["sae_minus_raw"]["diff"] for k, p in probes.items()}),
                "verdicts": {v: verdicts.count(v) for v in dict.fromkeys(verdicts)},
                "n_runs": len(probes),
            }
        out[site] = o
    return out


# ---------------------------------------------------------------------------------------------
# the report


def _sds(d: dict, p: int = 3) -> str:
    return f"SD over splits {d['sd_over_splits']:.{p}f}, over SAE seeds {d['sd_over_sae_seeds']:.{p}f}"


def headline_lines(block: dict) -> list[str]:
    """Per site: the causal checks and the probe comparison over split seeds, beside their nulls. All
    are in-relation (held-out facts of the relations the features were chosen on). The numbers over
    runs are recomputed from the per-run entries (:func:`over_splits`), as the stored ``over`` was."""
    splits = block["splits"]
    over = over_splits(splits)
    lines = []
    for site in site_order(splits):
        o = over[site]
        n_sae = o["top_effect_size"]["n_sae_seeds"]
        head = (
            f"- **{site} over {len(splits)} split seeds × {n_sae} SAE seeds**, in-relation (held-out facts of the "
            f"fitted relations; {o['n_runs']} runs, mean ± SD over runs)"
        )
        parts = [f"top feature |effect size| {_ms(o['top_effect_size'], 2)}"]
        for mode, c in o["causal"].items():
            per = ", ".join(f"split {s}: {v}" for s, v in c["passes_per_split"].items())
            parts.append(
                f"{mode}: ΔP(truth) {_ms(c['delta'], sign='+')} ({_sds(c['delta'])}; matched random features' "
                f"95th pct. {_ms(c['random_q95'], sign='+')}), gap share {_ms(c['gap_recovered'], 2)}; **passes its "
                f"split's Holm test in {c['passes_corrected']} of {c['n_runs']} runs** ({per}; uncorrected p < 0.05 "
                f"in {c['passes_uncorrected']})"
            )
        p = o.get("probe_held_out")
        if p:
            verdicts = "; ".join(f"{v} in {n} of {p['n_runs']}" for v, n in p["verdicts"].items())
            parts.append(
                f"held-out facts: SAE probe AUROC {_ms(p['sae'])} (permutation null 95th pct. "
                f"{_ms(p['sae_null_q95'], 2)}), raw {_ms(p['raw'])} (over splits), SAE − raw "
                f"{_ms(p['sae_minus_raw'], sign='+')} ({_sds(p['sae_minus_raw'])}): {verdicts}"
            )
        lines.append(head + ": " + "; ".join(parts) + ".")
    return lines


def _errors(rows: list[dict | None], mid: str, lo: str, hi: str) -> dict:
    """Plotly error bars from ``rows`` (``None``: a run without the number)."""
    return {
        "type": "data",
        "array": [r[hi] - r[mid] if r else 0 for r in rows],
        "arrayminus": [r[mid] - r[lo] if r else 0 for r in rows],
    }


def figures(model: str, block: dict, tag_of) -> dict[str, go.Figure]:
    """Per site: each (split, SAE seed) run's causal effect (CI, Holm verdict) and SAE − raw probe AUROC."""
    from plotly.subplots import make_subplots

    from mechlie.report import figures as figlib

    figs = {}
    for site in site_order(block["splits"]):
        runs = site_runs(block["splits"], site)
        x = [f"split {s}<br>SAE {sd}" for s, sd, _ in runs]
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
        for j, mode in enumerate(sorted({m for *_, r in runs for m in r["causal"]})):
            cs = [r["causal"].get(mode) for *_, r in runs]
            symbols = ["circle" if c and c["passes_corrected"] else "circle-open" for c in cs]
            fig.add_scatter(
                x=x,
                y=[c["gap_recovered"] if c else None for c in cs],
                mode="markers",
                name=f"{mode}: gap share",
                marker={"color": figlib.COLORS[j % len(figlib.COLORS)], "symbol": symbols, "size": 10},
                error_y=_errors(cs, "gap_recovered", "gap_recovered_lo", "gap_recovered_hi"),
            )
        diffs = [r["probe"]["sae_minus_raw"] if "probe" in r else None for *_, r in runs]
        fig.add_scatter(
            x=x,
            y=[d["diff"] if d else None for d in diffs],
            mode="markers",
            name="probe: SAE − raw AUROC",
            marker={"color": "#333"},
            error_y=_errors(diffs, "diff", "lo", "hi"),
            row=2,
            col=1,
        )
        fig.add_hline(y=0, line_dash="dot", line_color="#888")
        fig.update_yaxes(title_text="share of the honest–lying gap", row=1, col=1)
        fig.update_yaxes(title_text="SAE − raw AUROC", row=2, col=1)
        title = f"Over split seeds ({model}, {site}): filled = passes its split's Holm test"
        figs[f"{tag_of(site)}_split_seeds"] = figlib.styled(fig, title)
    return figs


def caption(block: dict) -> str:
    return (
        f"Each (split seed, SAE seed) run of {len(block['splits'])} splits of the facts: top, the causal check's "
        "share of the honest–lying gap in P(truth) with its 95% CI over held-out pairs (filled: passes the Holm "
        "correction over that split's tests; open: does not); bottom, the k-sparse SAE probe's AUROC minus the "
        "raw-activation probe's on the same held-out facts, with its paired 95% CI."
    )
