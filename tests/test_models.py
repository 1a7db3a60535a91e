"""Model loading on the real embedded models (the first run dequantizes and caches them)."""

import pytest
import torch

from mechlie.core.models import (
    EMBEDDED,
    ModelLoadError,
    check_gguf,
    embedded_gguf_path,
    load_hf,
    load_model,
    resolve_hf_dir,
)

PROMPTS = [
    "The capital of France is",
    "Q: What is the capital of Japan?\nA:",
    "Once upon a time, in a small village by the sea, there lived",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_logits_match_hugging_face(name, smol):
    model = smol if name == "smollm2-135m-instruct" else load_model(name, device="cpu")
    hf, tok = load_hf(name)
    worst = 0.0
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf(ids).logits.log_softmax(-1)
            got = model(ids).log_softmax(-1)
        worst = max(worst, (ref - got).abs().max().item())
        # Same tokenization through mechlie's own path as through HF's.
        from mechlie.core.pairs import tokenize

        assert tokenize(model, [p]).tokens.tolist() == ids.tolist()
    assert worst <= 1e-3, f"{name}: max |Δ log-prob| = {worst}"


@pytest.mark.slow
def test_embedded_models_resolve_to_cached_dirs(smol):
    d = resolve_hf_dir("smollm2-135m-instruct")
    assert (d / "config.json").is_file() and d.parent.name == "hf"
    assert resolve_hf_dir("smollm2-135m-instruct") == d  # keyed by the GGUF hash: stable


def test_cache_dir_override(tmp_path, monkeypatch):
    # A cache dir is used as given; the GGUF check runs before any conversion work.
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(b"")
    with pytest.raises(ModelLoadError):
        load_model(str(bad), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "hf").exists() or not any((tmp_path / "cache" / "hf").iterdir())


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="Unknown model"):
        load_model("definitely-not-a-model-xyz")


def test_corrupt_and_truncated_gguf(tmp_path):
    real = embedded_gguf_path("smollm2-135m-instruct")
    truncated = tmp_path / "truncated.gguf"
    with open(real, "rb") as f:
        truncated.write_bytes(f.read(2_000_000))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(str(truncated), cache_dir=tmp_path)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        check_gguf(garbage)
    with pytest.raises(ModelLoadError, match="not found"):
        check_gguf(tmp_path / "missing.gguf")
    check_gguf(real)  # the real file passes


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


# --- The weight cache: checksums, damaged entries rebuilt, non-finite weights refused ------------


def _fake_checkpoint(d, value: float = 1.0):
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(256, 256, generator=g) * value, "b": torch.zeros(256)}, str(d / "model.safetensors"))
    return d / "model.safetensors"


def _overwrite_middle(path, n: int):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = b"\xff" * n  # 0xffffffff is a NaN in float32
    path.write_bytes(bytes(data))


def test_cache_checksums_catch_corruption_and_truncation(tmp_path):
    from mechlie.core.models import CHECKSUMS, cache_problem, write_checksums

    weights = _fake_checkpoint(tmp_path / "entry")
    write_checksums(tmp_path / "entry")
    assert cache_problem(tmp_path / "entry") is None
    data = weights.read_bytes()
    _overwrite_middle(weights, 4096)
    assert "corrupted" in cache_problem(tmp_path / "entry")
    weights.write_bytes(data[: len(data) - 1000])
    assert "truncated" in cache_problem(tmp_path / "entry")
    weights.unlink()
    assert "no .safetensors" in cache_problem(tmp_path / "entry")
    (tmp_path / "entry" / CHECKSUMS).write_text("{not json")
    weights.write_bytes(data)
    assert "unreadable" in cache_problem(tmp_path / "entry")
    assert cache_problem(tmp_path / "missing") == "no config.json"


def test_cache_entry_without_checksums_is_unverified_and_never_blessed(tmp_path):
    """Issue 21 (W3): checksums used to be recorded over whatever an entry without them held."""
    from mechlie.core.models import CHECKSUMS, cache_problem

    for name in ("ok", "nan"):
        weights = _fake_checkpoint(tmp_path / name)
        if name == "nan":
            _overwrite_middle(weights, 4096)
        assert "unverified" in cache_problem(tmp_path / name)
        assert not (tmp_path / name / CHECKSUMS).exists()  # nothing recorded over an unverified file


def test_cache_entry_without_checksums_is_rebuilt_from_the_gguf(tmp_path, monkeypatch, caplog):
    """Issue 21 (W3): CHECKSUMS.json deleted and weights zeroed loaded silently, with new checksums."""
    import mechlie.core.models as models

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    builds = []
    monkeypatch.setattr(models, "check_gguf", lambda p: None)
    monkeypatch.setattr(models, "_dequantize", lambda src, out: builds.append(src) or _fake_checkpoint(out))
    d = models.gguf_to_hf_dir(gguf, tmp_path / "cache")
    intact = (d / "model.safetensors").read_bytes()
    (d / models.CHECKSUMS).unlink()
    data = bytearray(intact)
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # zeroed: finite, so only checksums can tell
    (d / "model.safetensors").write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="mechlie.core.models"):
        assert models.gguf_to_hf_dir(gguf, tmp_path / "cache") == d
    assert len(builds) == 2 and (d / "model.safetensors").read_bytes() == intact
    assert models.cache_problem(d) is None
    assert any(str(d) in r.getMessage() and "unverified" in r.getMessage() for r in caplog.records)


def test_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog):
    import mechlie.core.models as models

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    builds = []

    def fake_dequantize(src, out):
        builds.append(src)
        _fake_checkpoint(out)

    monkeypatch.setattr(models, "check_gguf", lambda p: None)
    monkeypatch.setattr(models, "_dequantize", fake_dequantize)
    d = models.gguf_to_hf_dir(gguf, tmp_path / "cache")
    assert len(builds) == 1 and (d / models.CHECKSUMS).is_file() and (d / "SOURCE").is_file()
    assert models.gguf_to_hf_dir(gguf, tmp_path / "cache") == d and len(builds) == 1  # intact: reused
    _overwrite_middle(d / "model.safetensors", 1 << 14)
    with caplog.at_level("WARNING", logger="mechlie.core.models"):
        assert models.gguf_to_hf_dir(gguf, tmp_path / "cache") == d
    assert len(builds) == 2 and models.cache_problem(d) is None
    assert any(str(d) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert [p.name for p in d.parent.iterdir()] == [d.name]  # no temporary folder left


def test_failed_conversion_leaves_no_entry(tmp_path, monkeypatch):
    import mechlie.core.models as models

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")

    def broken(src, out):
        (out / "partial").write_text("x")
        raise ModelLoadError("transformers could not load it")

    monkeypatch.setattr(models, "check_gguf", lambda p: None)
    monkeypatch.setattr(models, "_dequantize", broken)
    with pytest.raises(ModelLoadError):
        models.gguf_to_hf_dir(gguf, tmp_path / "cache")
    assert list((tmp_path / "cache" / "hf").iterdir()) == []


def test_non_finite_weights_are_refused():
    from mechlie.core.models import check_finite
    from tests.tiny_models import tiny_model

    model = tiny_model()
    check_finite(model, "tiny")
    with torch.no_grad():
        model.blocks[1].attn.W_Q[0, 0, 0] = float("nan")
    with pytest.raises(ModelLoadError, match=r"tiny: weight blocks\.1\.attn\.W_Q has non-finite"):
        check_finite(model, "tiny")


@pytest.mark.slow
def test_corrupted_real_cache_is_rebuilt(tmp_path, monkeypatch, smol):
    """Issue 8.9: 1 MB overwritten in the middle of the cached weights used to load silently."""
    import shutil

    import mechlie.core.models as models
    from mechlie.core.pairs import tokenize

    src = resolve_hf_dir("smollm2-135m-instruct")
    cache = tmp_path / "cache"
    shutil.copytree(src, cache / "hf" / src.name)
    weights = cache / "hf" / src.name / "model.safetensors"
    assert models.cache_problem(cache / "hf" / src.name) is None
    _overwrite_middle(weights, 1 << 20)
    assert "corrupted" in models.cache_problem(cache / "hf" / src.name)
    # The rebuild copies the intact entry instead of dequantizing again (20-55 s, tested on first use).
    rebuilt = []

    def copy_intact(gguf, out):
        rebuilt.append(gguf)
        for f in src.iterdir():
            if f.name != models.CHECKSUMS:
                shutil.copy2(f, out / f.name)

    monkeypatch.setattr(models, "_dequantize", copy_intact)
    model = load_model("smollm2-135m-instruct", device="cpu", cache_dir=cache)
    assert len(rebuilt) == 1 and models.cache_problem(cache / "hf" / src.name) is None
    toks = tokenize(model, ["The capital of France is"]).tokens
    with torch.no_grad():
        got, ref = model(toks)[0, -1], smol(toks)[0, -1]
    assert (got - ref).abs().max().item() < 1e-3
    assert model.tokenizer.decode(got.argmax()).strip() == "Paris"


def test_model_id_hashes_every_weight_and_is_cached_per_model():
    import hashlib

    from tiny_models import tiny_model

    from mechlie.core.models import model_id

    model = tiny_model(seed=0)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert model_id(model) == h.hexdigest()[:16]
    assert model_id(tiny_model(seed=0)) == model_id(model) != model_id(tiny_model(seed=1))
    other = tiny_model(seed=0)
    with torch.no_grad():
        other.W_U[0, 0] += 1e-3  # any weight, not just a few rounded rows
    assert model_id(other) != model_id(model)
