"""mechlie.core.cli: flags from a config dataclass, early checks, run names keyed on data content,
refusal of a different config, resume, one-line user errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

from mechlie.core.cli import RunDir, build_parser, parse_config, run_script
from mechlie.core.io import load_tensors, save_tensors


@dataclass(frozen=True)
class Cfg:
    """A toy script."""

    dataset: str = field(default="capitals", metadata={"help": "a relation or a .jsonl file", "path": True})
    n_pairs: int = field(default=30, metadata={"help": "pairs per relation"})
    fmt: Literal["instruct", "fewshot"] = "fewshot"
    known_only: bool = True
    layers: tuple[int, ...] = (3, 5)
    alpha: float | None = None
    batch_size: int = field(default=8, metadata={"run": False})
    out_dir: str = "results/x"
    run_name: str = ""

    def __post_init__(self):
        if self.n_pairs < 1:
            raise ValueError(f"--n-pairs must be >= 1, got {self.n_pairs}")


def _args(tmp_path, *extra):
    return ["--out-dir", str(tmp_path / "out"), *extra]


def test_flags_follow_the_fields():
    cfg, debug = parse_config(
        Cfg,
        [
            "--n-pairs",
            "5",
            "--format" if False else "--fmt",
            "instruct",
            "--no-known-only",
            "--layers",
            "1",
            "2",
            "7",
            "--alpha",
            "0.5",
            "--debug",
        ],
    )
    assert cfg == Cfg(n_pairs=5, fmt="instruct", known_only=False, layers=(1, 2, 7), alpha=0.5) and debug
    assert parse_config(Cfg, ["--alpha", "none"])[0].alpha is None
    assert parse_config(Cfg, [])[0] == Cfg()
    helptext = build_parser(Cfg).format_help()
    assert "--n-pairs" in helptext and "pairs per relation (default: 30)" in helptext and "A toy script." in helptext
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--fmt", "chat"])  # not a choice
    assert e.value.code == 2


def test_invalid_config_is_one_line_exit_2_before_main(tmp_path, capsys):
    called = []
    rc = run_script(Cfg, lambda cfg, run: called.append(1), argv=_args(tmp_path, "--n-pairs", "0"))
    err = capsys.readouterr().err
    assert rc == 2 and not called
    assert err.startswith("error: --n-pairs must be >= 1") and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match="n-pairs"):
        run_script(Cfg, lambda cfg, run: None, argv=_args(tmp_path, "--n-pairs", "0", "--debug"))


def test_missing_data_file_and_unwritable_out_dir_fail_before_main(tmp_path, capsys):
    called = []
    main = lambda cfg, run: called.append(1)  # noqa: E731
    assert run_script(Cfg, main, argv=_args(tmp_path, "--dataset", str(tmp_path / "nope.jsonl"))) == 2
    assert "no such file" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_script(Cfg, main, argv=["--out-dir", str(blocker / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err
    assert not called


def test_run_resumes_and_is_keyed_on_data_content(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"a": 1}\n')
    computed: list[int] = []

    def main(cfg: Cfg, run: RunDir) -> dict:
        def compute():
            computed.append(1)
            return {"x": torch.full((2,), float(len(Path(cfg.dataset).read_text())))}

        res = run.stage(
            "x.safetensors", compute, lambda p, t: save_tensors(p, t, {"n": cfg.n_pairs}), lambda p: load_tensors(p)[0]
        )
        return {"x": res["x"][0].item(), "run": run.path.name}

    argv = _args(tmp_path, "--dataset", str(data), "--n-pairs", "4")
    assert run_script(Cfg, main, argv=argv) == 0
    runs = list((tmp_path / "out").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("dataset=pairs_n-pairs=4-")
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["x"] == 9.0 and summary["run"] == runs[0].name
    recorded = json.loads((runs[0] / "config.json").read_text())
    assert recorded["config"]["n_pairs"] == 4 and "batch_size" not in recorded["config"]
    assert set(recorded["data_sha256"]) == {"dataset"}

    # Same settings (batch size does not count): resumes, nothing recomputed.
    assert run_script(Cfg, main, argv=argv + ["--batch-size", "2"]) == 0
    assert len(computed) == 1 and len(list((tmp_path / "out").iterdir())) == 1

    # The file edited in place: a new run, never the old tensors.
    data.write_text('{"a": 22}\n')
    assert run_script(Cfg, main, argv=argv) == 0
    assert len(computed) == 2 and len(list((tmp_path / "out").iterdir())) == 2
    new = max((tmp_path / "out").iterdir(), key=lambda p: p.stat().st_mtime)
    assert json.loads((new / "summary.json").read_text())["x"] == 10.0


def test_different_config_in_a_named_run_is_refused_with_differences(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("one\n")
    main = lambda cfg, run: {"ok": True}  # noqa: E731
    base = _args(tmp_path, "--run-name", "mine", "--dataset", str(data))
    assert run_script(Cfg, main, argv=base) == 0
    assert run_script(Cfg, main, argv=base + ["--n-pairs", "7"]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "n_pairs: 30 -> 7" in err
    data.write_text("two\n")
    assert run_script(Cfg, main, argv=base) == 2
    assert "dataset content" in capsys.readouterr().err
    recorded = json.loads((tmp_path / "out" / "mine" / "config.json").read_text())
    assert recorded["config"]["n_pairs"] == 30  # the old run is untouched


def test_folder_without_config_is_refused(tmp_path, capsys):
    (tmp_path / "out" / "mine").mkdir(parents=True)
    (tmp_path / "out" / "mine" / "old.pt").write_text("x")
    assert run_script(Cfg, lambda c, r: {}, argv=_args(tmp_path, "--run-name", "mine")) == 2
    assert "no config.json" in capsys.readouterr().err
    assert run_script(Cfg, lambda c, r: {}, argv=_args(tmp_path, "--run-name", "../escape")) == 2
    assert "plain folder name" in capsys.readouterr().err


def test_failure_before_any_output_leaves_no_folder(tmp_path, capsys):
    def main(cfg, run):
        raise ValueError("layer 99 is out of range for a 3-layer model")

    assert run_script(Cfg, main, argv=_args(tmp_path, "--run-name", "r")) == 2
    assert "layer 99" in capsys.readouterr().err
    assert not (tmp_path / "out" / "r").exists()

    def main2(cfg, run):
        run.write_json("partial.json", {"a": 1})
        raise KeyError("unknown fit 'pca2'")

    assert run_script(Cfg, main2, argv=_args(tmp_path, "--run-name", "r")) == 2
    assert "error: unknown fit 'pca2'" in capsys.readouterr().err
    assert (tmp_path / "out" / "r" / "partial.json").exists()  # kept: it matches config.json


def test_bugs_are_not_hidden(tmp_path):
    def main(cfg, run):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_script(Cfg, main, argv=_args(tmp_path))


def test_final_log_line_names_the_outputs(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="mechlie")
    assert run_script(Cfg, lambda c, r: {"v": 1}, argv=_args(tmp_path, "--run-name", "r")) == 0
    assert caplog.records[-1].getMessage() == f"outputs in {tmp_path / 'out' / 'r'}"
