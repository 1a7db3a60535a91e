"""End-to-end checks on the real embedded default model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechlie.metrics import behaviour
from mechlie.pairs import load_builtin, tokenize
from mechlie.patching import patch_final_position

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

    pairs = load_builtin("capitals", "fewshot", tokenizer=smol.tokenizer, n=12)
    lens = [(len(tokenize(smol, [p.honest]).tokens[0]), len(tokenize(smol, [p.lying]).tokens[0])) for p in pairs]
    same = [p for p, (a, b) in zip(pairs, lens) if a == b and a == lens[0][0]][:2]
    assert len(same) == 2
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
    cmd = [sys.executable, str(ROOT / "analyses" / "head_sweep.py"), "--n-pairs", "3", "--n-patch", "2",
           "--out-dir", str(tmp_path), "--run-name", "t"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "t"
    for name in ["config.json", "behaviour.json", "summary.json", "activations.pt", "directions.pt", "patching.pt"]:
        assert (run / name).is_file(), name
    for fig in ["head_auroc", "head_patching", "layer_curves", "behaviour"]:
        assert (run / f"{fig}.html").stat().st_size > 1000
        assert (run / f"{fig}.png").is_file() or "PNG figures skipped" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    L = len(summary["resid_auroc"]["per_layer"])
    assert L == 30 and len(summary["top_heads_by_patching"]) == 10
    eff = summary["patching"]["resid_effect_logit_diff"]
    assert abs(eff[0]) < 1e-3  # layer 0's input at the final token is the same token in both runs
    assert str(run) in out.stdout
    d = torch.load(run / "directions.pt", weights_only=False)
    assert d["head_out"]["auroc"].shape == (30, 9)

    mtime = (run / "patching.pt").stat().st_mtime
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr + again.stdout
    assert (run / "patching.pt").stat().st_mtime == mtime

    other = subprocess.run(cmd[:-2] + ["--run-name", "t", "--seed", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert other.returncode != 0 and "different config" in other.stderr
    assert (run / "patching.pt").stat().st_mtime == mtime  # nothing already written is lost
