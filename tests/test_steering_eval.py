"""Steering evaluation: KL per line, splits, the kind registry, validation-only choice, controls (tiny models)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from conftest import no_hooks
from conftest import tiny_model as word_model
from steer_fixtures import word_pairs
from tiny_models import tiny_model as _tiny
from transformer_lens import HookedTransformer

from mechlie.control.steering import AddVectors, SteeringError
from mechlie.core.pairs import Batch, PairError
from mechlie.studies import steering_eval as se


def tiny_model() -> HookedTransformer:
    return _tiny(attn_only=False, n_ctx=32)


BATCH = Batch(torch.tensor([[0, 0, 3, 4, 5], [6, 7, 8, 9, 10]]), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))


def test_last_logits_match_full_forward_and_steering_changes_them():
    model = tiny_model()
    with torch.no_grad():
        full = model(BATCH.tokens, attention_mask=BATCH.attention_mask)[:, -1]
    torch.testing.assert_close(se.last_logits(model, [BATCH]), full, atol=1e-5, rtol=1e-5)
    # A zero-mean direction: LayerNorm's mean-centring would cancel a constant one (all ones).
    zero_mean = torch.tensor([1.0, -1.0] * 16)
    assert abs(float(zero_mean.mean())) < 1e-9
    steered = se.last_logits(model, [BATCH], [AddVectors({1: zero_mean}, 3.0)])
    assert (steered - full).abs().max() > 0.1  # float noise is ~1e-6
    # The constant vector really is cancelled: the old test's direction was a no-op.
    const = se.last_logits(model, [BATCH], [AddVectors({1: torch.ones(32)}, 3.0)])
    torch.testing.assert_close(const, full, atol=1e-4, rtol=1e-4)


def test_last_logits_apply_the_output_soft_cap():
    """Steering's answer scores go through the one final-logits path, so a soft-capped model's
    logits are capped as its own forward pass caps them (they were not before)."""
    from tiny_models import softcap_model

    model = softcap_model()
    with torch.no_grad():
        full = model(BATCH.tokens, attention_mask=BATCH.attention_mask)[:, -1]
    got = se.last_logits(model, [BATCH])
    assert got.abs().max() <= model.cfg.output_logits_soft_cap + 1e-5
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_neutral_effects_zero_for_no_op_and_positive_otherwise():
    model = tiny_model()
    clean = se.token_logprobs(model, [BATCH])
    ne = se.neutral_effects(model, [BATCH], clean, [AddVectors({0: torch.ones(32)}, 0.0)])
    assert ne.kl_tokens.tolist() == [3, 5] and ne.dce_tokens.tolist() == [
        2,
        4,
    ]  # real tokens; real (t, t+1) pairs per line
    assert ne.kl_sum.abs().max() < 1e-6 and ne.dce_sum.abs().max() < 1e-6
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    ne = se.neutral_effects(model, [BATCH], clean, [AddVectors({0: v - v.mean()}, 5.0)])
    assert (ne.kl_sum > 1e-3).all()
    # the reported KL is the token-weighted mean, and its CI statistic resamples lines
    assert abs(ne.kl - float(ne.kl_sum.sum() / 8)) < 1e-6
    assert abs(float(ne.kl_stat()(torch.tensor([1, 1]))) - float(ne.kl_sum[1] / 5)) < 1e-6


def test_gap_fraction():
    lo, hi = torch.tensor([0.2, 0.4, 0.3]), torch.tensor([0.8, 0.9, 0.7])
    p = lo + 0.5 * (hi - lo)
    assert abs(float(se.gap_fraction(p, lo, hi)(torch.arange(3))) - 0.5) < 1e-6
    assert abs(float(se.gap_fraction(lo, lo, hi, toward_hi=False)(torch.arange(3))) - 1.0) < 1e-6
    assert abs(float(se.gap_fraction(hi, lo, hi, toward_hi=False)(torch.arange(3)))) < 1e-6


def test_split_three_by_fact_and_too_few_facts():
    ids = [f"f{i // 2}" for i in range(40)]  # 20 facts, two rows each
    sp = se.split_three(ids, val_frac=0.2, test_frac=0.3, seed=1)
    assert sorted(sp.train + sp.val + sp.test) == list(range(40))
    facts = [{ids[i] for i in side} for side in (sp.train, sp.val, sp.test)]
    assert not (facts[0] & facts[1]) and not (facts[0] & facts[2]) and not (facts[1] & facts[2])
    assert [len(f) for f in facts] == [10, 4, 6]
    assert len(se.split_three(["a", "b", "c"]).val) == 1
    with pytest.raises(PairError, match="at least 3 distinct facts"):
        se.split_three(["a", "a", "b"])
    with pytest.raises(ValueError):
        se.split_three(ids, val_frac=0.5, test_frac=0.5)
    tr, va, te = se.split_lines(se.neutral_lines(), seed=0)
    assert (
        len(tr) == 16
        and not (set(tr) & set(va))
        and not (set(va) & set(te))
        and len(va) + len(te) == len(se.neutral_lines()) - 16
    )


def test_pareto_and_choose_on_validation_only():
    P = lambda kl, rec, split="val": se.SweepPoint(se.Setting("resid", 0, -1.0), split, 0.5, rec, kl)
    pts = [P(0.01, 0.2), P(0.05, 0.1), P(0.08, 0.6), P(0.5, 0.9), P(0.6, 0.7)]
    assert [(p.kl, p.recovered) for p in se.pareto(pts)] == [(0.01, 0.2), (0.08, 0.6), (0.5, 0.9)]
    assert se.choose(pts, 0.1).recovered == 0.6
    assert se.choose(pts, 0.001).kl == 0.01
    with pytest.raises(ValueError, match="validation"):
        se.choose(pts + [P(0.01, 0.99, "test")], 0.1)


@pytest.fixture(scope="module")
def prepared():
    model = word_model()
    data = se.prepare(model, word_pairs(), val_frac=0.34, test_frac=0.34, progress=False)
    return model, data


class Poisoned(se.EvalSet):
    """Stands in for the test set (and passes type checks): any use of it fails the test."""

    def __init__(self):
        pass

    def __getattribute__(self, name):
        if name.startswith("__"):
            return object.__getattribute__(self, name)
        raise AssertionError(f"the validation choice read the test set ({name})")


def test_validation_choice_never_reads_test_data(prepared):
    model, data = prepared
    assert {p.fact_id for p in data.val.pairs}.isdisjoint(p.fact_id for p in data.test.pairs)
    assert {p.fact_id for p in data.train}.isdisjoint(p.fact_id for p in data.test.pairs + data.val.pairs)
    grid = [se.Setting("resid", l, -a) for l in (0, 2) for a in (1.0, 4.0)] + [se.Setting("iti", -1, -2.0, "2")]
    blind = replace(data, test=Poisoned())
    best = se.choose(se.sweep(model, blind, grid, progress=False), kl_budget=1.0)
    assert best.split == "val"
    # and the choice is what validation says: it equals the choice made with the real test set there
    assert best == se.choose(se.sweep(model, data, grid, progress=False), kl_budget=1.0)
    # the same grid swept on test is allowed for figures, but choose() refuses it
    with pytest.raises(ValueError, match="validation"):
        se.choose(se.sweep(model, data, grid, on="test", progress=False))


def test_kind_registry_and_controls_of_the_same_size(prepared):
    model, data = prepared
    with pytest.raises(SteeringError, match="unknown kind"):
        se.intervention(model, data, se.Setting("nope", 0, -1.0))
    s = se.Setting("resid", 1, -2.0)
    real = se.intervention(model, data, s)
    draws = [se.intervention(model, data, s, control_seed=j) for j in range(5)]
    for d in draws:
        torch.testing.assert_close(d.vectors[1].norm(), real.vectors[1].norm(), atol=1e-4, rtol=1e-4)
        assert d.alpha == real.alpha
    assert len({round(float(d.vectors[1][0]), 6) for d in draws}) == 5  # distinct draws
    c = se.controls(model, data, s, data.val, n_draws=6)
    assert c["n_draws"] == 6 and len(c["recovered_draws"]) == 6 and len(set(c["kl_draws"])) == 6
    assert c["recovered"].lo <= c["recovered"].mean <= c["recovered"].hi


def test_mean_patching_kinds_and_their_controls(prepared):
    model, data = prepared
    se.attach_causal_heads(model, data, heads=[(1, 2), (0, 3)])
    assert data.causal_heads == ((1, 2), (0, 3))
    with pytest.raises(SteeringError, match="not in this model"):
        se.attach_causal_heads(model, data, heads=[(5, 0)])
    hm, lm = data.head_means
    assert hm.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    iv = se.intervention(model, data, se.Setting("causal_mean", -1, -1.0, "2"))
    assert iv.heads == ((1, 2), (0, 3))
    torch.testing.assert_close(iv.honest[0], hm[1, 2]) and torch.testing.assert_close(iv.lying[1], lm[0, 3])
    probe = se.intervention(model, data, se.Setting("probe_mean", -1, -1.0, "3"))
    assert probe.heads == data.heads.top(3, -1.0).heads
    ctrl = se.intervention(model, data, se.Setting("causal_mean", -1, -1.0, "2"), control_seed=3)
    assert len(ctrl.heads) == 2 and ctrl.alpha == -1.0
    with pytest.raises(SteeringError, match="causal kinds need"):
        se.intervention(model, data, se.Setting("causal_mean", -1, -1.0, "3"))
    pt = se.sweep(model, data, [se.Setting("causal_mean", -1, -1.0, "2")], progress=False)[0]
    assert pt.split == "val" and pt.kl > 0


def test_user_registered_kind(prepared):
    model, data = prepared
    se.register_kind(
        "twice_resid",
        lambda m, d, s: AddVectors({s.layer: 2 * d.resid_dirs[s.layer]}, s.alpha),
        lambda m, d, s, seed: AddVectors({s.layer: 2 * se.random_like(d.resid_dirs[s.layer], seed)}, s.alpha),
    )
    try:
        a = se.sweep(model, data, [se.Setting("twice_resid", 1, -1.0)], progress=False)[0]
        b = se.sweep(model, data, [se.Setting("resid", 1, -2.0)], progress=False)[0]
        assert abs(a.recovered - b.recovered) < 1e-4 and abs(a.kl - b.kl) < 1e-5
    finally:
        del se.KINDS["twice_resid"]


def test_a_new_method_is_one_class(prepared):
    """One Method subclass: the study sweeps it (its grid), builds it and draws its control (by
    default the intervention's own random_control)."""
    from types import SimpleNamespace

    from mechlie.studies.steering import Config
    from mechlie.studies.steering_methods import GridContext, Method, method, study_grid, study_methods

    model, data = prepared

    @method
    class TwiceResid(Method):
        name = "twice_resid_cls"

        def build(self, model, data, s):
            return AddVectors({s.layer: 2 * data.resid_dirs[s.layer]}, s.alpha)

        def grid(self, ctx):
            return [se.Setting(self.name, l, a) for l in ctx.layers for a in ctx.cfg.resid_alphas]

    try:
        assert "twice_resid_cls" in study_methods()
        Config(model="tiny", methods=("twice_resid_cls",))  # a flag value the study accepts now
        cfg = SimpleNamespace(resid_alphas=(-1.0,))
        grid = study_grid(GridContext(model, data, cfg, None, (1,), None), ("twice_resid_cls",))
        assert grid == {"twice_resid_cls": [se.Setting("twice_resid_cls", 1, -1.0)]}
        a = se.sweep(model, data, grid["twice_resid_cls"], progress=False)[0]
        b = se.sweep(model, data, [se.Setting("resid", 1, -2.0)], progress=False)[0]
        assert abs(a.recovered - b.recovered) < 1e-4 and abs(a.kl - b.kl) < 1e-5
        ctrl = se.intervention(model, data, grid["twice_resid_cls"][0], control_seed=5)
        want = AddVectors({1: 2 * data.resid_dirs[1]}, -1.0).random_control(5, model)
        torch.testing.assert_close(ctrl.vectors[1], want.vectors[1])
    finally:
        del se.KINDS["twice_resid_cls"]


def test_builtin_controls_are_the_draws_they_were(prepared):
    """The registry's controls give the same random draws as the per-kind controls they replaced."""
    from mechlie.control.steering import DirectionalAblation, random_head_shift

    model, data = prepared
    se.attach_causal_heads(model, data, heads=[(1, 2), (0, 3)])
    for seed in (1, 1001):
        iti = se.intervention(model, data, se.Setting("iti", -1, -2.0, "2"), control_seed=seed)
        old = random_head_shift(data.heads.top(2, -2.0), model, seed)
        torch.testing.assert_close(iti.units, old.units) and torch.testing.assert_close(iti.sigmas, old.sigmas)
        ab = se.intervention(model, data, se.Setting("ablation", 1, -1.0), control_seed=seed)
        assert isinstance(ab, DirectionalAblation) and ab.alpha == 1.0
        torch.testing.assert_close(ab.direction, se.random_like(data.resid_dirs[1], seed))
        res = se.intervention(model, data, se.Setting("resid", 2, -1.0), control_seed=seed)
        torch.testing.assert_close(res.vectors[2], se.random_like(data.resid_dirs[2], seed))


def test_evaluate_on_test_with_controls(prepared):
    model, data = prepared
    r = se.evaluate(model, data, se.Setting("resid", 2, -4.0), n_controls=5, n_boot=200)
    assert r["on"] == "test" and r["n_facts"] == len(data.test.pairs)
    assert r["n_neutral_lines"] == sum(len(b.tokens) for b in data.test.neutral) and r["control"]["n_draws"] == 5
    assert r["recovered"].lo <= r["recovered"].mean <= r["recovered"].hi
    assert r["kl"].mean > 1e-4  # a strong push changes the neutral text
    assert 0 <= r["control"]["share_recovering_at_least_real"] <= 1
    assert "induced" in r and no_hooks(model)


def test_figures_from_saved_sweep_points(tmp_path):
    from mechlie.core.io import atomic_write_json, read_json
    from mechlie.studies import steering_figures as sfig

    def jsonable(obj):  # the form the run saves
        return read_json(atomic_write_json(tmp_path / "x.json", obj))

    pts = [
        se.SweepPoint(se.Setting("resid", l, -a), "val", 0.5, 0.1 * l * a, 0.01 * a) for l in (3, 5) for a in (1.0, 2.0)
    ]
    pts.append(se.SweepPoint(se.Setting("iti", -1, -5.0, "16"), "val", 0.6, 0.4, 0.02))
    sweep = jsonable({"resid": pts[:4], "iti": pts[4:]})
    assert sfig.sweep_points(sweep["resid"]) == pts[:4]  # read back exactly
    fig = sfig.dose(sweep["resid"], "p_truth", "tiny")
    assert fig.data[0].z.shape == (2, 2)
    with pytest.raises(ValueError):
        sfig.dose(sweep["iti"], "recovered", "tiny")  # no layer: not a residual sweep
    e = {
        "recovered": se.Estimate(0.4, 0.2, 0.6, 10),
        "kl": se.Estimate(0.02, 0.01, 0.03, 12),
        "control": {"n_draws": 8, "recovered": se.Estimate(0.0, -0.1, 0.1, 8), "kl": se.Estimate(0.02, 0.01, 0.03, 8)},
    }
    names = [t.name for t in sfig.frontier(sweep, jsonable({"resid": e}), "tiny", 0.1).data]
    assert "resid frontier" in names and "iti frontier" in names
    assert any("chosen on val" in n for n in names) and any("random, 8 draws" in n for n in names)


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--methods", "foo"], "unknown methods"),
        (["--edit-budgets", "0"], "--edit-budgets must be > 0"),
        (["--n-controls", "1"], "--n-controls must be >= 2"),
        (["--resid-alphas", "0"], "nonzero"),
    ],
)
def test_demo_flags_checked_before_the_model_loads(tmp_path, capsys, argv, message):
    from mechlie.core.cli import run_script
    from mechlie.studies.steering import Config

    loaded = []
    rc = run_script(Config, lambda cfg, run: loaded.append(1), argv=argv + ["--out-dir", str(tmp_path / "out")])
    assert rc == 2 and not loaded and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("lean", [False, True])
def test_demo_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys, lean):
    """The whole study (every method, controls, transfer to a held-out setup, the capability check, lies
    flipped back) on the tiny word model, launched as the script launches it; what it prints is its
    result's report, read back from the run. ``lean``: the split seeds keep the main seed's settings."""
    from steer_fixtures import self_answered_pairs

    import mechlie.core.models
    import mechlie.core.pairs
    import mechlie.studies.steering_capability as sc
    from analyses import steering_demo
    from mechlie.studies.base import launch, load_result
    from mechlie.studies.steering import DEFAULT_METHODS, METHODS, STUDY, SteeringResult

    assert steering_demo.STUDY is STUDY
    monkeypatch.setattr(mechlie.core.models, "load_model", lambda name, **kw: word_model(n_ctx=256))
    monkeypatch.setattr(mechlie.core.pairs, "load_builtin", lambda *a, **kw: word_pairs())
    setup = [replace(p, setup="instructed", lying=p.lying + " ?") for p in word_pairs()]
    monkeypatch.setattr(sc, "setup_heldout_pairs", lambda *a, **kw: setup)
    monkeypatch.setattr(sc, "corpus_pairs", lambda *a, **kw: self_answered_pairs(word_model(n_ctx=256), 14))
    argv = ["--capability-n", "12", *(["--seeds-lean"] if lean else [])] + [
        "--model",
        "tiny",
        "--layers",
        "1",
        "2",
        "--head-ks",
        "2",
        "--head-alphas",
        "-2",
        "--resid-alphas",
        "-1",
        "-3",
        "--edit-budgets",
        "0.05",
        "--edit-scales",
        "-1",
        "--edit-steps",
        "3",
        "--n-controls",
        "3",
        "--n-boot",
        "50",
        "--val-frac",
        "0.34",
        "--test-frac",
        "0.34",
        "--causal-pairs",
        "2",
        "--n-demo",
        "2",
        "--max-new-tokens",
        "2",
        "--min-known",
        "0",
        "--split-seeds",
        "0",
        "1",
        "--transfer-format",
        "instruct",
        "--out-dir",
        str(tmp_path),
        "--run-name",
        "t",
    ]
    assert launch(STUDY, argv=argv) == 0, capsys.readouterr().err
    run = tmp_path / "t"
    summary = __import__("json").loads((run / "summary.json").read_text())
    ev = summary["evaluation_on_test"]
    assert set(ev) == set(DEFAULT_METHODS) and set(DEFAULT_METHODS) <= set(METHODS) and summary["kind"] == "steering"
    for m, r in ev.items():
        assert r["on"] == "heldout" and r["control"]["n_draws"] == 3
        assert (
            summary["evaluation_in_relation"][m]["on"] == "test"
            and "control" not in summary["evaluation_in_relation"][m]
        )
        assert summary["chosen_on_validation"][m]["split"] == "val"
        assert set(summary["transfer"][m]) == {"format:instruct", "setup:instructed"}
        assert summary["transfer"][m]["setup:instructed"]["n_facts"] == len(setup)
        cap = summary["capability"]["methods"][m]
        assert cap["n"] == 12 and 0 <= cap["lo"] <= cap["accuracy"] <= cap["hi"] <= 1
    for on in ("heldout", "test", "setup:instructed"):
        assert summary["prompt_baseline"][on]["method"] == "prompt baseline"
    assert summary["baseline"]["setup:instructed"]["n_facts"] == len(setup) and "reft" in ev
    assert (
        summary["edits"]["reft@0.05"]["objective"] == "honest_resid"
        and "prompt baseline" in summary["capability"]["methods"]
    )
    assert (run / "learned@0.05.safetensors").is_file() and (run / "figures" / "steering_frontier.html").is_file()
    result = load_result(run)
    assert isinstance(result, SteeringResult) and result.summary() == summary
    # the figures the run wrote are those make_figures draws from the saved files
    assert set(summary["figures"]) == set(result.figures()) >= {"steering_recovered", "steering_frontier"}
    printed = capsys.readouterr().out
    assert result.report() in printed and "best (on validation): " in printed
    # best, the prompt baseline, each method, the held-out setup, the seeds, the two verdicts
    head = result.headline()
    assert len(head) == 2 + len(ev) + 5 and "Held-out setup instructed" in head[2 + len(ev)]
    assert "honest-only control" in head[-2] and "prompt" in head[-1] and "capability kept" in head[1]
    assert head[-3].startswith("- Issue-20 goals") and head[-3].count("/") >= 4 * len(ev) and head[-3][2:] in printed
    assert isinstance(summary["best"]["goal_met"], bool)
    # the printed order: the comparison table with its prompt-baseline row, the held-out section, the lies last
    table, held = printed.index("comparison table"), printed.index("\nheld-out relations")
    assert table < printed.index("prompt baseline") < held < printed.index("lies flipped back on held-out relations")
    for m in ev:
        # the form; where the tiny model's held-out set has no honest-lying gap, recovery is n/a
        number = r"n/a \(no gap: -?[\d.]+\)" if ev[m]["no_gap"] else r"-?[\d.]+ \[.*\]"
        assert re.search(rf"^{m}: recovered {number}.* KL -?[\d.]+ \[", printed[held:], re.M), m
    # one gated edit, at the deepest sweep layer, with its gate's opening as shares above 0.5
    assert set(summary["gates"]) == {"gated@0.05/L2"}
    g = summary["gates"]["gated@0.05/L2"]
    assert all(0.0 <= v <= 1.0 for v in g.values())
    assert all(v * 6 == round(v * 6) for k, v in g.items() if k.startswith("heldout") and "share" in k)  # 6 prompts
    assert set(summary["seconds"]) >= {"data (seed 0)", "data (seed 1)", "total_in_study"}
    # every headline again on the second split seed: mean and SD over both
    seeds = summary["split_seeds"]
    assert seeds["seeds"] == [0, 1] and set(seeds) == {"seeds", "mode", "prompt baseline", *ev}
    assert (run / "seed1_sweep_resid.json").is_file() is not lean  # lean: no sweep on further seeds
    assert printed.index("held-out setup (instructed") > held and "capab." in printed
    for m, r in ev.items():
        v = seeds[m]["recovered"]["values"]
        assert len(v) == 2 and v[0] == r["recovered"]["mean"] and v[1] != v[0]
        assert abs(seeds[m]["recovered"]["sd"] - abs(v[0] - v[1]) / 2**0.5) < 1e-9
    assert (run / "seed1_learned@0.05.safetensors").is_file() and "over 2 split seeds" in printed


def test_full_answer_scoring():
    """Full answers: equal to first-token scores for one-token answers (steered or not); multi-token
    answers sharing a first token are scored (first-token scoring refuses them), matching a
    token-by-token reference under the same steering."""
    from mechlie.control.steering import HeadSetMean, steer
    from mechlie.core.pairs import answer_sequences, tokenize

    model = word_model()
    pairs = word_pairs()
    neutral = ["the opposite of hot is cold", "Madrid is hot"]
    first = se.eval_set(model, "x", pairs, neutral, scoring="first")
    full = se.eval_set(model, "x", pairs, neutral, scoring="full")
    torch.testing.assert_close(full.base_lying.p_truth, first.base_lying.p_truth, atol=1e-5, rtol=1e-4)
    push = AddVectors({1: torch.randn(32, generator=torch.Generator().manual_seed(0))}, -3.0)
    a, b = se.score(model, full, "lying", [push]), se.score(model, first, "lying", [push])
    torch.testing.assert_close(a.p_truth, b.p_truth, atol=1e-5, rtol=1e-4)
    assert (a.p_truth - full.base_lying.p_truth).abs().max() > 1e-3  # the push did something

    multi = [replace(p, truth="Buenos Aires", lie="Buenos Delhi") for p in pairs[:3]]
    with pytest.raises(PairError, match="share a first token"):
        se.eval_set(model, "m", multi, neutral, scoring="first")
    m = se.eval_set(model, "m", multi, neutral, scoring="full")
    assert m.answers is None
    got = se.score(model, m, "lying", [push])

    def reference(prompt: str, answer: str) -> float:
        ids = tokenize(model, [prompt]).tokens[0].tolist()
        out = []
        for seq in answer_sequences(model.tokenizer, answer):
            with torch.no_grad(), steer(model, push):
                lp = model(torch.tensor([ids + seq])).log_softmax(-1)[0]
            out.append(sum(float(lp[len(ids) - 1 + t, tok]) for t, tok in enumerate(seq)))
        return float(torch.tensor(out).logsumexp(0))

    for i, p in enumerate(multi):
        assert len(answer_sequences(model.tokenizer, p.truth)[0]) == 2
        assert abs(float(got.logp_truth_seq[i]) - reference(p.lying, p.truth)) < 1e-4
        assert abs(float(got.logp_lie_seq[i]) - reference(p.lying, p.lie)) < 1e-4
    assert bool(got.correct[0]) == bool(got.logp_truth_seq[0] > got.logp_lie_seq[0])
    with pytest.raises(SteeringError, match="final-position mean patching"):
        se.score(model, m, "lying", [HeadSetMean(((0, 1),), torch.zeros(1, 8), torch.zeros(1, 8), -1.0)])
    with pytest.raises(ValueError, match="scoring must be one of"):
        se.eval_set(model, "m", multi, neutral, scoring="last")
