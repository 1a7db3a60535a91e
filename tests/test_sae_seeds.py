"""Issue 22's SAE checks: Holm over every causal test, several SAE training seeds, a corpus that
holds no analysed fact, and the k-sparse SAE probe against the raw probe (planted features)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_model

import mechlie.sae as S
from mechlie.core.pairs import FORMATS, load_builtin
from mechlie.read.probes import fit_probe
from mechlie.sae import corpus as corpus_mod
from mechlie.sae import sparse_probe as SP
from mechlie.studies import sae_seeds as SS


def test_holm_matches_the_hand_computed_step_down_and_controls_the_family_wise_error():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert S.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    # 12 true nulls: uncorrected, some test passes in about 1 - 0.95^12 = 46% of families; Holm in <= 5%.
    rng = random.Random(0)
    fams = [[rng.random() for _ in range(12)] for _ in range(4000)]
    raw = sum(min(f) < 0.05 for f in fams) / len(fams)
    corrected = sum(min(S.holm(f)) < 0.05 for f in fams) / len(fams)
    assert raw > 0.4 and corrected < 0.065, (raw, corrected)
    # a permutation test with 100 draws can never pass Holm over 12 tests; with 400 it can
    assert S.min_adjusted_p(12, 100) > 0.1 and S.min_adjusted_p(12, 400) < 0.035


def test_correct_causal_counts_every_test_and_over_seeds_counts_passes():
    def res(p_ablate, p_clamp, delta):
        c = lambda p: {  # noqa: E731
            "p_value": p, "delta": delta, "gap_recovered": delta * 2, "features": [1, 2],
        }  # fmt: skip
        return {
            "causal": {"ablate": c(p_ablate), "clamp": c(p_clamp)},
            "sae": {},
            "features": [{"diff": -1.0, "effect_size": -2.0}],
            "sparse_probe": {"folds": {}},
        }

    sites = {
        "a": {"seeds": {"0": res(0.001, 0.04, 0.1), "1": res(0.002, 0.3, 0.2)}},
        "b": {"seeds": {"0": res(0.5, 0.6, 0.0), "1": res(0.003, 0.7, 0.0)}},
    }
    fam = SS.correct_causal(sites, n_draws=999, alpha=0.05)
    assert fam["n_tests"] == 8 and fam["min_attainable_p_holm"] == pytest.approx(8 / 1000)
    a0 = sites["a"]["seeds"]["0"]["causal"]
    assert a0["ablate"]["p_holm"] == pytest.approx(0.008) and a0["ablate"]["passes_corrected"]
    # 0.04 passes uncorrected, not corrected (it is the 4th smallest of 8: x5 = 0.2)
    assert a0["clamp"]["p_holm"] == pytest.approx(0.2) and not a0["clamp"]["passes_corrected"]
    o = SS.over_seeds(sites["a"])
    assert o["causal"]["ablate"]["passes_corrected"] == 2 and o["causal"]["clamp"]["passes_corrected"] == 0
    assert o["causal"]["clamp"]["passes_uncorrected"] == 1
    assert o["causal"]["ablate"]["delta"]["mean"] == pytest.approx(0.15)
    assert o["causal"]["ablate"]["delta"]["sd"] == pytest.approx(0.0707, abs=1e-3)


def test_over_splits_tells_split_variance_from_sae_seed_variance_and_counts_passes():
    """Two splits x two SAE seeds: the delta depends on the split only, so its SD over SAE seeds is 0
    and its SD over splits is that of (0.1, 0.3); passes and verdicts are counted per run."""
    from mechlie.studies.sae_splits import headline_lines, over_splits

    def run(delta, passes, diff):
        causal = {"delta": delta, "gap_recovered": 2 * delta, "passes_corrected": passes, "p_value": 0.01}
        causal["random_q95"] = 0.02
        probe = {"sae": {"auroc": 0.9, "null_q95": 0.6}, "raw": {"auroc": 1.0}, "sae_minus_raw": {"diff": diff}}
        return {"top_effect_size": -1.0, "causal": {"ablate": causal}, "probe": {**probe, "verdict": "raw better"}}

    splits = {
        "0": {"sites": {"s": {"seeds": {"0": run(0.1, True, -0.1), "1": run(0.1, False, -0.1)}}}},
        "1": {"sites": {"s": {"seeds": {"0": run(0.3, True, -0.1), "1": run(0.3, True, -0.1)}}}},
    }
    o = over_splits(splits)["s"]
    d = o["causal"]["ablate"]["delta"]
    assert d["mean"] == pytest.approx(0.2) and d["n"] == 4
    assert d["sd_over_sae_seeds"] == pytest.approx(0.0, abs=1e-12)
    assert d["sd_over_splits"] == pytest.approx(0.1414, abs=1e-3)
    assert o["causal"]["ablate"]["passes_corrected"] == 3 and o["causal"]["ablate"]["n_runs"] == 4
    assert o["causal"]["ablate"]["passes_per_split"] == {"0": "1/2", "1": "2/2"}
    assert o["probe_held_out"]["verdicts"] == {"raw better": 4}
    assert o["probe_held_out"]["raw"]["n"] == 2  # one raw probe per split, not per SAE seed
    assert o["causal"]["ablate"]["random_q95"]["mean"] == pytest.approx(0.02)
    text = " ".join(headline_lines({"splits": splits}))  # recomputed from the runs
    assert "2 split seeds × 2 SAE seeds**, in-relation" in text and "in 3 of 4 runs" in text
    assert "95th pct. +0.020" in text and "null 95th pct. 0.60" in text


def test_sae_training_seeds_give_different_saes_and_the_same_seed_the_same():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(1500, 16, generator=g) @ torch.randn(16, 16, generator=g)
    cfg = S.SAETrainConfig(expansion=2, k=4, batch_size=64, n_steps=40, lr=3e-3)
    a = S.train_sae(acts, cfg)
    again = S.train_sae(acts, cfg)
    b = S.train_sae(acts, S.SAETrainConfig(expansion=2, k=4, batch_size=64, n_steps=40, lr=3e-3, train_seed=1))
    assert torch.equal(a.W_dec, again.W_dec)
    # another seed: other decoder rows, far beyond float noise (the same seed differs by exactly 0)
    assert (a.W_dec - b.W_dec).norm() > 0.5 * a.W_dec.norm()
    # and another cache key (the corpus settings, and so the corpus, stay the same)
    model = tiny_model(n_ctx=64)
    assert S.cache_key(model, cfg) != S.cache_key(model, S.SAETrainConfig(expansion=2, k=4, train_seed=1))


def _analysed(model, n: int = 3) -> list:
    return load_builtin("all", "fewshot", tokenizer=model.tokenizer, n=n, seed=0)


def test_corpus_holds_no_prompt_or_question_of_an_analysed_fact(monkeypatch):
    model = tiny_model(n_ctx=256)
    analysed = _analysed(model)
    ids = {p.fact_id for p in analysed}
    questions = {p.question for p in analysed}
    prompts = {x for fmt in FORMATS for p in load_builtin("all", fmt, tokenizer=model.tokenizer) if p.fact_id in ids
               for x in (p.honest, p.lying)}  # fmt: skip
    # Without the exclusion, drawing every fact leaks them all: the check below can fail.
    leaky = S.build_corpus(model, pairs_per_format=0, n_samples=0)
    assert prompts <= set(leaky.texts)
    # A neutral line that quotes an analysed question is dropped too, and counted.
    planted = f"Someone once asked: {sorted(questions)[0]} Nobody knew."
    real = corpus_mod.neutral_lines()
    monkeypatch.setattr(corpus_mod, "neutral_lines", lambda: [*real, planted])
    c = S.build_corpus(model, pairs_per_format=0, n_samples=4, sample_tokens=4, exclude_facts=ids)
    assert not prompts & set(c.texts)
    assert not [t for t in c.texts for q in questions if q in t]
    ex = dict(c.excluded)
    assert ex["analysed facts"] == len(ids) == 12
    assert ex["their pair prompts passed over"] == 2 * len(FORMATS) * len(ids)
    assert ex["lines holding an analysed question, dropped"] == 1 and planted not in c.texts
    # every other fact is still drawn (pairs_per_format=0: all of them)
    assert c.counts()["pairs"] == len(leaky.texts) - len(real) - len(prompts)


def _planted(n: int = 60, d: int = 64, planted=(5, 17), shift: float = 2.0, seed: int = 0) -> SP.PairData:
    """Sparse nonnegative features; lying prompts raise the planted ones."""
    g = torch.Generator().manual_seed(seed)
    base = torch.relu(torch.randn(n, d, generator=g))
    h = base + 0.5 * torch.relu(torch.randn(n, d, generator=g))
    lie = base + 0.5 * torch.relu(torch.randn(n, d, generator=g))
    lie[:, list(planted)] += shift
    rel = ("r1", "r2", "r3")
    return SP.PairData(h, lie, tuple(f"f{i}" for i in range(n)), tuple(rel[i % 3] for i in range(n)))


def test_k_sparse_probe_finds_the_planted_features_and_beats_its_null():
    data = _planted()
    X, y = data.rows(range(40))
    assert set(SP.top_features(X, y, 2).tolist()) == {5, 17}
    train, test = list(range(40)), list(range(40, 60))
    sae, skipped = SP.evaluate(SP.SPARSE, data, train, test, n_null=100, seed=0)
    assert set(sae) == {"held_out", "loro/r1", "loro/r2", "loro/r3"} and not skipped
    ho = sae["held_out"]
    # The null redoes the top-k choice on permuted labels; the planted features vary most, so it often
    # picks them with a random sign and its upper tail is high - still well below the real probe.
    assert ho.auroc > 0.95 and ho.null_q95 < ho.auroc - 0.08 and ho.p_value < 0.05
    assert int(ho.chosen) <= 8  # two planted features: validation picks a small k
    for name in ("loro/r1", "loro/r2", "loro/r3"):
        assert sae[name].auroc > 0.8  # chance is 0.5
    # No signal, same pipeline: chance AUROC, not beyond its null.
    noise = _planted(shift=0.0, seed=1)
    ho0 = SP.evaluate(SP.SPARSE, noise, train, test, n_null=100, seed=0)[0]["held_out"]
    assert abs(ho0.auroc - 0.5) < 0.25 and ho0.p_value > 0.05


def test_sparse_null_refit_equals_fit_probe_on_the_same_labels():
    data = _planted(shift=0.7)
    X, y = data.rows(range(40))
    Z, _ = data.rows(range(40, 60))
    got = SP.SPARSE.nulls(X, y[None], 4, Z)[:, 0]
    cols = SP.top_features(X, y, 4)
    want = fit_probe("logistic", X[:, cols], y).score(Z[:, cols])
    assert torch.corrcoef(torch.stack([got, want]))[0, 1] > 0.9999
    assert (got - want).abs().max() < 1e-2 * want.abs().max()


def test_compare_says_which_probe_wins():
    data = _planted(n=90)
    train, test = list(range(60)), list(range(60, 90))
    # the raw probe reads the same features here; the sparse one must find 2 of 64: compare runs and agrees
    sae, _ = SP.evaluate(SP.SPARSE, data, train, test, n_null=30)
    raw, _ = SP.evaluate(SP.RAW, data, train, test, n_null=30)
    out = SP.compare(sae, raw)
    f = out["folds"]["held_out"]
    assert f["sae"]["auroc"] > 0.9 and f["raw"]["auroc"] > 0.9
    assert f["sae_minus_raw"]["lo"] <= f["sae_minus_raw"]["diff"] <= f["sae_minus_raw"]["hi"]
    assert out["loro_mean"]["n_relations"] == 3
    assert SP.winner({"lo": 0.01, "hi": 0.2}) == "SAE probe better"
    assert SP.winner({"lo": -0.2, "hi": -0.01}) == "raw probe better"
    assert SP.winner({"lo": -0.1, "hi": 0.1}).startswith("no clear winner")
    # a raw probe on pure noise beside planted SAE features: the SAE probe wins, with a CI above 0
    g = torch.Generator().manual_seed(3)
    noise = SP.PairData(
        torch.randn(90, 64, generator=g), torch.randn(90, 64, generator=g), data.fact_ids, data.relations
    )
    raw0, _ = SP.evaluate(SP.RAW, noise, train, test, n_null=30)
    assert SP.compare(sae, raw0)["folds"]["held_out"]["verdict"] == "SAE probe better"


def test_null_of_a_strong_signal_stays_near_chance():
    # Honest and lying rows far apart: labels permuted across rows keep a chance correlation with
    # the real ones, so a refit recovers the real direction with a random sign (95th pct. near 1).
    # Within-pair swaps of exactly half the pairs cannot: the null stays near chance.
    data = _planted(n=60, shift=6.0)
    ho = SP.held_out(SP.RAW, data, list(range(40)), list(range(40, 60)), n_null=100, seed=0)
    assert ho.auroc > 0.99 and ho.null_q95 < 0.8 and abs(ho.null_mean - 0.5) < 0.1
