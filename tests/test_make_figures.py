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

from mechlie.core.io import atomic_write_json, save_tensors
from mechlie.report import kinds as R
from mechlie.sae import features as S

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from mechlie.causal.patching import patch_final_position
    from mechlie.core.pairs import load_builtin

    tmp = tmp_path_factory.mktemp("runs")
    model = tiny_model(n_ctx=128)
    # A head-sweep run as mechlie.studies.head_sweep saves it: real patching results of a tiny model.
    hs = tmp / "head_sweep" / "tiny"
    hs.mkdir(parents=True)
    pairs = capital_pairs(model)  # words the tiny tokenizer knows, so honest and lying prompts differ
    pr = {kind: patch_final_position(model, pairs, kind, progress=False) for kind in ("z", "resid_pre")}
    scores = lambda a: {
        "p_truth": a.p_truth,
        "logit_diff": a.logit_diff,
        "correct": a.correct,
        "choice_cov": a.choice_cov,
    }
    save_tensors(  # the layout of mechlie.studies.head_sweep's patching.safetensors
        hs / "patching.safetensors",
        {
            k: {
                "p_truth": r.p_truth,
                "logit_diff": r.logit_diff,
                "clean": scores(r.clean),
                "corrupt": scores(r.corrupt),
            }
            for k, r in pr.items()
        },
        {k: {"kind": r.kind} for k, r in pr.items()},
    )
    cfg = {"model": "tiny", "dataset": "capitals", "fmt": "fewshot", "n_patch": len(pairs)}
    atomic_write_json(hs / "config.json", cfg)
    z = pr["z"]
    eff, H = z.effect(), model.cfg.n_heads
    atomic_write_json(
        hs / "summary.json",
        {
            "model": "tiny",
            "n_pairs": len(pairs),
            "config": cfg,
            "patching": {
                "n_pairs": len(pairs),
                "honest_p_truth": float(z.clean.p_truth.mean()),
                "lying_p_truth": float(z.corrupt.p_truth.mean()),
            },
            "top_heads_by_patching": [
                {"layer": i // H, "head": i % H, "effect": float(eff.flatten()[i])}
                for i in eff.flatten().argsort(descending=True)[:5].tolist()
            ],
        },
    )

    # An SAE-features run: a tiny SAE trained with sae-lens, the real decomposition, saved as
    # analyses/sae_features.py saves it.
    tcfg = S.SAETrainConfig(
        site="blocks.2.hook_resid_pre",
        expansion=2,
        k=4,
        n_steps=40,
        batch_size=32,
        pairs_per_format=2,
        n_samples=4,
        sample_tokens=6,
    )
    trained = S.load_or_train_sae(model, tcfg, cache_dir=tmp / "cache", progress=False)
    pairs = load_builtin("all", "fewshot", tokenizer=model.tokenizer, n=3)
    res_s, ts = S.lie_features(
        model,
        trained,
        pairs,
        list(range(0, len(pairs), 2)),
        list(range(1, len(pairs), 2)),
        k=4,
        k_causal=2,
        n_draws=20,
        progress=False,
    )
    sae_run = tmp / "sae_features" / "tiny"
    sae_run.mkdir(parents=True)
    save_tensors(sae_run / "features.safetensors", {tcfg.site: ts}, {})
    atomic_write_json(
        sae_run / "summary.json",
        {
            "kind": "sae_features",
            "model": "tiny",
            "dataset": "all (fewshot)",
            "n_known_pairs": len(pairs),
            "sites": {tcfg.site: res_s},
        },
    )
    # A patching-sweep run in analyses/patching_sweep.py's format, from the same patching results.
    ps = tmp / "patching_sweep" / "tiny"
    ps.mkdir(parents=True)
    delta = z.logit_diff.mean(0) - z.corrupt.logit_diff.mean()
    ci = z.effect_ci("logit_diff", n_boot=200)
    save_tensors(ps / "tensors.safetensors", {"exact_delta_heads": delta}, {})
    top = [(i // H, i % H) for i in delta.flatten().argsort(descending=True)[:5].tolist()]
    atomic_write_json(
        ps / "summary.json",
        {
            "model": "tiny",
            "n_pairs": len(pairs),
            "metric": "logit_diff",
            "honest_mean": float(z.clean.logit_diff.mean()),
            "lying_mean": float(z.corrupt.logit_diff.mean()),
            "heads": {
                "spearman_attribution_vs_exact": 0.9,
                "top_exact": [{"layer": l, "head": h, "effect": ci.at(l, h).to_dict()} for l, h in top],
            },
            "positions": {
                "layers": [0, 1],
                "group_effect": {"demo 1": {"L0": ci.at(0, 0).to_dict(), "L1": ci.at(1, 0).to_dict()}},
            },
            "component_ranking": {},
        },
    )
    # A function-vector run in analyses/function_vectors.py's format (synthetic numbers).
    fv = tmp / "function_vectors" / "tiny"
    fv.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    n, layers = 6, [0, 1, 2]
    save_tensors(
        fv / "tensors.safetensors",
        {
            "aie_truth_drop": torch.randn(3, 4, generator=g),
            "lying_minus_p_truth": torch.rand(n, 2 + 20, len(layers), generator=g),
            "lying_minus_base_p_truth": torch.rand(n, generator=g),
        },
        {"layers": layers, "headline_layer": 1},
    )
    atomic_write_json(
        fv / "summary.json",
        {
            "model": "tiny",
            "n_test": n,
            "layer": 1,
            "cosine_fv_vs_diff_of_means": 0.1,
            "top_heads_by_aie": [{"layer": 2, "head": 1, "truth_drop": 0.2, "lie_rise": 0.1}],
            "top_heads_by_patching": [{"layer": 2, "head": 1, "effect_p_truth": 0.3}],
        },
    )
    return {"head_sweep": hs, "sae_features": sae_run, "patching_sweep": ps, "function_vectors": fv}


def test_make_figures_writes_every_file(runs, tmp_path):
    from analyses.make_figures import main

    out = tmp_path / "report" / "report.md"
    assert main([str(r) for r in runs.values()] + ["--out", str(out)]) == 0
    text = out.read_text()
    for kind, run in runs.items():
        rep = R.build_report(run)
        assert rep.kind == kind and rep.figures
        folder = out.parent / f"{kind}-{run.name}"
        for stem in rep.figures:
            for fmt in ("svg", "png"):
                f = folder / f"{stem}.{fmt}"
                assert f.is_file() and f.stat().st_size > 1000, f
                assert f"{kind}-{run.name}/{stem}.png" in text
        assert rep.title in text
    assert (out.parent / "sae_features-tiny" / "b2_resid_pre_features.svg").read_text().startswith("<svg")
    assert "CE loss recovered" in text and "Top head by patching" in text
    assert not [p for p in out.parent.rglob(".*")]  # no temporary files left


def test_top_heads_have_ci_error_bars(runs):
    rep = R.build_report(runs["head_sweep"])
    bar = rep.figures["top_heads"].data[0]
    plus, minus = bar.error_y.array, bar.error_y.arrayminus
    assert len(bar.x) == 12 and all(p >= 0 for p in plus) and all(m >= 0 for m in minus)
    assert any(p > 0 for p in plus)  # CIs over 4 pairs are not degenerate
    assert "n=4 pairs" in rep.figures["top_heads"].layout.title.text


def test_bad_runs_are_refused_before_writing(runs, tmp_path):
    from analyses.make_figures import main

    out = tmp_path / "r" / "report.md"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(R.RunFormatError, match="no summary.json"):
        R.detect_kind(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({"kind": "something_else"}))
    with pytest.raises(R.RunFormatError, match="not a run of a kind"):
        R.detect_kind(other)
    old = tmp_path / "old"
    shutil.copytree(runs["sae_features"], old)
    s = json.loads((old / "summary.json").read_text())
    del s["sites"]
    (old / "summary.json").write_text(json.dumps(s))
    with pytest.raises(R.RunFormatError, match="older version"):
        R.build_report(old)
    missing = tmp_path / "missing"
    shutil.copytree(runs["sae_features"], missing)
    (missing / "features.safetensors").unlink()
    with pytest.raises(R.RunFormatError, match="missing results file"):
        R.build_report(missing)
    no_patching = tmp_path / "no_patching"
    shutil.copytree(runs["head_sweep"], no_patching)
    (no_patching / "patching.safetensors").unlink()
    with pytest.raises(R.RunFormatError):
        R.build_report(no_patching)
    # A good run beside a bad one: one line, exit 2, and nothing written for either.
    assert main([str(runs["head_sweep"]), str(missing), "--out", str(out)]) == 2
    assert not out.parent.exists()


def test_sae_features_script_end_to_end(tmp_path, monkeypatch):
    """analyses/sae_features.py on a tiny model: trains two SAEs (one pass), decomposes, writes
    the run, the lying-head page and its figures (the cache itself is tested in test_sae.py)."""
    import mechlie.core.models
    from analyses.sae_features import SAEFeaturesConfig, main
    from mechlie.core.cli import run_script

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
        "--out-dir",
        str(tmp_path / "out"),
        "--run-name",
        "r",
    ]
    assert run_script(SAEFeaturesConfig, main, argv=argv) == 0
    run = tmp_path / "out" / "r"
    s = json.loads((run / "summary.json").read_text())
    assert set(s["sites"]) == {"blocks.2.hook_resid_pre", "blocks.2.attn.hook_z:1"}
    assert s["sites"]["blocks.2.attn.hook_z:1"]["d_sae"] == 2 * model.cfg.d_head
    # Pairs whose truth and lie share a first token (unknown words, on this tokenizer) are left out and counted.
    assert s["n_known_pairs"] == 80 - s["n_dropped_shared_first_token"]
    assert "L2H1 (lying)" in (run / "lying_heads.html").read_text()
    assert (run / "figures" / "heads_dla.png").is_file() and (run / "figures" / "b2_resid_pre_features.svg").is_file()
    assert len(list((tmp_path / "cache" / "sae").iterdir())) == 2
    # Bad input fails before any model loads, with nothing written.
    monkeypatch.setattr(
        mechlie.core.models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded"))
    )
    assert run_script(SAEFeaturesConfig, main, argv=["--sites", "blocks.x", "--out-dir", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory) -> dict[str, Path]:
    """Steering, detection and localise runs written by their own scripts on tiny models (the saved
    formats make_figures reads are those of analyses/steering_demo.py, detect.py and localise.py)."""
    from steer_fixtures import word_pairs
    from test_circuits import many_pairs

    import mechlie.core.kv
    import mechlie.core.models
    import mechlie.core.pairs
    from analyses import detect, localise, steering_demo
    from mechlie.core.cli import run_script

    tmp = tmp_path_factory.mktemp("script_runs")
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(mechlie.core.models, "load_model", lambda *a, **k: tiny_model())
        mp.setattr(mechlie.core.pairs, "load_builtin", lambda *a, **k: word_pairs())
        argv = (
            "--model tiny --layers 1 2 --head-ks 2 --head-alphas -2 --resid-alphas -1 -3 --edit-budgets 0.05 "
            "--edit-scales -1 --edit-steps 3 --n-controls 3 --n-boot 50 --val-frac 0.34 --test-frac 0.34 "
            "--causal-pairs 2 --n-demo 2 --max-new-tokens 2 --methods resid iti learned"
        ).split()
        assert (
            run_script(steering_demo.Config, steering_demo.main, argv=argv + ["--out-dir", str(tmp / "steering")]) == 0
        )
        mp.undo()
        model = tiny_model(n_ctx=256)
        mp.setattr(mechlie.core.models, "load_model", lambda *a, **k: model)
        argv = (
            "--relations capitals opposites numbers --n-pairs 10 --k 2 --no-known-filter --probes diff_of_means "
            "logistic --n-null 3 --n-random 20 --n-boot 50 --fpr 0.1 --n-control-prompts 8"
        ).split()
        assert run_script(detect.Config, detect.main, argv=argv + ["--out-dir", str(tmp / "detection")]) == 0
        mp.undo()
        mp.setattr(mechlie.core.kv, "load_model_split", lambda *a, **k: tiny_model(seed=3))
        mp.setattr(mechlie.core.pairs, "load_builtin", lambda *a, **k: many_pairs())
        argv = "--n-random 4 --n-boot 20 --n-path-pairs 2 --receiver 2.1".split()
        assert run_script(localise.LocaliseConfig, localise.main, argv=argv + ["--out-dir", str(tmp / "localise")]) == 0
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
        rep = R.build_report(run)
        assert rep.kind == kind and rep.headline and rep.title in text
        for stem in rep.figures:
            for fmt in ("svg", "png"):
                f = out.parent / f"{kind}-{run.name}" / f"{stem}.{fmt}"
                assert f.is_file() and f.stat().st_size > 1000, f
    steer = R.build_report(script_runs["steering"])
    assert {"steering_recovered", "steering_kl", "steering_frontier", "steering_resid_dose"} <= set(steer.figures)
    s = json.loads((script_runs["steering"] / "summary.json").read_text())
    bars = steer.figures["steering_recovered"].data[0]
    assert list(bars.x) == list(s["evaluation_on_test"])  # one bar per evaluated method, with its CI
    for m, y, plus, minus in zip(bars.x, bars.y, bars.error_y.array, bars.error_y.arrayminus):
        r = s["evaluation_on_test"][m]["recovered"]
        assert (y, y + plus, y - minus) == pytest.approx((r["mean"], r["hi"], r["lo"]))
    assert (
        "n=" in steer.figures["steering_recovered"].layout.title.text
        and "Best method (most recovered on validation" in text
    )
    det = R.build_report(script_runs["detection"])
    d = json.loads((script_runs["detection"] / "summary.json").read_text())
    assert {"detect_loro", "detect_transfer", "detect_matrix_logistic"} <= set(det.figures)
    loro = det.figures["detect_loro"].data[0]  # framing labels: mean AUROC with its CI per probe
    for p, y, plus in zip(loro.x, loro.y, loro.error_y.array):
        assert y == pytest.approx(d["loro"][p]["mean_auroc"]) and y + plus == pytest.approx(d["loro"][p]["hi"])
    assert f"n={d['n_pairs']} pairs" in det.figures["detect_loro"].layout.title.text
    loc = R.build_report(script_runs["localise"])
    ls = json.loads((script_runs["localise"] / "summary.json").read_text())
    assert {"localise_topk_restore", "localise_topk_induce", "localise_receiver_positions"} <= set(loc.figures)
    band, line = loc.figures["localise_topk_restore"].data[:2]  # the top-k curve and its CI band
    top = ls["topk_restore"]["top"]
    assert list(line.y) == pytest.approx([e["mean"] for e in top])
    assert list(band.y) == pytest.approx([e["hi"] for e in top] + [e["lo"] for e in top][::-1])
    assert "held-out pairs" in loc.figures["localise_topk_restore"].layout.title.text
    # A steering run whose evaluation file is gone, or a detection run without matrix.json: refused.
    for kind, name in (("steering", "sweep.json"), ("detection", "matrix.json")):
        broken = tmp_path / f"broken_{kind}"
        shutil.copytree(script_runs[kind], broken)
        (broken / name).unlink()
        with pytest.raises(R.RunFormatError, match="missing results file"):
            R.build_report(broken)
