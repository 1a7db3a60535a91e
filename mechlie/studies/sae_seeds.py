"""The SAE-features study over several SAE training seeds (:mod:`mechlie.studies.sae_features`).

Every SAE seed trains its own SAE per site on the same corpus (the corpus, the fact split, the
random feature draws and the probe nulls all use the study's ``seed``, so seeds differ only in the
SAE). Per seed and site: the decomposition and causal check (:func:`mechlie.sae.lie_features`) and
the k-sparse SAE probe (:mod:`mechlie.sae.sparse_probe`); per site, once: the raw-activation probe
it is compared with. Then every causal test run is corrected together (Holm, :func:`mechlie.sae.seeds.holm`)
and each headline number is summarised over seeds (mean ± SD).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mechlie.read.directions import Split


def probe_data(pairs, honest, lying):
    """The pairs' final-token rows at one site as :class:`mechlie.sae.sparse_probe.PairData`."""
    from mechlie.sae.sparse_probe import PairData

    return PairData(honest, lying, tuple(p.fact_id for p in pairs), tuple(p.relation for p in pairs))


def raw_probes(pairs, finals: dict, sites, split: Split, n_null: int, seed: int, relations: bool = True) -> dict:
    """The raw-activation probe of every site: ``{site: (folds, skipped)}`` (``relations``: with the
    held-out relation folds, :func:`mechlie.sae.sparse_probe.evaluate`)."""
    from mechlie.sae import sparse_probe as SP

    out = {}
    for site in sites:
        data = probe_data(pairs, finals["honest"][site], finals["lying"][site])
        out[site] = SP.evaluate(SP.RAW, data, split.train, split.test, n_null=n_null, seed=seed, relations=relations)
    return out


def sparse_probe(
    trained, pairs, finals: dict, split: Split, raw: tuple, n_null: int, seed: int, relations: bool = True
) -> dict:
    """The k-sparse probe on ``trained``'s features, compared with the site's raw probe ``raw`` (its
    folds: with or without the held-out relations, as ``relations`` says)."""
    from mechlie import sae as S
    from mechlie.sae import sparse_probe as SP

    f_h = S.encode(trained.sae, finals["honest"][trained.site])
    f_l = S.encode(trained.sae, finals["lying"][trained.site])
    folds, skipped = SP.evaluate(
        SP.SPARSE, probe_data(pairs, f_h, f_l), split.train, split.test, n_null=n_null, seed=seed, relations=relations
    )
    out = SP.compare(folds, raw[0], seed)
    out["skipped"] = {**raw[1], **skipped}
    out["rule"] = (
        "top-k SAE features by |mean f(lying) − mean f(honest)| on the training facts, logistic C=1; "
        f"k from {list(SP.K_GRID)} on validation facts; raw: logistic on the site's activations, "
        f"C from {list(SP.C_GRID)} on validation facts"
    )
    return out


def correct_causal(sites: dict, n_draws: int, alpha: float) -> dict:
    """Holm over every causal test in ``sites[site]["seeds"][seed]["causal"][mode]`` (all sites,
    seeds and modes run): each test gets ``p_holm`` and ``passes_corrected``; returns the family."""
    from mechlie.sae.seeds import holm, min_adjusted_p

    tests = [
        (site, seed, mode) for site, r in sites.items() for seed, res in r["seeds"].items() for mode in res["causal"]
    ]
    adj = holm([sites[s]["seeds"][sd]["causal"][m]["p_value"] for s, sd, m in tests])
    for (site, seed, mode), p in zip(tests, adj):
        c = sites[site]["seeds"][seed]["causal"][mode]
        c["p_holm"] = p
        c["passes_corrected"] = bool(p < alpha)
    return {
        "method": "Holm (step-down; family-wise error under any dependence)",
        "alpha": alpha,
        "n_tests": len(tests),
        "tests": [f"{s} {m} (SAE seed {sd})" for s, sd, m in tests],
        "n_draws": n_draws,
        "min_attainable_p_holm": min_adjusted_p(len(tests), n_draws),
    }


def over_seeds(r: dict) -> dict:
    """One site's headline numbers as mean ± SD over its SAE seeds, and how many seeds pass."""
    from mechlie.sae.seeds import mean_sd

    runs = list(r["seeds"].values())
    out: dict = {"n_seeds": len(runs)}
    q = [x["sae"].get("quality") for x in runs]
    if all(q):
        out["quality"] = {k: mean_sd([x[k] for x in q]) for k in ("l0", "explained_variance", "ce_recovered")}
    out["top_abs_diff"] = mean_sd([abs(x["features"][0]["diff"]) for x in runs])
    out["top_effect_size"] = mean_sd([abs(x["features"][0]["effect_size"]) for x in runs])
    out["causal"] = {}
    for mode in sorted({m for x in runs for m in x["causal"]}):
        cs = [x["causal"][mode] for x in runs if mode in x["causal"]]
        out["causal"][mode] = {
            "delta": mean_sd([c["delta"] for c in cs]),
            "gap_recovered": mean_sd([c["gap_recovered"] for c in cs]),
            "passes_corrected": sum(c["passes_corrected"] for c in cs),
            "passes_uncorrected": sum(c["p_value"] < 0.05 for c in cs),
            "n_seeds": len(cs),
        }
    probes = [x["sparse_probe"] for x in runs if "held_out" in x["sparse_probe"]["folds"]]
    if probes:
        ho = [p["folds"]["held_out"] for p in probes]
        out["probe_held_out"] = {
            "sae": mean_sd([h["sae"]["auroc"] for h in ho]),
            "raw": ho[0]["raw"]["auroc"],
            "sae_minus_raw": mean_sd([h["sae_minus_raw"]["diff"] for h in ho]),
            "verdicts": [h["verdict"] for h in ho],
        }
    lm = [x["sparse_probe"]["loro_mean"] for x in runs if "loro_mean" in x["sparse_probe"]]
    if lm:
        out["probe_loro"] = {
            "sae": mean_sd([m["sae"]["mean"] for m in lm]),
            "raw": lm[0]["raw"]["mean"],
            "sae_minus_raw": mean_sd([m["sae_minus_raw"]["mean"] for m in lm]),
            "verdicts": [m["verdict"] for m in lm],
        }
    return out
