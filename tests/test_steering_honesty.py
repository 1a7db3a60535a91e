"""Steering that means honesty (issue 20), on tiny models: the prompting baseline, on-task costs at the
answer position, the recovery split into real lies and sharpening, gate shares, the held-out-relation
refusal, the honest-only control and the KL-to-honest-run objective, and budgets no scale meets."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import tiny_model as word_model
from steer_fixtures import word_pairs

from mechlie.control import edits
from mechlie.control.steering import AddVectors
from mechlie.core.pairs import PairError
from mechlie.studies import steering_eval as se

NEUTRAL = [
    "What is the capital of Spain ? Madrid is hot",
    "you are an assistant . Answer truthfully",
    "the opposite of hot is cold",
]


@pytest.fixture(scope="module")
def prepared():
    model = word_model(n_ctx=256)
    data = se.prepare(model, word_pairs(), val_frac=0.34, test_frac=0.34, progress=False)
    return model, data


def push(seed: int = 0, alpha: float = -3.0) -> AddVectors:
    v = torch.randn(32, generator=torch.Generator().manual_seed(seed))
    return AddVectors({1: v - v.mean()}, alpha)


def test_answer_kl_is_zero_for_a_zero_edit_and_positive_for_a_push(prepared):
    model, data = prepared
    zero = se.evaluate(model, data, se.Setting("resid", 1, 0.0), n_controls=0, n_boot=50)
    assert zero["kl_honest_answer"].mean < 1e-6 and zero["kl"].mean < 1e-6
    assert abs(zero["entropy_honest_steered"].mean - zero["entropy_honest_before"].mean) < 1e-5
    # the same measure, directly: a real push moves the answer distribution of the honest prompts
    es = data.test
    _, lp = se.final_scores(model, es, "honest", [push()])
    kl = se.answer_kl(es.clean_final["honest"], lp)
    assert (kl > 1e-3).all()
    assert se.answer_kl(es.clean_final["honest"], es.clean_final["honest"]).abs().max() < 1e-6
    # entropy of a uniform distribution over the vocabulary is log(vocab)
    v = lp.shape[-1]
    assert (
        abs(
            float(se.entropy(torch.full((1, v), -torch.log(torch.tensor(float(v)))))[0])
            - float(torch.log(torch.tensor(float(v))))
        )
        < 1e-4
    )


def test_recovery_split_sums_to_the_total_and_sorts_gain_by_source():
    g = torch.Generator().manual_seed(0)
    lo, hi = torch.rand(40, generator=g) * 0.3, 0.6 + torch.rand(40, generator=g) * 0.4
    p = lo + torch.rand(40, generator=g) * (hi - lo)
    lies = torch.rand(40, generator=g) > 0.5
    truthful = ~lies & (torch.rand(40, generator=g) > 0.5)
    parts = se.recovery_split(p, lo, hi, lies, truthful)
    total = se.gap_fraction(p, lo, hi)
    for idx in (torch.arange(40), torch.randint(0, 40, (40,), generator=g)):
        assert abs(float(sum(f(idx) for f in parts.values())) - float(total(idx))) < 1e-5
    # gain only on facts already answered truthfully is all sharpening
    only = torch.where(truthful, p, lo)
    parts = se.recovery_split(only, lo, hi, lies, truthful)
    every = torch.arange(40)
    assert float(parts["lies"](every)) == 0.0 and float(parts["sharpening"](every)) > 0.05


def test_evaluation_reports_the_split_the_flips_and_the_honest_accuracy(prepared):
    model, data = prepared
    r = se.evaluate(model, data, se.Setting("resid", 1, -3.0), n_controls=0, n_boot=50)
    parts = r["recovered_lies"].mean + r["recovered_sharpening"].mean + r["recovered_other"].mean
    assert abs(parts - r["recovered"].mean) < 1e-5
    assert abs(r["recovered"].mean) > 1e-3  # the setting did something, so the identity is not 0 = 0
    assert 0 <= r["lies_flipped"] <= r["n_lies"] == int(data.test.lying_rows().sum())
    assert r["honest_acc_before"].mean == float(data.test.base_honest.correct.float().mean())


def test_prompt_baseline_prompts_and_row(prepared):
    model, data = prepared
    p = data.test.pairs[0]
    pb = se.prompt_baseline(p.lying)
    assert pb.startswith(se.HONESTY_PREFIX) and pb.endswith(p.lying.rpartition("\n\nQ: ")[2])
    assert pb.index(se.HONEST_REMINDER) > pb.index(p.lying.split("\n\n")[0])  # after the demonstrations
    assert pb.index(se.HONEST_REMINDER) < pb.rindex("Q: ")  # before the final question
    r = se.evaluate_prompt(model, data.test, n_boot=50)
    assert r["method"] == "prompt baseline"
    for k in ("recovered", "honest_acc_steered", "kl", "kl_honest_answer", "recovered_sharpening"):
        assert k in r
    assert r["kl_honest_answer"].mean > 1e-4  # the prefix changes the answer distribution of a random model
    assert r["kl"].mean > 0 and r["n_neutral_lines"] + r["neutral_lines_dropped"] == len(data.test.neutral_text)


def test_heldout_relation_with_few_known_facts_is_refused_with_its_count():
    model = word_model(n_ctx=256)
    pairs = [replace(p, relation="a" if i < 4 else "b") for i, p in enumerate(word_pairs())]
    es = se.eval_set(model, "heldout", pairs, NEUTRAL)
    known = torch.tensor([True, True, True, False, True, True])
    es = replace(es, base_honest=replace(es.base_honest, correct=known))
    assert se.check_known(es, 2) == {"a": 3, "b": 2}
    with pytest.raises(PairError, match=r"fewer than 3 known facts refused \(b: 2 known facts\)"):
        se.check_known(es, 3)
    with pytest.raises(PairError, match=r"a: 3 known facts, b: 2 known facts"):
        se.check_known(es, 5)


def test_gate_report_gives_shares_above_half_not_means():
    model = word_model(n_ctx=256)
    d = model.cfg.d_model
    v, w = torch.randn(d), torch.zeros(d)
    # w = 0: the gate is sigmoid(b) everywhere; at b = 0.4 it is 0.599 > 0.5 on every token
    gate = edits.GatedVector(1, v, w, 0.4, model.cfg.model_name, d)
    prompts = {"lying": [p.lying for p in word_pairs()], "honest": [p.honest for p in word_pairs()]}
    r = se.gate_report(model, gate, prompts, NEUTRAL)
    assert r["lying_share_open"] == 1.0 and abs(r["lying_mean"] - 0.5987) < 1e-3
    shut = se.gate_report(model, replace(gate, b=-0.4), prompts, NEUTRAL)
    assert shut["honest_share_open"] == 0.0 and shut["neutral_tokens_share_open"] == 0.0
    assert all(0.0 <= x <= 1.0 for x in list(r.values()) + list(shut.values()))
    # a random control randomises the gate as well as the write
    ctrl = replace(gate, w=torch.randn(d)).random_control(3)
    assert not torch.equal(ctrl.w, replace(gate, w=torch.randn(d)).w) and ctrl.b == gate.b


def test_choice_notes_flag_an_unmet_budget_and_a_grid_edge():
    pts = [
        se.SweepPoint(se.Setting("resid", 1, a), "val", 0.5, r, kl)
        for a, r, kl in [(-1.0, 0.2, 0.01), (-2.0, 0.5, 0.05), (-3.0, 0.9, 0.09)]
    ]
    c = se.choose(pts, 0.1)
    n = se.choice_notes(pts, c, 0.1)
    assert c.alpha == -3.0 and n["at_grid_edge"] and n["met_kl_budget"]
    c = se.choose(pts, 0.06)
    assert c.alpha == -2.0 and not se.choice_notes(pts, c, 0.06)["at_grid_edge"]
    c = se.choose(pts, 0.001)  # no setting meets it: the lowest-KL one, reported as not meeting it
    assert c.alpha == -1.0 and not se.choice_notes(pts, c, 0.001)["met_kl_budget"]


def test_a_kl_budget_no_scale_meets_is_reported_not_clipped_to_zero():
    model = word_model()
    cfg = edits.TrainConfig(lam=0.0, kl_budget=1e-12, steps=5, progress=False)
    edit = edits.train_vector(model, word_pairs(), NEUTRAL, [1], cfg)
    assert edit.info["kl_budget_met"] is False and edit.info["train_kl"] > 1e-12
    assert edit.vectors[1].norm() > 0 and edit.info["projection_scale"] > 0
    ok = edits.train_vector(model, word_pairs(), NEUTRAL, [1], replace(cfg, kl_budget=10.0))
    assert ok.info["kl_budget_met"] is True


def test_honest_only_control_and_honest_kl_objective_train_what_they_say():
    model = word_model()
    pairs = word_pairs()
    base = edits.TrainConfig(lam=0.0, steps=8, progress=False)
    lying = edits.train_vector(model, pairs, NEUTRAL, [1], base)
    honest = edits.train_vector(model, pairs, NEUTRAL, [1], replace(base, prompts="honest"))
    assert honest.info["trained_prompts"] == "honest" and lying.info["trained_prompts"] == "lying"
    # the first step's loss is -log P(truth) of the unedited model on the prompts it trains on (all 6 rows)
    for edit, side in ((lying, "lying"), (honest, "honest")):
        want = -se.score_prompts(model, pairs, side).p_truth.log().mean()
        assert abs(edit.info["history"][0]["nll_truth"] - float(want)) < 1e-4, side
    assert abs(lying.info["history"][0]["nll_truth"] - honest.info["history"][0]["nll_truth"]) > 1e-3
    kl = edits.train_vector(model, pairs, NEUTRAL, [1], replace(base, objective="honest_kl", steps=15))
    hist = [h["honest_kl"] for h in kl.info["history"]]
    assert hist[0] > 1e-3 and min(hist[-3:]) < 0.8 * hist[0]  # KL to the honest run falls
    with pytest.raises(ValueError, match="objective must be one of"):
        edits.TrainConfig(objective="lies")
    with pytest.raises(ValueError, match="prompts must be"):
        edits.TrainConfig(prompts="neutral")


def test_controls_measure_recovery_on_every_draw_and_kl_on_the_first_few(prepared):
    model, data = prepared
    s = se.Setting("resid", 1, -3.0)
    c = se.controls(model, data, s, data.test, n_draws=4, seed=0, n_kl=2)
    assert len(c["recovered_draws"]) == 4 and len(c["kl_draws"]) == c["n_kl_draws"] == 2
    full = se.controls(model, data, s, data.test, n_draws=2, seed=0)
    assert c["kl_draws"] == full["kl_draws"] and c["recovered_draws"][:2] == full["recovered_draws"]
    r = se.evaluate(model, data, s, n_controls=4, n_boot=50, n_control_kl=1)
    assert r["control"]["n_kl_draws"] == 1 and 1 / 5 <= r["control"]["p_value"] <= 1.0


def test_a_set_without_an_honest_lying_gap_reports_no_recovery(prepared):
    """Recovery divides by the honest - lying P(truth) gap: where there is none (the model ignores the
    request to lie), every table prints n/a with the gap, not a ratio over ~0."""
    from mechlie.studies.steering_result import _heldout_line, _row

    model, data = prepared
    es = data.test
    r = se.evaluate(model, data, se.Setting("resid", 1, -3.0), n_controls=0, n_boot=50)
    gap = float(es.base_honest.p_truth.mean() - es.base_lying.p_truth.mean())
    assert abs(r["gap"] - gap) < 1e-6 and r["no_gap"] == (gap < se.NO_GAP)
    # the same set with its lying baseline replaced by the honest one: no gap at all
    flat = replace(es, base_lying=es.base_honest)
    lying_s, lp_l = se.final_scores(model, es, "lying")
    honest_s, lp_h = se.final_scores(model, es, "honest")
    ne = se.neutral_effects(model, es.neutral, es.clean_neutral, [])
    none = se.effects(flat, lying_s, honest_s, {"honest": lp_h, "lying": lp_l}, ne, n_boot=20)
    assert none["gap"] == 0.0 and none["no_gap"]
    as_dicts = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in none.items()}
    assert "n/a (no gap: 0.000)" in _row("x", "y", as_dicts)
    line = _heldout_line("x", as_dicts, 0.1)
    assert "recovered n/a (no gap: 0.000)" in line and "sharpening" not in line and "honest-only" not in line
    assert "n/a" in _row("x", "y", as_dicts).split("(no gap: 0.000)")[1]  # the lies / sharpening columns too
    # with a gap, the row shows the recovery and its CI
    real = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in r.items()} | {"gap": 0.2, "no_gap": False}
    assert "n/a" not in _row("x", "y", real) and f"{r['recovered'].mean:.3f}" in _row("x", "y", real)
