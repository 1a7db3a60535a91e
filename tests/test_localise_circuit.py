"""The localise study's edge-circuit stage, end to end on a tiny model (equal-length pairs)."""

import json

import torch
from conftest import tiny_model
from test_patching import make_pairs

from mechlie.studies.localise_circuit import SHARES, circuit_lines


def test_localise_runs_the_edge_circuit_stage(tmp_path, monkeypatch, capsys):
    import mechlie.core.kv
    import mechlie.core.pairs
    from mechlie.studies import localise
    from mechlie.studies.base import launch, load_result

    model = tiny_model(seed=3)
    monkeypatch.setattr(mechlie.core.kv, "load_model_split", lambda *a, **k: model)
    monkeypatch.setattr(mechlie.core.pairs, "load_builtin", lambda *a, **k: make_pairs())
    argv = "--n-random 4 --n-boot 20 --n-path-pairs 2 --receiver 2.1 --no-known-only --n-rerank 0 --n-split-seeds 0"
    argv += " --n-exact-edges 6 --n-exact-pairs 2 --n-edge-random 3 --ig-steps 2 --circuit-seeds 2"
    assert launch(localise.STUDY, argv=argv.split() + ["--out-dir", str(tmp_path)]) == 0
    (run,) = list(tmp_path.iterdir())
    s = json.loads((run / "summary.json").read_text())
    c = s["circuit"]
    assert (c["n_train"], c["n_test"]) == (s["n_train"], s["n_test"])
    assert c["unequal_length_left_out"] == {"train": 0, "test": 0}
    assert len(c["curve"]) == len(SHARES) and c["sizes"] == sorted(c["sizes"]) and c["sizes"][-1] < c["n_edges"]
    assert all(e["lo"] <= e["mean"] <= e["hi"] for e in c["curve"])
    assert c["null"]["n_draws"] == 3 and c["agreement"]["n_edges"] == 12 and len(c["edges"]) == 6
    assert -1 <= c["agreement"]["eap_ig"]["spearman"]["mean"] <= 1
    assert "edge_circuit" in s["stage_seconds"] and "circuit_seeds" in s["stage_seconds"]
    # the second split seed ranks and measures on its own split; the main seed's row is the main circuit
    cs = s["circuit_seeds"]
    assert cs["n_seeds"] == 2 and [r["seed"] for r in cs["seeds"]] == [0, 1]
    assert cs["seeds"][0]["minimal_share"] == c["minimal_share"]
    assert cs["seeds"][0]["spearman_eap_ig"] == c["agreement"]["eap_ig"]["spearman"]
    assert len(cs["spearman_eap_ig"]["values"]) == 2 - cs["n_skipped"]
    res = load_result(run)
    assert {"localise_faithfulness", "localise_edge_circuit"} <= set(res.figures())
    assert any("Edge circuit" in line for line in res.headline())
    assert "Attribution vs exact" in res.report() and "Over 2 split seeds" in res.report()
    # the stored exact effects are what the summary's top edges report (normalized by the same gap)
    from mechlie.core.io import load_tensors

    t, _ = load_tensors(run / "scores.safetensors")
    assert t["circuit_exact_effect"].shape == (2, 12)
    assert t["circuit_curve_logit_diff"].shape == (c["n_test"], len(SHARES))


def test_circuit_stage_is_skipped_with_a_reason_when_no_pair_has_equal_lengths(monkeypatch):
    from types import SimpleNamespace

    from mechlie.studies.localise_circuit import circuit_stage

    model = tiny_model(seed=3)
    pairs = make_pairs(equal_length=False)
    from mechlie.causal.edges import equal_length

    same = set(equal_length(model, pairs))
    unequal = [p for i, p in enumerate(pairs) if i not in same]
    assert len(unequal) >= 3
    cfg = SimpleNamespace(circuit_pairs=0)
    summary: dict = {}
    circuit_stage(model, cfg, unequal[:2], unequal[2:3], summary, {})
    assert "too few equal-length pairs" in summary["circuit"]["skipped"]
    assert summary["circuit"]["unequal_length_left_out"] == {"train": 2, "test": 1}
    assert circuit_lines(summary)[0].startswith("Edge circuit skipped")
    assert torch.is_grad_enabled()
