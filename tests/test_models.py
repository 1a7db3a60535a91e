"""Model loading on the real embedded models (the first run dequantizes and caches them)."""

import pytest
import torch

from mechlie.models import EMBEDDED, ModelLoadError, check_gguf, embedded_gguf_path, load_hf, load_model, resolve_hf_dir

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
        from mechlie.pairs import tokenize

        assert tokenize(model, [p]).tokens.tolist() == ids.tolist()
    assert worst <= 1e-3, f"{name}: max |Δ log-prob| = {worst}"


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
