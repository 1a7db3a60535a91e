"""End-to-end checks on the real embedded default model."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechlie.causal.patching import patch_final_position
from mechlie.core.io import load_tensors
from mechlie.core.metrics import behaviour
from mechlie.core.pairs import PairError, load_builtin, tokenize
from mechlie.studies.base import load_result
from mechlie.studies.head_sweep import HeadSweepConfig, load_sweep_pairs, run_head_sweep, summarize

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_capitals_p_truth_higher_when_honest(smol):
    pairs = load_builtin("capitals", "fewshot", tokenizer=smol.tokenizer, n=20)
    s = behaviour(smol, pairs, progress=False).summary()
    assert s["acc"] > 0.6  # the model knows these facts
    assert s["p_truth_honest"] > s["p_truth_lying"] + 0.05
    assert s["logit_diff_honest"] > s["logit_diff_lying"]


@pytest.mark.slow
def test_real_model_patching_equals_transformer_lens(smol):
    from test_patching import tl_reference

    # TransformerLens's reference patches position by position, so it needs two pairs whose four
    # prompts all have one length: take the first length shared by two equal-length pairs.
    pairs = load_builtin("capitals", "fewshot", tokenizer=smol.tokenizer, n=30)
    by_len: dict[int, list] = {}
    for p in pairs:
        a, b = (len(tokenize(smol, [x]).tokens[0]) for x in (p.honest, p.lying))
        if a == b:
            by_len.setdefault(a, []).append(p)
    same = next(v for v in by_len.values() if len(v) >= 2)[:2]
    ours = patch_final_position(smol, same, "resid_pre", progress=False)
    ref = tl_reference(smol, same, "resid_pre")
    assert (ours.effect() - ref).abs().max() <= 1e-4
    # TL reruns the whole prompt per head, so it is compared on a few layers (first, middle, last).
    layers = [0, smol.cfg.n_layers // 2, smol.cfg.n_layers - 1]
    ours_z = patch_final_position(smol, same[:1], "z", progress=False)
    ref_z = tl_reference(smol, same[:1], "z", layers=layers)
    assert (ours_z.effect()[layers] - ref_z).abs().max() <= 1e-4


@pytest.mark.slow
def test_head_sweep_writes_every_file_and_resumes(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "analyses" / "head_sweep.py"),
        "--n-pairs",
        "3",
        "--n-patch",
        "2",
        "--n-perm",
        "30",
        "--n-random",
        "30",
        "--n-boot",
        "200",
        "--out-dir",
        str(tmp_path),
        "--run-name",
        "t",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "t"
    for name in [
        "config.json",
        "behaviour.json",
        "summary.json",
        "activations.safetensors",
        "directions.safetensors",
        "patching.safetensors",
    ]:
        assert (run / name).is_file(), name
    for fig in ["head_auroc", "head_patching", "top_heads", "top_heads_auroc", "layer_curves", "behaviour"]:
        assert (run / f"{fig}.html").stat().st_size > 1000
        assert (run / f"{fig}.png").is_file() or "PNG figures skipped" in out.stdout + out.stderr
    summary = json.loads((run / "summary.json").read_text())
    L = len(summary["resid_auroc"]["per_layer"])
    assert L == 30 and len(summary["top_heads_by_patching"]) == 10
    eff = summary["patching"]["resid_effect_logit_diff"]
    assert abs(eff[0]) < 1e-3  # layer 0's input at the final token is the same token in both runs
    top = summary["top_heads_by_patching"][0]
    assert top["lo"] <= top["effect"] <= top["hi"] and 0 <= top["top1_share"] <= 1
    assert summary["head_auroc"]["null"]["n_draws"] == 30 and summary["n_test_facts"] < 10
    assert any("held-out facts" in w for w in summary["warnings"])  # 12 pairs: a tiny test set
    assert summary["behaviour"]["all"]["n"] >= summary["behaviour"]["known"]["n"] == summary["n_pairs"]
    assert str(run) in out.stdout
    # circuitsvis views of the top 3 heads, on by default
    assert summary["views"].endswith("lying_heads.html") and (run / "lying_heads.json").is_file()
    d, meta = load_tensors(run / "directions.safetensors")
    assert d["head_out"]["auroc"].shape == (30, 9) and d["head_out"]["null_auroc"].shape == (30, 30, 9)

    mtime = (run / "patching.safetensors").stat().st_mtime
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr + again.stdout
    assert (run / "patching.safetensors").stat().st_mtime == mtime
    assert json.loads((run / "summary.json").read_text())["top_heads_by_patching"] == summary["top_heads_by_patching"]

    other = subprocess.run(cmd[:-2] + ["--run-name", "t", "--seed", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert other.returncode == 2 and "different settings" in other.stderr
    assert "Traceback" not in other.stderr  # a user error is one line
    assert (run / "patching.safetensors").stat().st_mtime == mtime  # nothing already written is lost


# ---------------------------------------------------------------------------------------------
# head sweep on a tiny model (fast): inputs checked early, files keyed on content, all rows used

from steer_fixtures import COUNTRIES as CAPITALS  # noqa: E402  (the shared word list)


def _pairs_file(path: Path, n_rows: int = 10, bad_rows: int = 0) -> Path:
    rows = []
    for i in range(n_rows):
        country, city = CAPITALS[i % len(CAPITALS)]
        lie = CAPITALS[(i + 1) % len(CAPITALS)][1]
        rows.append(
            {
                "honest": f"you are an honest assistant . What is the capital of {country} ? A :",
                "lying": f"you are a liar . always lie . What is the capital of {country} ? A :",
                "truth": city,
                "lie": lie,
                "fact_id": f"capital/{country}/{i}",
                "relation": "capitals",
            }
        )
    for i in range(bad_rows):  # answers that are not one token of the tiny vocabulary
        rows.append(
            {
                "honest": "What is the capital ? A :",
                "lying": "lie . What is the capital ? A :",
                "truth": "Zanzibar City",
                "lie": "Paris",
                "fact_id": f"bad{i}",
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bad_settings_fail_before_the_model_loads(tmp_path):
    with pytest.raises(FileNotFoundError):
        HeadSweepConfig(dataset=str(tmp_path / "missing.jsonl"))
    for bad in ({"n_patch": 0}, {"test_frac": 1.0}, {"n_pairs": -1}, {"n_perm": 5}, {"dataset": "nonsense"}):
        with pytest.raises(ValueError):
            HeadSweepConfig(**bad)
    script = ROOT / "analyses" / "head_sweep.py"
    out = subprocess.run(
        [sys.executable, str(script), "--dataset", str(tmp_path / "missing.jsonl"), "--out-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "missing.jsonl" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_run_name_keys_on_the_pairs_file_content(tmp_path):
    from mechlie.core.cli import prepare_run

    f = _pairs_file(tmp_path / "p.jsonl")
    cfg = HeadSweepConfig(dataset=str(f), out_dir=str(tmp_path / "out"))
    first = prepare_run(cfg).identity
    name1 = prepare_run(cfg)._path.name
    _pairs_file(f, n_rows=9)  # edited in place: same path, other content
    assert prepare_run(cfg)._path.name != name1
    assert prepare_run(cfg).identity["data_sha256"] != first["data_sha256"]


def test_pairs_file_uses_every_row_and_logs_what_was_dropped(tmp_path, caplog, tiny):
    f = _pairs_file(tmp_path / "p.jsonl", n_rows=40, bad_rows=3)  # more rows than --n-pairs' default
    cfg = HeadSweepConfig(dataset=str(f), out_dir=str(tmp_path))
    with caplog.at_level(logging.INFO):
        pairs, info = load_sweep_pairs(cfg, tiny.tokenizer)
    # multi-token answers are kept (scored by their first token) unless asked
    assert len(pairs) == 43 and info["rows_read"] == 43 and info["rows_dropped_multitoken_answer"] == 0
    assert info["pairs_multitoken_answer"] == 3
    assert "43 rows read" in caplog.text and "43 pairs used" in caplog.text
    drop = HeadSweepConfig(dataset=str(f), multi_token="drop", out_dir=str(tmp_path))
    pairs, info = load_sweep_pairs(drop, tiny.tokenizer)
    assert len(pairs) == 40 and info["rows_dropped_multitoken_answer"] == 3 and info["pairs_multitoken_answer"] == 0
    # a pair whose truth and lie share a first token cannot be scored by first tokens: a clear error
    shared = tmp_path / "shared.jsonl"
    shared.write_text(
        f.read_text()
        + json.dumps({"honest": "a ?", "lying": "b ?", "truth": "Zanzibar City", "lie": "Zanzibar"})
        + "\n"
    )
    with pytest.raises(PairError, match="share a first token"):
        load_sweep_pairs(HeadSweepConfig(dataset=str(shared), out_dir=str(tmp_path)), tiny.tokenizer)
    pairs, info = load_sweep_pairs(HeadSweepConfig(dataset=str(f), max_rows=25, out_dir=str(tmp_path)), tiny.tokenizer)
    assert len(pairs) == 25 and info["rows_not_used_max_rows"] == 18


def test_tiny_head_sweep_end_to_end_with_cis_and_warning(tmp_path, tiny):
    f = _pairs_file(tmp_path / "p.jsonl", n_rows=20)
    cfg = HeadSweepConfig(
        dataset=str(f),
        known_only=False,
        n_patch=6,
        n_perm=30,
        n_random=30,
        n_boot=200,
        top_k=3,
        out_dir=str(tmp_path / "out"),
    )
    res = run_head_sweep(cfg, tiny, progress=False)
    s = summarize(res)
    L, H = tiny.cfg.n_layers, tiny.cfg.n_heads
    assert res.heads.auroc.shape == (L, H) and res.heads.null_auroc.shape == (30, L, H)
    assert s["n_pairs"] == 20 and s["data"]["rows_read"] == 20
    assert s["n_test_facts"] < 10 and s["warnings"]  # 6 held-out facts: warned
    for t in s["top_heads_by_patching"]:
        assert t["lo"] <= t["effect"] + 1e-6 and t["effect"] <= t["hi"] + 1e-6
    # The reported effect is the patching module's normalized effect, unchanged by the CI.
    t = s["top_heads_by_patching"][0]
    assert abs(t["effect"] - float(res.head_patch.effect()[t["layer"], t["head"]])) < 1e-6
    top = s["top_heads_by_patching"]
    assert sum(x["top1_share"] for x in top) <= 1 + 1e-6
    assert all(x["top1_share"] <= x["topk_share"] <= 1 for x in top)
    b = s["behaviour"]["all"]["ci"]["p_truth_honest"]
    assert b["lo"] <= b["mean"] <= b["hi"]
    # The study's run() resumes every stage, and its Result draws the figures from the saved files.
    from mechlie.core.cli import prepare_run
    from mechlie.studies import head_sweep

    run_dir = prepare_run(cfg)
    result = head_sweep.run(cfg, tiny, run_dir, progress=False)
    assert result.summary()["top_heads_by_patching"] == s["top_heads_by_patching"]
    assert len(s["top_heads_by_patching"]) == len(s["top_heads_by_auroc"]) == cfg.top_k
    run_dir.write_json("summary.json", result.summary())
    loaded = load_result(run_dir.path)
    figs = loaded.figures()
    assert (run_dir.path / "top_heads.svg").is_file() or "PNG figures skipped" in (loaded.report() or "")
    assert loaded.headline() and "Top head by patching" in "\n".join(loaded.headline())
    assert {"head_auroc", "head_patching", "top_heads", "top_heads_auroc", "layer_curves", "behaviour"} <= set(figs)
    # Error bars are the CIs: the top head's bar reaches exactly from lo to hi.
    bar = figs["top_heads"].data[0]
    assert (
        abs(bar.y[0] + bar.error_y.array[0] - t["hi"]) < 1e-6
        and abs(bar.y[0] - bar.error_y.arrayminus[0] - t["lo"]) < 1e-6
    )
    assert any(tr.fill == "toself" for tr in figs["layer_curves"].data)  # CI bands
    # Resume: a second call reuses every stage and gives the same numbers.
    res2 = run_head_sweep(cfg, tiny, progress=False)
    assert torch.equal(res2.heads.null_auroc, res.heads.null_auroc)
    assert torch.equal(res2.head_patch.logit_diff, res.head_patch.logit_diff)
