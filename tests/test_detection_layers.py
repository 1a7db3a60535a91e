"""The detection study's layer scan (:func:`mechlie.studies.detection_steps.layer_scan`): the reported
probe's validation AUROC per layer over split seeds, its CI, and the headline line that states it."""

import json
from pathlib import Path

import pytest
import torch

from mechlie.read.detector import DetectorError, LabelledSet
from mechlie.studies.detection_figures import headline, layer_scan_lines, report_text
from mechlie.studies.detection_steps import layer_scan

N_FACTS, N_LAYERS, D = 40, 6, 32
PLANTED = 3


def _set(shift: float, seed: int = 0) -> LabelledSet:
    """One honest (0) and one lying (1) row per fact, noise at every layer; ``shift`` added to one
    coordinate of the lying rows at layer ``PLANTED`` only."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * N_FACTS, N_LAYERS, D, generator=g)
    X[N_FACTS:, PLANTED, 0] += shift
    y = torch.cat([torch.zeros(N_FACTS), torch.ones(N_FACTS)])
    return LabelledSet("synthetic", X, y, [f"f{i}" for i in range(N_FACTS)] * 2)


def _scan(shift: float, kind: str = "logistic") -> dict:
    return layer_scan(_set(shift), kind, n_splits=5, seed=0, n_boot=200)


def test_planted_layer_is_chosen_and_its_ci_excludes_every_other_layer():
    sc = _scan(8.0)
    assert sc["layer"] == PLANTED and sc["probe"] == sc["fit"] == "logistic"
    assert sc["n_seeds"] == 5 and len(sc["per_seed"]) == 5 and len(sc["mean"]) == N_LAYERS
    others_hi = max(h for i, h in enumerate(sc["hi"]) if i != PLANTED)
    assert sc["lo"][PLANTED] > 0.9 and sc["lo"][PLANTED] - others_hi > 0.1  # far apart, not float noise
    assert sc["overlapping"] == [] and not sc["noise_level"] and sc["p_best"] > 0.95
    assert all(sc["lo"][i] <= sc["mean"][i] <= sc["hi"][i] for i in range(N_LAYERS))
    # The mean over seeds is the mean of the per-seed AUROCs; the SD is their spread.
    per_seed = torch.tensor(sc["per_seed"])
    assert torch.allclose(per_seed.mean(0), torch.tensor(sc["mean"]))
    assert torch.allclose(per_seed.std(0), torch.tensor(sc["sd"]))
    (line,) = layer_scan_lines({"layer_scan": sc})
    assert f"read layer {PLANTED}," in line and "no other layer's CI overlaps it" in line and "noise-level" not in line


def test_no_signal_the_intervals_overlap_and_the_line_says_noise_level():
    sc = _scan(0.0)
    assert sc["noise_level"] and len(sc["overlapping"]) >= 3
    assert sc["mean"][sc["layer"]] < 0.8 and sc["p_best"] < 0.8  # no layer stands out
    (line,) = layer_scan_lines({"layer_scan": sc})
    assert "noise-level choice" in line and f"{len(sc['overlapping'])} other layers" in line


def test_each_validation_split_is_disjoint_from_its_fit_facts_and_seeds_are_distinct():
    sc = _scan(8.0)
    assert len(set(sc["seeds"])) == sc["n_seeds"] and sc["n_skipped_seeds"] == 0
    # Every counted split validates on ~30% of the facts; pooled, most facts are validated at least once.
    assert 0.5 * N_FACTS < sc["n_val_facts"] <= N_FACTS


def test_ensemble_scans_its_base_fit_and_too_few_facts_raise():
    sc = _scan(8.0, "ensemble")
    assert sc["probe"] == "ensemble" and sc["fit"] == "diff_of_means" and sc["layer"] == PLANTED
    with pytest.raises(DetectorError, match="too few"):
        layer_scan(_set(8.0).subset({"f0", "f1", "f2"}), "logistic")
    # A split counts only with enough of each label in its validation facts; none counting is an error.
    with pytest.raises(DetectorError, match="no split seed"):
        layer_scan(_set(0.0).subset({f"f{i}" for i in range(8)}), "logistic", min_val_per_class=20)


def test_an_old_summary_renders_as_before_and_a_new_one_adds_one_line():
    path = Path(__file__).resolve().parents[1] / "docs/results/detection.summary.json"
    if not path.is_file():
        pytest.skip("no committed detection summary")
    old = json.loads(path.read_text())
    old.pop("layer_scan", None)
    before = headline(old)
    assert not any("read layer" in ln for ln in before)
    new = {**old, "layer_scan": _scan(8.0)}
    after = headline(new)
    assert len(after) == len(before) + 1 and [ln for ln in after if "read layer" not in ln] == before
    mx = {"matrix": {}}
    assert "layer scan (logistic" in report_text(new, mx) and "layer scan" not in report_text(old, mx)
    fallback = {**old, "layer_scan": {"probe": "logistic", "layer": None, "fallback": "few rows", "framing_layer": 4}}
    (line,) = [ln for ln in headline(fallback) if "read layer" in ln]
    assert "no layer scan (few rows)" in line and "framing layer 4" in line
