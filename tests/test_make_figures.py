"""make_figures on small saved runs built with tiny models: every file written, bad runs refused
with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_views import capital_pairs

from mechlie.report.figures import png_problem
from mechlie.studies.base import RunFormatError, load_result

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A head sweep, a patching sweep, a function-vector and a behaviour run of a tiny model, each
    written by its own study (through the launcher, but for the head sweep; the model and pairs patched in)."""
    from test_pipeline import _pairs_file

    import mechlie.core.kv
    import mechlie.core.metrics
    import mechlie.core.models
    import mechlie.core.pairs
    from mechlie.core.cli import prepare_run
    from mechlie.studies import behaviour, function_vectors, head_sweep, patching_sweep
    from mechlie.studies.base import launch

    tmp = tmp_path_factory.mktemp("runs")
    model = tiny_model(n_ctx=128)
    cfg = head_sweep.HeadSweepConfig(
        dataset=str(_pairs_file(tmp / "pairs.jsonl", n_rows=20)),
        known_only=False,
        n_patch=6,
        n_perm=30,
        n_random=30,
        n_boot=200,
        top_k=3,
        views=False,
        out_dir=str(tmp / "head_sweep"),
        run_name="tiny",
    )
    run = prepare_run(cfg)
    run.write_json("summary.json", head_sweep.run(cfg, model, run, progress=False).summary())

    pairs = capital_pairs(model, n_targets=6)  # words the tiny tokenizer knows, so honest and lying prompts differ
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(mechlie.core.kv, "load_model_split", lambda *a, **k: model)
        mp.setattr(mechlie.core.pairs, "load_builtin", lambda *a, **k: pairs)
        common = ["--n-boot", "50", "--run-name", "tiny"]
        argv = ["--layer-stride", "1", "--top-k", "3", "--out-dir", str(tmp / "patching_sweep")]
        assert launch(patching_sweep.STUDY, argv=argv + common) == 0
        # A random tiny model knows no fact: call every pair known so that the FV has pairs to use.
        known = lambda m, ps, **k: type("B", (), {"known": torch.ones(len(ps), dtype=torch.bool)})()  # noqa: E731
        mp.setattr(mechlie.core.metrics, "behaviour", known)
        argv = ["--k", "2", "--n-random", "5", "--out-dir", str(tmp / "function_vectors")]
        assert launch(function_vectors.STUDY, argv=argv + common) == 0
        mp.undo()
        mp.setattr(mechlie.core.models, "load_model", lambda *a, **k: model)
        mp.setattr(mechlie.core.pairs, "load_builtin", lambda *a, **k: pairs)
        argv = ["--formats", "fewshot", "--n-boot", "100", "--run-name", "tiny", "--out-dir", str(tmp / "behaviour")]
        assert launch(behaviour.STUDY, argv=argv) == 0
    finally:
        mp.undo()
    return {kind: tmp / kind / "tiny" for kind in ("head_sweep", "patching_sweep", "function_vectors", "behaviour")}


def test_make_figures_writes_every_file(runs, tmp_path):
    from analyses.make_figures import main

    out = tmp_path / "report" / "report.md"
    assert main([str(r) for r in runs.values()] + ["--out", str(out)]) == 0
    text = out.read_text()
    for kind, run in runs.items():
        result = load_result(run)
        assert result.study == kind
        figs = result.figures()
        assert figs and set(result.captions()) >= set(figs)
        folder = out.parent / f"{kind}-{run.name}"
        for stem in figs:
            for fmt in ("svg", "png"):
                f = folder / f"{stem}.{fmt}"
                assert f.is_file() and f.stat().st_size > 1000, f
                assert f"{kind}-{run.name}/{stem}.png" in text
            # The figures the run wrote when it ended are the same figures, drawn by the same code
            # (the behaviour study writes none when it runs).
            if kind != "behaviour":
                assert (run / f"{stem}.html").is_file() and ((run / f"{stem}.svg").is_file() or png_problem())
        assert result.title() in text and result.headline()[0] in text
        assert result.report()
    assert "Top head by patching" in text and "Top head by exact patching" in text and "cos(FV" in text
    assert not [p for p in out.parent.rglob(".*")]  # no temporary files left


def test_top_heads_have_ci_error_bars_and_the_runs_top_k(runs):
    result = load_result(runs["head_sweep"])
    s = result.summary()
    figs = result.figures()
    bar = figs["top_heads"].data[0]
    plus, minus = bar.error_y.array, bar.error_y.arrayminus
    assert len(bar.x) == s["top_k"] == 3  # the run's top_k, not a fixed number
    assert all(p >= 0 for p in plus) and all(m >= 0 for m in minus) and any(p > 0 for p in plus)
    top = s["top_heads_by_patching"]
    assert list(bar.y) == pytest.approx([t["effect"] for t in top])
    assert [y + p for y, p in zip(bar.y, plus)] == pytest.approx([t["hi"] for t in top])
    assert "over 6 pairs" in figs["top_heads"].layout.title.text
    ps = load_result(runs["patching_sweep"])
    bar = ps.figures()["top_heads_exact"].data[0]
    assert len(bar.x) == 3 and list(bar.y) == pytest.approx(
        [h["effect"]["mean"] for h in ps.summary()["heads"]["top_exact"]]
    )
    fv = load_result(runs["function_vectors"]).figures()["lying_minus_by_layer"]
    assert any(tr.fill == "toself" for tr in fv.data)  # CI bands over test pairs


def test_bad_runs_are_refused_before_writing(runs, tmp_path):
    from analyses.make_figures import main

    out = tmp_path / "r" / "report.md"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunFormatError, match="no summary.json"):
        load_result(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({"kind": "something_else"}))
    with pytest.raises(RunFormatError, match="not a run of a study"):
        load_result(other)
    old = tmp_path / "old"
    shutil.copytree(runs["head_sweep"], old)
    s = json.loads((old / "summary.json").read_text())
    del s["top_k"]
    (old / "summary.json").write_text(json.dumps(s))
    with pytest.raises(RunFormatError, match="older version"):
        load_result(old)
    for kind, name in (
        ("head_sweep", "directions.safetensors"),
        ("patching_sweep", "tensors.safetensors"),
        ("function_vectors", "tensors.safetensors"),
    ):
        missing = tmp_path / f"missing_{kind}"
        shutil.copytree(runs[kind], missing)
        (missing / name).unlink()
        with pytest.raises(RunFormatError, match="missing results file"):
            load_result(missing)
    # An old head sweep saved as a pickle is refused, never unpickled.
    pickled = tmp_path / "pickled"
    shutil.copytree(runs["head_sweep"], pickled)
    (pickled / "patching.safetensors").rename(pickled / "patching.pt")
    with pytest.raises(RunFormatError, match="never unpickled"):
        load_result(pickled)
    # A good run beside a bad one: one line, exit 2, and nothing written for either.
    assert main([str(runs["head_sweep"]), str(tmp_path / "missing_head_sweep"), "--out", str(out)]) == 2
    assert not out.parent.exists()


def test_sae_features_script_end_to_end(tmp_path, monkeypatch):
    """The SAE-features study on a tiny model, as analyses/sae_features.py launches it: trains two
    SAEs (one pass), decomposes, writes the run, the lying-head page and its figures (the cache
    itself is tested in test_sae.py)."""
    import mechlie.core.models
    from mechlie.studies.base import launch
    from mechlie.studies.sae_features import STUDY, SAEFeaturesResult

    model = tiny_model(n_ctx=256)
    monkeypatch.setattr(mechlie.core.models, "load_model", lambda *a, **k: model)
    monkeypatch.setenv("MECHLIE_CACHE", str(tmp_path / "cache"))
    argv = [
        "--model",
        "tiny",
        "--sites",
        "blocks.2.hook_resid_pre",
        "blocks.2.attn.hook_z:1",
        "--heads",
        "L2H1",
        "--n-pairs",
        "20",  # the word-level tokenizer leaves ~14 pairs whose truth and lie differ in their first token
        "--no-known-only",
        "--k",
        "3",
        "--k-causal",
        "2",
        "--n-draws",
        "20",
        "--n-steps",
        "30",
        "--expansion",
        "2",
        "--top-k",
        "4",
        "--pairs-per-format",
        "1",
        "--n-samples",
        "2",
        "--sae-seeds",
        "2",
        "--probe-null",
        "20",
        "--n-split-seeds",
        "2",
        "--out-dir",
        str(tmp_path / "out"),
        "--run-name",
        "r",
    ]
    assert launch(STUDY, argv=argv) == 0
    run = tmp_path / "out" / "r"
    s = json.loads((run / "summary.json").read_text())
    assert set(s["sites"]) == {"blocks.2.hook_resid_pre", "blocks.2.attn.hook_z:1"}
    assert s["sites"]["blocks.2.attn.hook_z:1"]["d_sae"] == 2 * model.cfg.d_head
    # Pairs whose truth and lie share a first token (unknown words, on this tokenizer) are left out and counted.
    assert s["n_known_pairs"] == 80 - s["n_dropped_shared_first_token"]
    assert "L2H1 (lying)" in (run / "lying_heads.html").read_text()
    assert (run / "heads_dla.png").is_file() and (run / "b2_resid_pre_features.svg").is_file()
    assert len(list((tmp_path / "cache" / "sae").iterdir())) == 4  # 2 sites x 2 SAE seeds
    # Every causal test run is in one Holm family; 20 draws cannot pass it, and the headline says so.
    assert s["causal_correction"]["n_tests"] == sum(
        len(x["causal"]) for r in s["sites"].values() for x in r["seeds"].values()
    )
    assert any("no causal test can pass Holm" in line for line in SAEFeaturesResult(run, s).headline())
    # The second split reruns every causal test (its own Holm family, the same size) with the same SAEs;
    # the main split's entries are the run's own numbers.
    sp = s["split_seeds"]["splits"]
    assert list(sp) == ["0", "1"] and sp["1"]["correction"]["n_tests"] == s["causal_correction"]["n_tests"]
    main_clamp = s["sites"]["blocks.2.hook_resid_pre"]["seeds"]["0"]["causal"]["clamp"]
    assert sp["0"]["sites"]["blocks.2.hook_resid_pre"]["seeds"]["0"]["causal"]["clamp"]["delta"] == main_clamp["delta"]
    assert s["split_seeds"]["over"]["blocks.2.hook_resid_pre"]["n_runs"] == 4  # 2 splits x 2 SAE seeds
    assert list(s["split_seeds"]["over"]) == list(s["sites"]) == ["blocks.2.hook_resid_pre", "blocks.2.attn.hook_z:1"]
    assert len(list((tmp_path / "cache" / "sae").iterdir())) == 4  # no SAE trained for the second split
    # The run wrote the figures make_figures draws (the same code, from the saved files); the
    # headline is built from summary.json alone, and the report names every site.
    result = load_result(run)
    assert isinstance(result, SAEFeaturesResult) and set(s["figures"]) == set(result.figures())
    assert {"b2_resid_pre_features", "b2_resid_pre_cosine", "heads_dla", "heads_demo_attention"} <= set(s["figures"])
    assert "b2_resid_pre_split_seeds" in s["figures"]
    assert SAEFeaturesResult(tmp_path, s).headline() == result.headline()
    assert "== blocks.2.attn.hook_z:1: SAE d_sae=" in result.report() and "L2H1" in result.report()
    # Bad input fails before any model loads, with nothing written.
    monkeypatch.setattr(
        mechlie.core.models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded"))
    )
    assert launch(STUDY, argv=["--sites", "blocks.x", "--out-dir", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory) -> dict[str, Path]:
    """Steering, detection and localise runs written by their own studies on tiny models, launched
    as analyses/steering_demo.py, detect.py and localise.py launch them."""
    from steer_fixtures import word_pairs
    from test_circuits import many_pairs

    import mechlie.core.kv
    import mechlie.core.models
    import mechlie.core.pairs
    from analyses import steering_demo
    from mechlie.studies import detection, localise
    from mechlie.studies.base import launch

    tmp = tmp_path_factory.mktemp("script_runs")
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(mechlie.core.models, "load_model", lambda *a, **k: tiny_model(n_ctx=256))
        mp.setattr(mechlie.core.pairs, "load_builtin", lambda *a, **k: word_pairs())
        argv = (
            "--model tiny --layers 1 2 --head-ks 2 --head-alphas -2 --resid-alphas -1 -3 --edit-budgets 0.05 "
            "--edit-scales -1 --edit-steps 3 --n-controls 3 --n-boot 50 --val-frac 0.34 --test-frac 0.34 "
            "--causal-pairs 2 --n-demo 2 --max-new-tokens 2 --methods resid iti learned --min-known 0"
        ).split() + ["--capability-n", "0"]  # a random tiny model answers no corpus question correctly
        from mechlie.studies.base import launch

        assert launch(steering_demo.STUDY, argv=argv + ["--out-dir", str(tmp / "steering")]) == 0
        mp.undo()
        model = tiny_model(n_ctx=256)
        mp.setattr(mechlie.core.models, "load_model", lambda *a, **k: model)
        argv = (
            "--relations capitals opposites numbers --n-pairs 10 --k 2 --no-known-filter --probes diff_of_means "
            "logistic --n-null 3 --n-random 20 --n-boot 50 --fpr 0.1 --n-control-prompts 8"
        ).split()
        assert launch(detection.STUDY, argv=argv + ["--out-dir", str(tmp / "detection")]) == 0
        mp.undo()
        mp.setattr(mechlie.core.kv, "load_model_split", lambda *a, **k: tiny_model(seed=3))
        mp.setattr(mechlie.core.pairs, "load_builtin", lambda *a, **k: many_pairs())
        argv = "--n-random 4 --n-boot 20 --n-path-pairs 2 --receiver 2.1 --no-known-only --n-rerank 4".split()
        assert launch(localise.STUDY, argv=argv + ["--out-dir", str(tmp / "localise")]) == 0
    finally:
        mp.undo()
    kinds = ("steering", "detection", "localise")
    return {kind: next(p for p in (tmp / kind).iterdir() if p.is_dir()) for kind in kinds}


def test_steering_detection_localise_runs_regenerate_every_figure(script_runs, tmp_path):
    from analyses.make_figures import main

    out = tmp_path / "report" / "report.md"
    assert main([str(r) for r in script_runs.values()] + ["--out", str(out)]) == 0
    text = out.read_text()
    for kind, run in script_runs.items():
        rep = load_result(run)
        assert rep.study == kind and rep.headline() and rep.title() in text
        for stem in rep.figures():
            for fmt in ("svg", "png"):
                f = out.parent / f"{kind}-{run.name}" / f"{stem}.{fmt}"
                assert f.is_file() and f.stat().st_size > 1000, f
    steer = load_result(script_runs["steering"]).figures()
    assert {"steering_recovered", "steering_kl", "steering_frontier", "steering_resid_dose"} <= set(steer)
    s = json.loads((script_runs["steering"] / "summary.json").read_text())
    assert set(s["figures"]) == set(steer)  # the run wrote the same figures, drawn by the same code
    bars = steer["steering_recovered"].data[0]
    assert list(bars.x) == list(s["evaluation_on_test"])  # one bar per evaluated method, with its CI
    for m, y, plus, minus in zip(bars.x, bars.y, bars.error_y.array, bars.error_y.arrayminus):
        r = s["evaluation_on_test"][m]["recovered"]
        assert (y, y + plus, y - minus) == pytest.approx((r["mean"], r["hi"], r["lo"]))
    assert "n=" in steer["steering_recovered"].layout.title.text and "Best method (most recovered on validation" in text
    det = load_result(script_runs["detection"]).figures()
    d = json.loads((script_runs["detection"] / "summary.json").read_text())
    assert set(d["figures"]) == set(det)  # the run wrote the same figures, drawn by the same code
    assert {"detect_loro", "detect_transfer", "detect_matrix_logistic", "detect_roc", "detect_token_scores"} <= set(det)
    loro = det["detect_loro"].data[0]  # framing labels: mean AUROC with its CI per probe
    for p, y, plus in zip(loro.x, loro.y, loro.error_y.array):
        assert y == pytest.approx(d["loro"][p]["mean_auroc"]) and y + plus == pytest.approx(d["loro"][p]["hi"])
    assert f"n={d['n_pairs']} pairs" in det["detect_loro"].layout.title.text
    loc = load_result(script_runs["localise"]).figures()
    ls = json.loads((script_runs["localise"] / "summary.json").read_text())
    assert set(ls["figures"]) == set(loc)
    assert {
        "localise_topk_restore",
        "localise_topk_induce",
        "localise_receiver_positions",
        "localise_path_heatmap",
        "localise_circuit",
    } <= set(loc)
    band, line = loc["localise_topk_restore"].data[:2]  # the top-k curve and its CI band
    top = ls["topk_restore"]["top"]
    assert list(line.y) == pytest.approx([e["mean"] for e in top])
    assert list(band.y) == pytest.approx([e["hi"] for e in top] + [e["lo"] for e in top][::-1])
    assert "held-out pairs" in loc["localise_topk_restore"].layout.title.text
    # A steering run whose sweep file is gone: refused.
    broken = tmp_path / "broken_steering"
    shutil.copytree(script_runs["steering"], broken)
    (broken / "sweep.json").unlink()
    with pytest.raises(RunFormatError, match="missing results file"):
        load_result(broken)
    # A detection run without matrix.json: refused.
    for kind, name in (("detection", "matrix.json"),):
        broken = tmp_path / f"broken_{kind}"
        shutil.copytree(script_runs[kind], broken)
        (broken / name).unlink()
        with pytest.raises(RunFormatError, match="missing results file"):
            load_result(broken)
