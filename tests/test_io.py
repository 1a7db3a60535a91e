"""mechlie.core.io: safetensors results with JSON metadata, atomic writes, clear errors, to_frame."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mechlie.core.io import (
    ResultFileError,
    UserError,
    atomic_write_json,
    load_tensors,
    read_json,
    save_tensors,
    to_frame,
)


@dataclass(frozen=True)
class _Cfg:
    n: int = 3
    path: Path = Path("a/b.jsonl")


def test_round_trip_nested_tensors_and_meta(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "logits": torch.randn(4, 7, generator=g),
        "honest": {"head_out": torch.randn(4, 2, 3, 5, generator=g), "known": torch.tensor([True, False, True, True])},
        "ids": torch.arange(4),
        "view": torch.randn(6, 6, generator=g)[:, ::2],  # non-contiguous view
    }
    meta = {"pairs": ["a", "b", "c", "d"], "cfg": _Cfg(), "score": torch.tensor(0.5), "nan": float("nan")}
    out = save_tensors(tmp_path / "r.safetensors", tensors, meta)
    assert out == tmp_path / "r.safetensors"
    got, got_meta = load_tensors(out)
    assert set(got) == {"logits", "honest", "ids", "view"} and set(got["honest"]) == {"head_out", "known"}
    assert torch.equal(got["logits"], tensors["logits"])
    assert torch.equal(got["honest"]["head_out"], tensors["honest"]["head_out"])
    assert got["honest"]["known"].dtype == torch.bool and got["honest"]["known"].tolist() == [True, False, True, True]
    assert got["ids"].dtype == torch.int64 and torch.equal(got["view"], tensors["view"])
    assert got_meta == {"pairs": ["a", "b", "c", "d"], "cfg": {"n": 3, "path": "a/b.jsonl"}, "score": 0.5, "nan": None}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_bad_keys_and_values_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="without '/'"):
        save_tensors(tmp_path / "x.safetensors", {"a/b": torch.zeros(1)})
    with pytest.raises(TypeError, match="only tensors"):
        save_tensors(tmp_path / "x.safetensors", {"a": [1, 2]})
    with pytest.raises(ValueError, match="empty dict"):
        save_tensors(tmp_path / "x.safetensors", {"a": {}})
    assert list(tmp_path.iterdir()) == []


def test_missing_corrupt_and_foreign_files_raise_clear_errors(tmp_path):
    with pytest.raises(ResultFileError, match="not found"):
        load_tensors(tmp_path / "missing.safetensors")
    path = save_tensors(tmp_path / "r.safetensors", {"x": torch.randn(100, 100)}, {"k": 1})
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ResultFileError, match="corrupt") as e:
        load_tensors(truncated)
    assert isinstance(e.value, UserError) and isinstance(e.value, OSError)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ResultFileError, match="corrupt"):
        load_tensors(garbage)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ResultFileError, match="not written by mechlie"):
        load_tensors(tmp_path / "foreign.safetensors")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_tensors(tmp_path / "r.safetensors", {"x": torch.ones(3)}, {"v": 1})
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_tensors(path, {"x": torch.zeros(3)}, {"v": 2})
    got, meta = load_tensors(path)
    assert got["x"].tolist() == [1.0, 1.0, 1.0] and meta == {"v": 1}
    atomic_write_json(tmp_path / "a.json", {"t": torch.tensor([1, 2])})
    assert read_json(tmp_path / "a.json") == {"t": [1, 2]}


def test_to_frame_long_form():
    eff = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    lo = eff - 1
    df = to_frame({"effect": eff, "lo": lo}, ("layer", "head"))
    assert list(df.columns) == ["layer", "head", "effect", "lo"] and len(df) == 6
    # Row for layer 1, head 2 holds eff[1, 2].
    row = df[(df["layer"] == 1) & (df["head"] == 2)]
    assert row.effect.item() == 5.0 and row.lo.item() == 4.0
    df2 = to_frame({"p": torch.tensor([0.1, 0.9], dtype=torch.bfloat16)}, ["pair"], coords={"pair": ["x", "y"]})
    assert df2.pair.tolist() == ["x", "y"] and df2.p.tolist()[1] == pytest.approx(0.9, abs=1e-2)
    assert len(to_frame({"s": torch.tensor(2.0)}, ())) == 1


def test_to_frame_errors():
    with pytest.raises(ValueError, match="one shape"):
        to_frame({"a": torch.zeros(2), "b": torch.zeros(3)}, ("i",))
    with pytest.raises(ValueError, match="name 2 dims"):
        to_frame({"a": torch.zeros(2)}, ("i", "j"))
    with pytest.raises(ValueError, match="2 labels"):
        to_frame({"a": torch.zeros(3)}, ("i",), coords={"i": ["x", "y"]})
    with pytest.raises(ValueError, match="unknown dims"):
        to_frame({"a": torch.zeros(3)}, ("i",), coords={"j": [1, 2, 3]})
