import random

import pytest
import torch

from mechlie.core.models import model_id
from mechlie.core.pairs import ContrastPair, neutral_lines
from mechlie.read.detector import Detector, DetectorError, calibrate_threshold, fit_detector
from tests.conftest import WORDS, tiny_model


def sentences(n: int, seed: int, extra: str = "") -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=6)) + extra for _ in range(n)]


def tiny_pairs(n: int = 40, seed: int = 0) -> list[ContrastPair]:
    base = sentences(n, seed)
    return [ContrastPair(f"honest {b} A :", f"liar {b} A :", "Paris", "Rome", f"f{i}") for i, b in enumerate(base)]


def test_calibrated_threshold_gives_its_fpr_on_held_out_controls(tiny):
    controls = sentences(400, seed=5)
    det = fit_detector(tiny, tiny_pairs(), controls[:200], probe="diff_of_means", layers=(-1,), fpr=0.1)
    assert det.info["control_fpr"] <= 0.1 + 1e-9
    held_out = det.score(tiny, controls[200:]).scores
    fpr = det.flag(held_out).float().mean().item()
    assert 0.02 <= fpr <= 0.2, fpr  # 0.1 expected; binomial sd with 200 controls is 0.02


def test_calibrate_threshold_quantile():
    c = torch.arange(100.0)
    assert calibrate_threshold(c, 0.05) == 95.0
    assert (c > calibrate_threshold(c, 0.05)).float().mean().item() == pytest.approx(0.04)
    with pytest.raises(DetectorError):
        calibrate_threshold(c, 1.5)


@pytest.mark.parametrize("probe,layers", [("logistic", (1,)), ("ensemble", (0, 1, 2))])
def test_saved_detector_reloads_to_identical_scores(tiny, tmp_path, probe, layers):
    pairs = tiny_pairs()
    det = fit_detector(tiny, pairs, neutral_lines(), probe=probe, layers=layers)
    path = det.save(tmp_path / "det.safetensors")
    again = Detector.load(path)
    assert again.threshold == det.threshold and again.layers == det.layers and again.model_hash == det.model_hash
    a, b = det.score(tiny, pairs), again.score(tiny, pairs)
    assert torch.equal(a.scores, b.scores) and again.position == det.position == "prompt_final"
    # It separates the two framings it was trained on.
    assert a.scores[a.framing == 1].mean() > a.scores[a.framing == 0].mean()
    # Token by token: the final prompt token's score is score()'s, whatever the answer after it.
    for p, s in zip(pairs[:3], a.scores[len(pairs) : len(pairs) + 3]):
        ts = again.score_tokens(tiny, p.lying)
        assert len(ts.scores) > ts.n_prompt and ts.scores[ts.n_prompt - 1].item() == pytest.approx(s.item(), abs=1e-4)
        assert ts.position_score == pytest.approx(s.item(), abs=1e-4)


def test_detector_refuses_another_model(tiny):
    det = fit_detector(tiny, tiny_pairs(), neutral_lines(), probe="diff_of_means", layers=(0,))
    other = tiny_model(seed=1)
    assert model_id(other) != model_id(tiny)
    assert model_id(tiny_model(seed=0)) == model_id(tiny)
    assert model_id(tiny) == model_id(tiny) and len(model_id(tiny)) == 16
    with pytest.raises(DetectorError, match="weights"):
        det.score(other, ["Q A"])
    with pytest.raises(DetectorError, match="d_model"):
        det.score(tiny_model(d_model=48, d_head=12), ["Q A"])


def test_bad_detector_input(tiny, tmp_path):
    with pytest.raises(DetectorError, match="one layer"):
        fit_detector(tiny, tiny_pairs(), neutral_lines(), probe="logistic", layers=(0, 1))
    with pytest.raises(DetectorError, match="control"):
        fit_detector(tiny, tiny_pairs(), ["one"], probe="logistic")
    bad = tmp_path / "x.safetensors"
    bad.write_text("not a detector")
    with pytest.raises(DetectorError, match="safetensors"):
        Detector.load(bad)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(DetectorError, match="not found"):
        Detector.load(tmp_path / "missing")


def test_detect_script_end_to_end_on_tiny_model(monkeypatch, tmp_path):
    import json

    import mechlie.core.models
    from mechlie.studies.base import launch, load_result
    from mechlie.studies.detection import STUDY, DetectionResult

    model = tiny_model(n_ctx=256)
    monkeypatch.setattr(mechlie.core.models, "load_model", lambda *a, **k: model)
    argv = [
        "--relations",
        "capitals",
        "opposites",
        "numbers",
        "--n-pairs",
        "10",
        "--k",
        "2",
        "--no-known-filter",
        "--probes",
        "diff_of_means",
        "logistic",
        "lat",
        "--n-null",
        "3",
        "--n-random",
        "20",
        "--n-boot",
        "50",
        "--fpr",
        "0.1",
        "--n-control-prompts",
        "8",
        "--grad-features",
        "--full-matrix",
        "--out-dir",
        str(tmp_path),
    ]
    assert launch(STUDY, argv=argv) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["loro"]) == {"diff_of_means", "logistic", "lat"}
    assert set(summary["grad_features"]) == {"z", "z x grad", "z + z x grad"}
    det = Detector.load(run / "detector.safetensors")
    assert det.threshold == summary["detector"]["threshold"]
    # Both layer rules are reported; the tiny model knows no fact, so the on-policy rule falls back.
    assert set(summary["layers"]) == {"framing", "on-policy", "used"}
    assert summary["layers"]["on-policy"]["rule"].startswith("fallback")
    assert summary["layer"] == summary["layers"]["framing"]["layer"]
    # Controls: >= 300 neutral windows plus honest prompts; the held-out FPR and recall have CIs.
    assert summary["n_controls"]["neutral_windows"] >= 300 and summary["n_controls"]["honest_prompts_other_facts"] == 8
    cal = summary["detector_framing"]["calibration"]
    assert set(cal) == {"0.1", "0.05", "0.05 (honest-prompt controls only)"}
    h = cal["0.1"]["held_out_fpr"]
    assert h["lo"] <= h["mean"] <= h["hi"] and cal["0.1"]["n_calibration"] + cal["0.1"]["n_held_out"] > 300
    assert Detector.load(run / "detector_framing.safetensors").threshold == cal["0.1"]["threshold"]
    # Each saved detector stores where it reads; the framing one at the final prompt token.
    assert Detector.load(run / "detector_framing.safetensors").position == "prompt_final"
    assert det.position in ("prompt_final", "answer_first")
    # Apollo's protocol: in-format controls, the saved detector scores as calibrated, token views.
    ap = summary["apollo"]
    assert ap["n_controls"]["benign requests"] == 64 and ap["n_controls"]["own honest answers"] >= 8
    assert ap["main"] == "framing / answer_mean" and ap["score_check_max_abs_diff"] < 1e-4
    assert Detector.load(run / "detector_apollo.safetensors").position == "answer_mean"
    assert (run / "token_scores_lying.html").is_file() and "recall at 10% FPR (in-format controls)" in (
        load_result(run).report()
    )
    matrix = json.loads((run / "matrix.json").read_text())
    assert "capitals" in matrix["matrix"]["logistic"]
    # The result reads back from the run folder; its headline comes from summary.json alone.
    result = load_result(run)
    assert isinstance(result, DetectionResult) and set(summary["figures"]) == set(result.figures())
    assert DetectionResult(tmp_path, summary).headline() == result.headline()
    assert "grad features, z x grad: LORO mean AUROC" in result.report()
    # Bad flags fail before any model loads.
    monkeypatch.setattr(mechlie.core.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert launch(STUDY, argv=["--probes", "svm", "--out-dir", str(tmp_path)]) == 2


def _sets(seed: int = 0):
    from mechlie.read.detector import LabelledSet

    g = torch.Generator().manual_seed(seed)
    n, L, d = 100, 3, 64
    X = torch.randn(2 * n, L, d, generator=g)
    X[n:, 2, 0] += 4.0  # only layer 2 carries the label
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    facts = [f"f{i}" for i in range(n)] * 2
    return LabelledSet("a", X, y, facts)


def test_choose_layer_and_splits_never_leak_a_fact():
    from mechlie.read.detector import choose_layer, evaluate_transfer
    from mechlie.read.directions import split_by_fact

    s = _sets()
    layer, val = choose_layer([s])
    assert layer == 2 and val[2] > 0.9 > val[0]
    sp = split_by_fact(s.facts, 0.3, 0)
    tr = s.subset({s.facts[i] for i in sp.train})
    te = s.subset({s.facts[i] for i in sp.test})
    assert not set(tr.facts) & set(te.facts) and len(tr.y) + len(te.y) == len(s.y)
    assert len(tr.pairs()) == len(tr.y) // 2  # each fact's two rows form one pair
    _, (cell,), _, (draws,) = evaluate_transfer(tr, [te], "logistic", 2, n_null=10, n_random=50, n_boot=100)
    assert cell.auroc > 0.9 and cell.lo <= cell.auroc <= cell.hi and draws.shape == (100,)
    # The nulls know nothing: permuted labels and random directions stay far below on average.
    assert cell.null_shuffled_mean < 0.7 and cell.null_random_mean < 0.75
    assert cell.null_shuffled_q95 < cell.auroc and cell.null_random_q95 < cell.auroc
    _, (c0,), _, _ = evaluate_transfer(tr, [te], "logistic", 0, n_null=5, n_random=20, n_boot=50)
    assert c0.auroc < 0.8  # a layer without the signal


def test_choose_layer_rules_ties_and_too_few_examples():
    from mechlie.read.detector import LabelledSet, choose_layer

    s = _sets()
    layer, val = choose_layer([s], n_splits=3)
    assert layer == 2 and val.shape == (3,)
    # Ties go to the earliest layer: the same perfect signal in layers 1 and 2.
    X = s.X.clone()
    X[100:, 1:, 0] += 20.0  # perfectly separable at layers 1 and 2
    layer, val = choose_layer([LabelledSet("tie", X, s.y, s.facts)])
    assert val[1] == val[2] == 1.0 and layer == 1
    # Too few examples of one class in every validation split: a clear error, never a silent pick.
    few = s.subset({f"f{i}" for i in range(100)})
    keep = [i for i in range(len(few.y)) if few.y[i] == 0 or i < 103]  # 3 lying rows in all
    few = LabelledSet("few", few.X[keep], few.y[keep], [few.facts[i] for i in keep])
    with pytest.raises(DetectorError, match="too few"):
        choose_layer([few], min_val_per_class=3, n_splits=4)


def test_held_out_calibration_fpr_and_recall():
    from mechlie.read.detector import held_out_calibration, neutral_windows

    g = torch.Generator().manual_seed(0)
    units = [f"u{i // 2}" for i in range(2000)]  # two rows per unit
    control = torch.randn(2000, generator=g)
    lies = torch.randn(300, generator=g) + 2.0
    facts = [f"l{i}" for i in range(300)]
    cal = held_out_calibration(control, units, {"lies": (lies, facts)}, 0.05, n_boot=200)
    assert cal.n_calibration + cal.n_held_out == 2000 and abs(cal.n_calibration - 1000) <= 2
    # The threshold is the 95th percentile of N(0, 1) (1.645) up to sampling error of 1000 rows.
    assert 1.45 < cal.threshold < 1.85
    h = cal.held_out_fpr
    assert 0.02 < h.mean < 0.08 and h.lo <= h.mean <= h.hi and h.n == 500
    # Recall of N(2, 1) lies above 1.645 is about 0.64.
    r = cal.recall["lies"]
    assert 0.5 < r.mean < 0.78 and r.lo < r.mean < r.hi and r.n == 300
    with pytest.raises(DetectorError, match="units"):
        held_out_calibration(control, units[:10], {}, 0.05)
    texts, line_units = neutral_windows()
    assert len(texts) >= 300 and len(set(line_units)) >= 100 and len(texts) == len(line_units)
    assert all(t and t in " ".join(neutral_lines()) for t in texts[:20])


def test_bootstrap_auroc_equals_the_resampling_reference():
    """The vectorised bootstrap (multiplicities per fact) equals resampling facts and recomputing."""
    from mechlie.core.stats import auroc, bootstrap_tensor
    from mechlie.read.detector import bootstrap_auroc

    g = torch.Generator().manual_seed(3)
    groups = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(20)] + [[60], [61]]
    y = torch.tensor([float(i % 2) for i in range(62)])
    s = torch.randn(62, generator=g) + y
    s[5] = s[8]  # a tie between classes counts half

    def stat(idx: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([torch.tensor(groups[i]) for i in idx.tolist()])
        yy = y[rows]
        if yy.min() == yy.max():
            return torch.tensor(float("nan"))
        return auroc(s[rows][yy == 1], s[rows][yy == 0])

    ref = bootstrap_tensor(stat, len(groups), n_boot=300, seed=7)
    got = bootstrap_auroc(s, y, groups, n_boot=300, seed=7)
    assert torch.allclose(got.draws, ref.draws, atol=1e-5, equal_nan=True)
    assert got.mean.item() == pytest.approx(ref.mean.item(), abs=1e-6)
    assert got.lo.item() == pytest.approx(ref.lo.item(), abs=1e-5) and got.hi.item() == pytest.approx(
        ref.hi.item(), abs=1e-5
    )
    with pytest.raises(DetectorError, match="both classes"):
        bootstrap_auroc(s, torch.zeros(62), groups)
