"""Apollo's protocol and positions on tiny random models: a detector scores where it was calibrated
(``score()`` gives back the calibration scores at every position), in-format controls give the requested
FPR, recall at 1% FPR has honest CIs, and the per-token view is written."""

from __future__ import annotations

import json
import logging
import random
from types import SimpleNamespace

import pytest
import torch

from mechlie.core.pairs import ContrastPair
from mechlie.read.detector import (
    POSITIONS,
    Detector,
    DetectorError,
    calibrate_threshold,
    calibrated_detector,
    fit_detector,
    recall_at_fpr,
)
from tests.conftest import WORDS, tiny_model

CONTEXT = [
    "Q What is the capital of Spain ? A Madrid",
    "Q What is the capital of Peru ? A Lima",
    "Q What is the capital of Cuba ? A Havana",
    "Q What is the capital of Kenya ? A Nairobi",
]
COUNTRIES = "France Spain Italy Japan Peru Chile Egypt Kenya Cuba Iran".split()


def varied_sentences(n: int, seed: int) -> list[str]:
    """Sentences of 3 to 9 words: different lengths, so batches are padded differently."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 9))) for _ in range(n)]


def framing_pairs(n: int = 24, seed: int = 0) -> list[ContrastPair]:
    base = varied_sentences(n, seed)
    return [ContrastPair(f"honest {b} A", f"liar {b} A", "Paris", "Rome", f"f{i}") for i, b in enumerate(base)]


# -- positions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", POSITIONS)
def test_score_reproduces_the_calibration_scores(tiny, position):
    """Same control prompts -> the same numbers the threshold was set on, whatever the batching."""
    controls = varied_sentences(60, seed=3)
    det = fit_detector(
        tiny, framing_pairs(), controls, probe="logistic", layers=(1,), fpr=0.05, position=position,
        max_new_tokens=4, batch_size=7,
    )  # fmt: skip
    assert det.position == position and det.control_scores.shape == (60,)
    got = det.score(tiny, controls, batch_size=16)
    assert got.position == position
    assert torch.allclose(got.scores, det.control_scores, atol=1e-4, equal_nan=True)
    assert torch.isfinite(got.scores).all()  # the tiny model never stops early: every row has a state
    # The realised FPR on those controls is the requested one, within 1/n.
    share = det.flag(got.scores).double().mean().item()
    assert 0.05 - 1 / 60 - 1e-9 <= share <= 0.05 + 1e-9
    if position != "prompt_final":
        assert got.texts is not None and len(got.texts) == 60


def test_positions_read_different_states_and_an_override_is_logged(tiny, caplog):
    controls = varied_sentences(20, seed=4)
    det = fit_detector(tiny, framing_pairs(), controls, probe="diff_of_means", layers=(2,), position="answer_mean")
    with caplog.at_level(logging.INFO, logger="mechlie.read.detector"):
        first = det.score(tiny, controls, position="answer_first").scores
    assert "not at answer_mean" in caplog.text
    mean = det.score(tiny, controls).scores
    prompt = det.score(tiny, controls, position="prompt_final").scores
    assert (first - mean).abs().max() > 1e-3 and (prompt - mean).abs().max() > 1e-3
    with pytest.raises(DetectorError, match="position"):
        det.score(tiny, controls, position="answer_last")


def test_position_round_trip_and_older_files(tiny, tmp_path, caplog):
    from mechlie.core.io import load_tensors, save_tensors

    det = fit_detector(tiny, framing_pairs(), varied_sentences(30, 5), layers=(1,), position="answer_first")
    det = fit_detector(
        tiny, framing_pairs(), varied_sentences(30, 5), layers=(1,), position="answer_mean", max_new_tokens=5
    )
    again = Detector.load(det.save(tmp_path / "det.safetensors"))
    assert (again.position, again.max_new_tokens) == ("answer_mean", 5)
    assert torch.equal(again.control_scores, det.control_scores)
    assert torch.allclose(again.score(tiny, ["Q Paris A"]).scores, det.score(tiny, ["Q Paris A"]).scores)
    # A file saved before the position was stored loads as prompt_final (where it scored), with a note.
    tensors, meta = load_tensors(tmp_path / "det.safetensors")
    for k in ("position", "max_new_tokens"):
        del meta["mechlie_detector"][k]
    save_tensors(tmp_path / "old.safetensors", {"probe": tensors["probe"]}, meta)
    with caplog.at_level(logging.INFO, logger="mechlie.read.detector"):
        old = Detector.load(tmp_path / "old.safetensors")
    assert old.position == "prompt_final" and old.control_scores is None
    assert "stores no position" in caplog.text


def test_score_tokens_and_the_circuitsvis_view(tiny, tmp_path):
    from mechlie.report.views import write_token_scores

    det = fit_detector(tiny, framing_pairs(), varied_sentences(30, 6), layers=(1,), position="answer_mean")
    prompt = "honest Q What is the capital of France ? A"
    ts = det.score_tokens(tiny, prompt)
    # Greedy answer: the same number as score() at the detector's position.
    assert ts.position_score == pytest.approx(det.score(tiny, [prompt]).scores.item(), abs=1e-4)
    assert len(ts.tokens) == len(ts.scores) and ts.n_prompt == 10 and len(ts.tokens) > ts.n_prompt
    given = det.score_tokens(tiny, prompt, generation=" Paris Rome")
    assert given.tokens[given.n_prompt :] == ["Paris", "Rome"] and given.answer == " Paris Rome"
    # Same prompt: the prompt tokens' scores do not depend on the answer (causal model).
    assert torch.allclose(given.scores[: given.n_prompt], ts.scores[: ts.n_prompt], atol=1e-5)
    html = write_token_scores(given, tmp_path, name="view")
    page = html.read_text()
    assert "Rome" in page and "capital" in page and "colored" in page.lower()
    numbers = json.loads((tmp_path / "view.json").read_text())
    assert numbers["tokens"] == given.tokens and len(numbers["scores"]) == len(given.tokens)
    assert numbers["flagged"] == (given.position_score > det.threshold)


# -- recall at a control FPR --------------------------------------------------------------------


def test_calibrate_threshold_gives_the_fpr_within_one_over_n():
    g = torch.Generator().manual_seed(1)
    for n in (100, 200, 333, 1000):
        c = torch.randn(n, generator=g)
        for fpr in (0.01, 0.05, 0.1):
            share = (c > calibrate_threshold(c, fpr)).double().mean().item()
            assert fpr - 1 / n - 1e-9 <= share <= fpr + 1e-9, (n, fpr, share)


def test_recall_at_fpr_matches_the_normal_model():
    g = torch.Generator().manual_seed(0)
    control = torch.randn(2000, generator=g)
    lies = torch.randn(600, generator=g) + 3.0
    r = recall_at_fpr(lies, [f"f{i // 3}" for i in range(600)], control, [f"c{i}" for i in range(2000)], 0.01)
    # P(N(3, 1) > z_0.99 = 2.326) = 0.75; AUROC = Phi(3 / sqrt 2) = 0.983.
    assert 0.65 < r.recall.mean < 0.85 and r.recall.lo < r.recall.mean < r.recall.hi and r.recall.n == 200
    assert 0.97 < r.auroc.mean < 0.995 and r.auroc.lo < r.auroc.mean < r.auroc.hi
    assert r.control_fpr <= 0.01 and r.threshold == pytest.approx(2.326, abs=0.25)
    # Lies drawn like the controls are flagged at about the FPR, and AUROC is about chance.
    same = recall_at_fpr(control[:500], [str(i) for i in range(500)], control[500:], list(map(str, range(1500))))
    assert same.recall.mean < 0.05 and 0.4 < same.auroc.mean < 0.6
    with pytest.raises(DetectorError, match="unit"):
        recall_at_fpr(lies, ["a"], control, [f"c{i}" for i in range(2000)])


# -- the protocol on a tiny model that lies -------------------------------------------------------


def lying_tiny_on_policy(model, n: int = 24):
    """On-policy answers of a random model whose "truths" are its own greedy honest answers and whose
    relation accepts every word, so its samples at a low temperature hold lies *and* truths."""
    from mechlie.core.generation import generate
    from mechlie.read.labels import on_policy

    qs = [f"What is the capital of {COUNTRIES[i % 10]} ?" for i in range(n)]
    honest = [f"{CONTEXT[i % 4]} {CONTEXT[(i + 1 + i // 4) % 4]} Q {q} A" for i, q in enumerate(qs)]
    truths = [t.split()[0] for t in generate(model, honest, max_new_tokens=3).texts]
    pairs = [
        ContrastPair(h, f"liar always lie {h}", t, "Rome" if t != "Rome" else "Lima", f"f{i}", "custom", q)
        for i, (h, t, q) in enumerate(zip(honest, truths, qs))
    ]
    return on_policy(model, pairs, k=6, temperature=0.3, max_new_tokens=4, answers={"custom": list(WORDS)})


def apollo_cfg(**kw):
    base = dict(
        relations=("capitals", "opposites"), fmt=("fewshot",), n_control_prompts=10, n_benign=40, seed=0,
        batch_size=8, detector_probe="logistic", max_new_tokens=4, fpr=0.05, n_boot=100, known_filter=True,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_benign_requests_and_asking_them_in_format():
    from mechlie.core.pairs import load_builtin
    from mechlie.studies.detection_apollo import ask_instead, benign_requests

    reqs = benign_requests(64, seed=0)
    assert len(reqs) == 64 and len({r for r, _ in reqs}) >= 60
    assert not any("{word}" in r for r, _ in reqs) and any(r.startswith("Spell the word ") for r, _ in reqs)
    assert len({u for _, u in reqs}) >= 25  # units: the file's lines
    assert benign_requests(10, seed=1) != benign_requests(10, seed=2)
    for fmt in ("fewshot", "instruct"):
        p = load_builtin("capitals", fmt, n=1)[0]
        asked = ask_instead(p, "Name a fruit.")
        assert asked.endswith("Q: Name a fruit.\nA:") and p.question not in asked
        assert asked[: asked.rindex("Name")] == p.honest[: p.honest.rindex(p.question)]


def test_apollo_protocol_end_to_end_on_a_lying_tiny_model(tmp_path):
    from mechlie.core.activations import collect
    from mechlie.read.detector import neutral_windows
    from mechlie.studies.detection_apollo import apollo, in_format_controls

    model = tiny_model(n_ctx=256)
    op = lying_tiny_on_policy(model)
    facts = [p.fact_id for p in op.pairs]
    train, test = set(facts[::2]), set(facts[1::2])
    texts, units = neutral_windows()
    neutral = collect(model, texts[:80], kinds=("resid_post",), progress=False)["resid_post"], units[:80]
    cfg = apollo_cfg()
    out = apollo(model, cfg, op, train, test, 1, neutral, tmp_path)
    assert {"on-policy / answer_first", "on-policy / answer_mean", "framing / answer_mean"} <= set(out["detectors"])
    assert out["main"] == "on-policy / answer_mean" and out["n_test_lies"] > 20
    for name, d in out["detectors"].items():
        for cset in ("in-format", "own honest answers", "benign requests", "neutral text"):
            r = d["vs_controls"][cset]
            assert r["recall"]["lo"] <= r["recall"]["mean"] <= r["recall"]["hi"], (name, cset)
            assert r["control_fpr"] <= cfg.fpr + 1e-9
        assert d["mixed_facts"] is not None and d["mixed_facts"]["n_facts"] >= 2
        assert d["lies_vs_truths"]["n_facts"] >= d["mixed_facts"]["n_facts"]
        g = d["greedy_lies_vs_in_format"]
        assert g is None or g["recall"]["lo"] <= g["recall"]["mean"] <= g["recall"]["hi"]
    sur = out["surprisal"]
    assert sur["vs_controls"]["in-format"]["recall"]["n"] >= 2 and sur["vs_controls"]["neutral text"] is None
    assert 0 <= sur["mixed_facts"]["auroc"] <= 1
    assert out["score_check_max_abs_diff"] < 1e-4 and out["score_check_n"] == 8
    assert (tmp_path / "token_scores_lying.html").is_file() and (tmp_path / "token_scores_honest.json").is_file()
    # The saved detector: in-format controls give the requested FPR within 1/n, and score() gives back
    # the scores it was calibrated on, prompt by prompt.
    det = Detector.load(tmp_path / "detector_apollo.safetensors")
    c = det.control_scores[torch.isfinite(det.control_scores)]
    assert det.position == "answer_mean" and len(c) == out["n_controls"]["own honest answers"] + 40
    share = (c > det.threshold).double().mean().item()
    assert cfg.fpr - 1 / len(c) - 1e-9 <= share <= cfg.fpr + 1e-9
    ctl = in_format_controls(model, cfg, op.pairs, op, test, [1], out["max_new_tokens"])
    ben = ctl["benign requests"]
    again = calibrated_detector(model, det.probe, "resid_post", [1], ben.at("answer_mean"), 0.05,
                                position="answer_mean", max_new_tokens=out["max_new_tokens"])  # fmt: skip
    assert torch.allclose(det.score(model, ben.prompts, batch_size=5).scores, again.control_scores, atol=1e-4)
