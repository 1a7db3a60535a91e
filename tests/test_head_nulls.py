"""Issue 22: per-component null bars beside the max-over-components bar, the layer choice over split
seeds, and the minimal set's bootstrap with the heads re-ranked on every resample (tiny models and
synthetic data; no weights)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from mechlie.causal.circuits import joint_patch, patch_sides, rank_on, rerank_minimal_k, search_minimal_k
from mechlie.causal.effects import EffectResult
from mechlie.causal.patching import patch_runs
from mechlie.core.pairs import answer_set
from mechlie.read.directions import score_directions, scores_over_seeds, split_by_fact

# ---------------------------------------------------------------------------------------------
# per-component bars


def test_each_heads_own_bar_is_below_the_max_bar_and_strictly_for_most_heads():
    g = torch.Generator().manual_seed(0)
    honest, lying = torch.randn(80, 3, 6, 8, generator=g), torch.randn(80, 3, 6, 8, generator=g)  # no signal
    s = score_directions(honest, lying, split_by_fact([f"f{i}" for i in range(80)], 0.3, 0), n_perm=200, n_random=200)
    assert s.random_q95.shape == s.null_q95.shape == (3, 6)
    # Always: in every draw a head's AUROC is at most the maximum over heads.
    assert (s.random_q95 <= s.random_bar + 1e-6).all() and (s.null_q95 <= s.null_bar + 1e-6).all()
    # Strictly, and by far more than float noise, for most of the 18 heads.
    assert (s.random_q95 < s.random_bar - 0.02).float().mean() >= 0.8
    assert (s.null_q95 < s.null_bar - 0.02).float().mean() >= 0.8
    summ = s.summary()
    for ctl in ("null", "random"):
        lo, hi = summ[ctl]["own_q95_range"]
        assert lo <= hi <= summ[ctl]["max_bar_95"] + 1e-6
        assert summ[ctl]["n_pass_own"] >= summ[ctl]["n_pass"]  # a lower bar passes at least as many
    # Under no signal the uncorrected own bar passes about 5% of heads, the max bar about none.
    assert summ["null"]["n_pass_own"] <= 5 and summ["null"]["n_pass"] <= 1


# ---------------------------------------------------------------------------------------------
# the layer choice over split seeds


def test_layer_ci_over_seeds_is_well_ordered_and_finds_a_clear_winner():
    g = torch.Generator().manual_seed(1)
    n, L, d = 90, 5, 12
    honest, lying = torch.randn(n, L, d, generator=g), torch.randn(n, L, d, generator=g)
    lying[:, 3, 0] += 2.0  # only layer 3 separates the framings
    facts = [f"f{i}" for i in range(n)]
    ss = scores_over_seeds(honest, lying, facts, range(6), test_frac=0.3)
    s = ss.summary()
    assert ss.auroc.shape == (6, L) and s["seeds"] == list(range(6))
    for key in ("mean", "sd", "lo", "hi", "best_share"):
        assert len(s[key]) == L
    assert all(lo <= m <= hi for lo, m, hi in zip(s["lo"], s["mean"], s["hi"]))
    assert s["chosen"] == 3 and not s["noise_level"] and s["overlapping"] == [] and s["chosen_best_share"] == 1.0
    assert "not noise-level" in s["verdict"] and s["not_beaten"] == []
    # Seed 0 is the split the reported scores use: the same number.
    ref = score_directions(honest, lying, split_by_fact(facts, 0.3, 0), n_perm=20, n_random=20)
    assert torch.allclose(ss.auroc[0], ref.auroc)


def test_layer_choice_among_equal_layers_is_called_noise_level():
    g = torch.Generator().manual_seed(2)
    n, L, d = 60, 4, 8
    honest, lying = torch.randn(n, L, d, generator=g), torch.randn(n, L, d, generator=g)
    lying[:, :, 0] += 0.8  # every layer carries the same signal
    s = scores_over_seeds(honest, lying, [f"f{i}" for i in range(n)], range(5)).summary()
    assert s["noise_level"] and len(s["overlapping"]) >= 2 and "noise-level" in s["verdict"]
    with pytest.raises(ValueError, match="seed"):
        scores_over_seeds(honest, lying, [f"f{i}" for i in range(n)], [])


# ---------------------------------------------------------------------------------------------
# the minimal set with re-ranking


@dataclass(frozen=True)
class Additive(EffectResult):
    """A synthetic patching result: a set's per-pair score is the sum of its heads' weights (the
    unpatched target scores 0, the source 1, so the normalized effect is the mean score)."""

    LO: ClassVar[str] = "target"
    HI: ClassVar[str] = "source"
    logit_diff: Tensor
    p_truth: Tensor
    target: SimpleNamespace
    source: SimpleNamespace


def additive_evaluator(weights: dict, n: int, calls: list):
    def evaluate(sets):
        calls.append(list(sets))
        scores = torch.tensor([[sum(weights[h] for h in s) for s in sets]] * n)
        base = SimpleNamespace(logit_diff=torch.zeros(n), p_truth=torch.zeros(n))
        return Additive(scores, scores, base, SimpleNamespace(logit_diff=torch.ones(n), p_truth=torch.ones(n)))

    return evaluate


def test_search_minimal_k_matches_the_cumulative_sum_and_patches_each_set_once():
    heads = [(0, h) for h in range(20)]
    weights = {h: 0.1 for h in heads}
    weights[(0, 0)], weights[(0, 1)] = 0.5, 0.25
    rankings = [heads, heads[1:] + heads[:1], list(reversed(heads))]
    calls: list = []
    ks = search_minimal_k(rankings, [None] * 3, additive_evaluator(weights, 4, calls), threshold=0.8, k_start=4)
    # by hand: 0.5 + 0.25 + 0.1 = 0.85 at k=3; 0.25 + 0.1 * 5 + ... = 0.85 at k=7; reversed: 0.1 * 8 at k=8
    assert ks.tolist() == [3, 7, 8]
    patched = [frozenset(s) for c in calls for s in c]
    assert len(patched) == len(set(patched))  # no set (as a set) patched twice
    assert len(calls) == 2  # rounds k <= 4, then k <= 8
    none = search_minimal_k([heads], [None], additive_evaluator(weights, 4, []), threshold=5.0, k_max=6)
    assert torch.isinf(none).all()  # never reached within k_max


def test_rerank_bootstrap_calls_the_ranking_once_per_resample_and_matches_a_direct_search():
    from conftest import tiny_model
    from test_circuits import many_pairs

    model = tiny_model(seed=3)
    pairs = many_pairs()
    train, test = pairs[:4], pairs[4:]
    src, tgt = patch_sides(train, "restore")
    single = patch_runs(model, src, tgt, answer_set(model.tokenizer, train), "z", progress=False)
    calls: list[Tensor] = []

    def rank(idx):
        calls.append(idx.clone())
        return rank_on(single, idx)

    def evaluate(sets):
        return joint_patch(model, test, sets, progress=False)

    n_boot, seed, thr = 5, 11, 0.5
    rr = rerank_minimal_k(rank, evaluate, len(train), len(test), threshold=thr, n_boot=n_boot, seed=seed, k_start=2)
    assert len(calls) == n_boot  # one ranking per resample
    assert len({tuple(c.tolist()) for c in calls}) > 1  # on different resamples of the training pairs
    lo, hi = rr.ci
    assert 1 <= lo <= hi <= rr.k_max + 1 and rr.minimal_k.shape == (n_boot,)
    # Direct reference: the same resamples, every prefix of each resample's ranking patched.
    g = torch.Generator().manual_seed(seed)
    tr = torch.randint(0, len(train), (n_boot, len(train)), generator=g)
    te = torch.randint(0, len(test), (n_boot, len(test)), generator=g)
    for b in range(n_boot):
        ranking = rank_on(single, tr[b])
        eff = joint_patch(model, test, [ranking[:k] for k in range(1, len(ranking) + 1)], progress=False).effect(
            "logit_diff", te[b]
        )
        hit = (eff >= thr).nonzero()
        expect = float(hit[0, 0] + 1) if len(hit) else float("inf")
        assert rr.minimal_k[b].item() == expect


# ---------------------------------------------------------------------------------------------
# the head sweep's summary and text


def test_head_sweep_summary_has_both_bars_per_head_the_layer_ci_and_the_label_swap_note(tiny, tmp_path):
    from mechlie.core.cli import RunDir
    from mechlie.studies.head_sweep import HeadSweepConfig, run_head_sweep, summarize
    from mechlie.studies.head_sweep_result import LABEL_SWAP_NOTE, HeadSweepResult

    cfg = HeadSweepConfig(
        model="tiny", dataset="capitals", n_pairs=0, known_only=False, n_perm=40, n_random=40, n_boot=100, n_patch=4
    )
    run = RunDir(tmp_path / "run", {"config": {"k": 1}})
    res = run_head_sweep(cfg, tiny, run, progress=False)
    run.close()
    s = summarize(res)
    L, H = tiny.cfg.n_layers, tiny.cfg.n_heads
    ph = s["head_auroc"]["per_head"]
    own = torch.tensor(ph["random_own_q95"])
    assert own.shape == (L, H) and torch.tensor(ph["null_own_q95"]).shape == (L, H)
    assert (own <= ph["random_max_bar_95"] + 1e-6).all()
    auroc = torch.tensor(ph["auroc"])
    assert ph["n_pass"]["random_own"] == int((auroc > own).sum()) == s["head_auroc"]["random"]["n_pass_own"]
    assert ph["n_pass"]["random_max"] == int((auroc > ph["random_max_bar_95"]).sum())
    assert ph["n_pass"]["null_own"] >= ph["n_pass"]["null_max"]
    o = s["resid_auroc"]["over_seeds"]
    assert o["seeds"] == list(range(cfg.n_layer_seeds)) and o["fit"] == "diff_of_means"
    assert len(o["mean"]) == L and all(lo <= m <= hi for lo, m, hi in zip(o["lo"], o["mean"], o["hi"]))
    assert s["notes"][0] == LABEL_SWAP_NOTE
    result = HeadSweepResult(tmp_path / "run", s)
    head = "\n".join(result.headline())
    assert LABEL_SWAP_NOTE in head and "each head's own 95% bar" in head and "Layer choice over 10 split seeds" in head
    assert "demonstrations" in result.report()


def test_an_old_head_sweep_summary_reads_as_it_did():
    """A summary written before the per-head bars: the headline keeps its old wording (no KeyError)."""
    import json
    from pathlib import Path

    from mechlie.studies.head_sweep_result import HeadSweepResult

    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    s = json.loads((root / "head_sweep.summary.json").read_text())
    new_keys = {"n_pass_own", "own_q95_range", "per_head", "over_seeds", "notes", "random_q95"}
    new_keys |= {"beats_null_own_bar", "beats_random_max_bar", "beats_random_own_bar"}

    def old(x):  # the committed summary as written before the per-head bars existed
        if isinstance(x, dict):
            return {k: old(v) for k, v in x.items() if k not in new_keys}
        return [old(v) for v in x] if isinstance(x, list) else x

    head = "\n".join(HeadSweepResult(root, old(s)).headline())
    assert "max-over-heads null 95% bar" in head and "own 95% bar" not in head


# ---------------------------------------------------------------------------------------------
# localise: the known filter


def test_localise_keeps_known_pairs_by_the_head_sweeps_definition(tiny):
    from mechlie.core.metrics import behaviour
    from mechlie.core.pairs import load_builtin
    from mechlie.studies.localise_variance import KNOWN_DEFINITION, known_rows, rows, single_head_effects

    pairs = load_builtin("capitals", "fewshot", tokenizer=tiny.tokenizer, n=6)
    single = single_head_effects(tiny, pairs)
    # The same mask as Behaviour.known (the head sweep's known_only) on the same pairs.
    assert single.clean.correct.tolist() == behaviour(tiny, pairs, progress=False).known.tolist()
    forced = rows(single, range(len(pairs)))
    object.__setattr__(forced.clean, "correct", torch.tensor([True, False] * 3))  # a model that knows half
    keep, info = known_rows(forced, pairs, known_only=True)
    assert keep == [0, 2, 4] and info["n_known"] == 3 and info["n_dropped_unknown"] == 3
    assert info["definition"] == KNOWN_DEFINITION and "Behaviour.known" in KNOWN_DEFINITION
    keep, info = known_rows(forced, pairs, known_only=False)
    assert keep == list(range(6)) and info["n_dropped_unknown"] == 0 and info["n_known"] == 3
    sub = rows(single, [1, 3])
    assert torch.equal(sub.logit_diff, single.logit_diff[[1, 3]]) and torch.equal(
        sub.corrupt.logit_diff, single.corrupt.logit_diff[[1, 3]]
    )
