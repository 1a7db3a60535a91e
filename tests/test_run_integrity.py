"""Issue 21: the run folder is locked and checksummed, no pickle is ever loaded, and bad input gets
one line naming the flag or file (no model: toy configs and hand-made run folders)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mechlie.core.cli import RunDir, prepare_run, run_script
from mechlie.core.io import load_tensors, save_tensors
from mechlie.core.manifest import MANIFEST, ResultChecksumError, read_manifest
from mechlie.studies.base import STUDIES, RunFormatError, Study, StudyResult, read_summary


@dataclass(frozen=True)
class Cfg:
    dataset: str = field(default="capitals", metadata={"path": True})
    n_pairs: int = 30
    seed: int = 0
    n_boot: int = 1000
    device: str = ""
    out_dir: str = "results/x"
    run_name: str = ""


def _stage_main(computed: list):
    """A toy script with one stage: the value of its data file's length times 1.5."""

    def main(cfg: Cfg, run: RunDir) -> dict:
        def compute():
            computed.append(1)
            return {"x": torch.full((64,), 1.5 * len(Path(cfg.dataset).read_text()))}

        t = run.stage("x.safetensors", compute, lambda p, t: save_tensors(p, t, {}), lambda p: load_tensors(p)[0])
        return {"kind": "toy", "x": t["x"][0].item()}

    return main


def _data(tmp_path, text="abc\n", name="pairs.jsonl") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _argv(tmp_path, data, *extra):
    return ["--dataset", str(data), "--out-dir", str(tmp_path / "out"), "--run-name", "mine", *extra]


def _flip_floats(path: Path) -> None:
    """Overwrite four floats at the end of a safetensors file, its header intact (issue 21, C15)."""
    raw = bytearray(path.read_bytes())
    raw[-16:] = torch.full((4,), 50.5).numpy().tobytes()
    path.write_bytes(bytes(raw))


# --- Item 1: one run at a time; a stage made with other settings or data is never resumed -------


HOLD = """
import fcntl, sys, time
f = open(sys.argv[1], "a")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""


def test_a_second_run_into_a_held_folder_is_refused(tmp_path, capsys):
    """C12: two runs into one --run-name both exited 0 and mixed their results."""
    import subprocess
    import sys

    data = _data(tmp_path)
    assert (
        run_script(Cfg, lambda c, r: r.write_json("partial.json", {"a": 1}) and None, argv=_argv(tmp_path, data)) == 0
    )
    run = tmp_path / "out" / "mine"
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "held"  # another process runs in the folder
        called = []
        assert run_script(Cfg, lambda c, r: called.append(1), argv=_argv(tmp_path, data)) == 2
        err = capsys.readouterr().err
        assert "another run holds" in err and str(run) in err and err.count("\n") == 1 and not called
    finally:
        other.communicate("\n", timeout=30)  # that run ends: the folder is free again, and resumes
    assert run_script(Cfg, lambda c, r: {"ok": 1}, argv=_argv(tmp_path, data)) == 0
    # In one process, a run folder object still alive does not block a rerun (a notebook).
    kept = prepare_run(Cfg(dataset=str(data), out_dir=str(tmp_path / "out"), run_name="mine"))
    assert run_script(Cfg, lambda c, r: {"ok": 2}, argv=_argv(tmp_path, data)) == 0
    kept.close()


def test_a_stage_made_with_other_data_is_never_resumed(tmp_path, capsys):
    """C12: run B left its stage in A's folder (config.json says A): A's rerun must not reuse it."""
    a, b = _data(tmp_path, "aaaa\n", "a.jsonl"), _data(tmp_path, "bbbbbbbb\n", "b.jsonl")
    computed: list = []
    assert run_script(Cfg, _stage_main(computed), argv=_argv(tmp_path, b, "--run-name", "b")) == 0
    assert run_script(Cfg, lambda c, r: r.write_json("other.json", {}) and None, argv=_argv(tmp_path, a)) == 0
    mine, other = tmp_path / "out" / "mine", tmp_path / "out" / "b"
    # The mixed folder: A's config.json and manifest, B's stage and its manifest entry.
    (mine / "x.safetensors").write_bytes((other / "x.safetensors").read_bytes())
    man, man_b = read_manifest(mine), read_manifest(other)
    man["files"]["x.safetensors"] = man_b["files"]["x.safetensors"]
    man["identities"].update(man_b["identities"])
    (mine / MANIFEST).write_text(json.dumps(man))
    capsys.readouterr()
    assert run_script(Cfg, _stage_main(computed), argv=_argv(tmp_path, a)) == 2
    err = capsys.readouterr().err
    assert "x.safetensors was made by a run with other settings or data" in err and "dataset content" in err
    assert len(computed) == 1 and "summary.json" not in {p.name for p in mine.iterdir()}


def test_runs_record_a_sha256_and_identity_per_file(tmp_path):
    data = _data(tmp_path)
    assert run_script(Cfg, _stage_main([]), argv=_argv(tmp_path, data)) == 0
    run = tmp_path / "out" / "mine"
    man = read_manifest(run)
    assert set(man["files"]) == {"x.safetensors", "summary.json"}
    import hashlib

    for name, e in man["files"].items():
        assert e["sha256"] == hashlib.sha256((run / name).read_bytes()).hexdigest()
        assert e["identity_sha256"] == man["identity_sha256"]
    assert man["identities"][man["identity_sha256"]] == json.loads((run / "config.json").read_text())


# --- Item 4: result files carry checksums, checked on resume and when read ----------------------


def test_a_damaged_stage_is_recomputed_not_resumed(tmp_path, caplog):
    data = _data(tmp_path)
    computed: list = []
    assert run_script(Cfg, _stage_main(computed), argv=_argv(tmp_path, data)) == 0
    run = tmp_path / "out" / "mine"
    _flip_floats(run / "x.safetensors")
    assert load_tensors(run / "x.safetensors")[0]["x"][-1].item() == 50.5  # still a readable file
    caplog.set_level(logging.WARNING, logger="mechlie")
    assert run_script(Cfg, _stage_main(computed), argv=_argv(tmp_path, data)) == 0
    assert len(computed) == 2 and any("does not match" in r.getMessage() for r in caplog.records)
    assert json.loads((run / "summary.json").read_text())["x"] == 6.0
    assert torch.equal(load_tensors(run / "x.safetensors")[0]["x"], torch.full((64,), 6.0))
    # Resumed when intact.
    assert run_script(Cfg, _stage_main(computed), argv=_argv(tmp_path, data)) == 0
    assert len(computed) == 2


def test_an_older_run_without_manifest_is_recomputed_then_recorded(tmp_path, caplog):
    """A stage that no manifest vouches for may be damaged: it is recomputed, never blessed."""
    data = _data(tmp_path)
    computed: list = []
    assert run_script(Cfg, _stage_main(computed), argv=_argv(tmp_path, data)) == 0
    run = tmp_path / "out" / "mine"
    (run / MANIFEST).unlink()  # as an older mechlie left it
    caplog.set_level(logging.WARNING, logger="mechlie")
    assert run_script(Cfg, _stage_main(computed), argv=_argv(tmp_path, data)) == 0
    assert len(computed) == 2 and any("cannot be verified" in r.getMessage() for r in caplog.records)
    assert "x.safetensors" in read_manifest(run)["files"]
    assert run_script(Cfg, _stage_main(computed), argv=_argv(tmp_path, data)) == 0
    assert len(computed) == 2  # verified from now on, so resumed


class ToyResult(StudyResult):
    study = "toy"
    required = ("x",)
    files = ("x.safetensors",)


@pytest.fixture
def toy_run(tmp_path, monkeypatch):
    monkeypatch.setitem(STUDIES, "toy", Study("toy", Cfg, lambda *a: None, ToyResult, load_model=False))
    data = _data(tmp_path)
    assert run_script(Cfg, _stage_main([]), argv=_argv(tmp_path, data)) == 0
    return tmp_path / "out" / "mine"


def test_reading_a_run_verifies_every_file(toy_run, tmp_path, capsys, caplog):
    from analyses.make_figures import main

    assert isinstance(ToyResult.load(toy_run), ToyResult)
    _flip_floats(toy_run / "x.safetensors")
    with pytest.raises(ResultChecksumError, match="x.safetensors does not match"):
        ToyResult.load(toy_run)
    out = tmp_path / "report" / "report.md"
    assert main([str(toy_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{toy_run / 'x.safetensors'} does not match" in err and err.count("\n") == 1
    assert not out.parent.exists()
    # A run from before manifests: read, with a warning.
    (toy_run / MANIFEST).unlink()
    caplog.set_level(logging.WARNING, logger="mechlie")
    assert isinstance(ToyResult.load(toy_run), ToyResult)
    assert any("no manifest.json" in r.getMessage() for r in caplog.records)


# --- Item 2: a pickle in a run folder is never loaded -------------------------------------------


class _Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):  # unpickling this writes a marker file
        return (Path(self.path).write_text, ("pwned",))


def test_a_crafted_pickle_is_never_loaded(tmp_path, capsys):
    from analyses.make_figures import main

    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "marker"
    torch.save({"z": _Marker(str(marker))}, run / "patching.pt")
    (run / "summary.json").write_text(json.dumps({"kind": "head_sweep", "model": "m"}))
    assert main([str(run), "--out", str(tmp_path / "rep" / "report.md")]) == 2
    err = capsys.readouterr().err
    assert "patching.pt" in err and "never unpickled" in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "rep").exists()


# --- Item 5: unclear errors become one line naming the flag or file -----------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "99999999999999999999"], "--seed must fit in a signed 64-bit integer"),
        (["--n-boot", "100000000000"], "--n-boot must be at most 100,000"),
        (["--device", "gpu"], "--device 'gpu' is not a torch device"),
    ],
)
def test_out_of_range_flags_name_the_flag(tmp_path, capsys, extra, message):
    called = []
    assert run_script(Cfg, lambda c, r: called.append(1), argv=_argv(tmp_path, _data(tmp_path), *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and not called
    assert not (tmp_path / "out").exists()


def test_device_cuda_without_cuda_fails_before_main(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    called = []
    argv = _argv(tmp_path, _data(tmp_path), "--device", "cuda")
    assert run_script(Cfg, lambda c, r: called.append(1), argv=argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: CUDA is not available") and err.count("\n") == 1 and not called


def test_dataset_given_a_directory_says_so(tmp_path, capsys):
    (tmp_path / "pairs.d").mkdir()
    assert run_script(Cfg, lambda c, r: {}, argv=_argv(tmp_path, tmp_path / "pairs.d")) == 2
    assert f"--dataset: {tmp_path / 'pairs.d'} is a directory, not a file" in capsys.readouterr().err


def test_a_stale_temp_file_no_longer_blocks_a_run_folder(tmp_path, caplog):
    data = _data(tmp_path)
    run = tmp_path / "out" / "mine"
    run.mkdir(parents=True)
    stale = run / ".summary.json.k2j3h4g5.tmp"  # what an interrupted atomic write leaves
    stale.write_text("{")
    caplog.set_level(logging.WARNING, logger="mechlie")
    assert run_script(Cfg, lambda c, r: {"ok": 1}, argv=_argv(tmp_path, data)) == 0
    assert not stale.exists() and any(str(stale) in r.getMessage() for r in caplog.records)
    assert (run / "summary.json").is_file()


def test_a_failed_validation_leaves_no_empty_out_dir(tmp_path, capsys):
    def main(cfg, run):
        raise ValueError("layer 99 is out of range for a 3-layer model")

    out = tmp_path / "new" / "out"
    assert run_script(Cfg, main, argv=["--dataset", str(_data(tmp_path)), "--out-dir", str(out)]) == 2
    assert "layer 99" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert run_script(Cfg, lambda c, r: None, argv=["--out-dir", str(out)]) == 0  # nothing written: nothing left
    assert not (tmp_path / "new").exists()


def test_make_figures_refuses_an_out_directory_before_writing(toy_run, tmp_path, capsys):
    from analyses.make_figures import main

    (tmp_path / "rep").mkdir()
    assert main([str(toy_run), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'rep'} is a directory" in err and err.count("\n") == 1
    assert list((tmp_path / "rep").iterdir()) == []


@pytest.mark.parametrize("text, message", [('{"kind": "to', "is not valid JSON"), ("[1, 2]", "not a JSON object")])
def test_a_truncated_or_non_object_summary_names_the_file(tmp_path, capsys, text, message):
    from analyses.make_figures import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(text)
    with pytest.raises(RunFormatError, match=message):
        read_summary(tmp_path / "run")
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "rep" / "r.md")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "run" / "summary.json") in err and message in err and err.count("\n") == 1
