"""Atomic result files: JSON, and tensors as safetensors with JSON metadata.

Every result is written to a temporary file in the same folder and then ``os.replace``-d into
place, so a crash or a full disk never leaves a half-written file, and an existing result is only
replaced by a complete new one.

Tensors are saved with :func:`save_tensors` (safetensors, never pickles: loading a result cannot
run code). A nested ``dict`` of tensors is flattened with ``"/"``-joined keys and rebuilt on load;
``meta`` (any JSON-able object: config, pair ids, labels) is stored as JSON in the file's header.
:func:`to_frame` turns named tensors with named dims into a pandas long-form table for notebooks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

META_KEY = "mechlie"  # safetensors header key that holds the JSON metadata
SEP = "/"  # joins the keys of nested dicts in a flat safetensors file


class UserError(Exception):
    """Marker base class: an error caused by the user's input or files, reported by the CLI as one
    line (exit code 2) instead of a traceback. ``ValueError``, ``OSError`` and ``KeyError`` are
    treated the same way."""


class ResultFileError(UserError, OSError):
    """A result file is missing, truncated or not a mechlie safetensors file."""


class OutputDirError(OSError):
    """The output directory cannot be created or written."""


def ensure_writable_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise OutputDirError(f"output directory {path} is not writable: {e.strerror or e}") from e
    return path


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: dataclasses and dicts (string keys), lists, tensors and numpy
    scalars as numbers, paths as strings, NaN as ``None``."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:
        return None
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=2) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    return _atomic_write(Path(path), lambda f: torch.save(obj, f))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for k, v in tree.items():
        if not isinstance(k, str) or not k or SEP in k:
            raise ValueError(f"tensor key {k!r} must be a non-empty string without {SEP!r} (it nests dicts)")
        key = prefix + k
        if isinstance(v, dict):
            if not v:
                raise ValueError(f"{key!r} is an empty dict; safetensors cannot store it")
            flat.update(_flatten(v, key + SEP))
        elif isinstance(v, torch.Tensor):
            # safetensors refuses views that share storage, and needs contiguous CPU memory.
            flat[key] = v.detach().to("cpu").contiguous().clone()
        else:
            raise TypeError(f"{key!r} is a {type(v).__name__}; only tensors go in tensors, put the rest in meta")
    return flat


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, v in flat.items():
        *parents, leaf = key.split(SEP)
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def save_tensors(path: str | Path, tensors: dict[str, Any], meta: Any = None) -> Path:
    """Save a (nested) dict of tensors and JSON-able metadata atomically as one safetensors file.

    Args:
        path: destination, conventionally ``*.safetensors``.
        tensors: ``{name: tensor}``, values may be dicts of tensors (keys joined with ``"/"``).
        meta: anything :func:`atomic_write_json` accepts (dataclasses, tensors, paths...).

    Returns:
        ``path``.

    Example:
        >>> save_tensors("run/patching.safetensors", {"z": {"effect": eff}}, {"pairs": ids})
    """
    from safetensors.torch import save

    flat = _flatten(tensors)
    header = {META_KEY: json.dumps(jsonable(meta))}
    return atomic_write_bytes(path, save(flat, metadata=header))


def load_tensors(path: str | Path) -> tuple[dict[str, Any], Any]:
    """Load a file written by :func:`save_tensors`: ``(nested dict of tensors, meta)``.

    Raises:
        ResultFileError: the file is missing, truncated, corrupt, or has no mechlie metadata.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ResultFileError(f"result file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError on short reads
        raise ResultFileError(
            f"{path} is corrupt or not a safetensors file ({type(e).__name__}: {e}); delete it and rerun"
        ) from e
    if META_KEY not in header:
        raise ResultFileError(f"{path} is a safetensors file but was not written by mechlie.core.io.save_tensors")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise ResultFileError(f"{path}: its metadata is not valid JSON ({e}); delete it and rerun") from e
    return _unflatten(flat), meta


def to_frame(
    tensors: dict[str, torch.Tensor],
    dims: tuple[str, ...] | list[str],
    coords: dict[str, Any] | None = None,
):
    """Long-form pandas table of same-shape named tensors: one row per index, one column per dim
    and one per tensor.

    Args:
        tensors: ``{column name: tensor}``, all of the same shape, one dim per name in ``dims``.
        dims: the names of the tensors' dims, e.g. ``("layer", "head")``.
        coords: optional labels per dim (``{"pair": ids}``); default ``0..size-1``.

    Returns:
        a ``pandas.DataFrame`` with columns ``*dims, *tensors``.

    Example:
        >>> to_frame({"effect": eff, "lo": lo, "hi": hi}, ("layer", "head")).nlargest(5, "effect")
    """
    import pandas as pd

    if not tensors:
        raise ValueError("to_frame needs at least one tensor")
    dims = tuple(dims)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    shape = next(iter(shapes.values()))
    if len(set(shapes.values())) != 1:
        raise ValueError(f"to_frame needs tensors of one shape; got {shapes}")
    if len(dims) != len(shape):
        raise ValueError(f"dims {dims} name {len(dims)} dims but the tensors have shape {shape}")
    coords = dict(coords or {})
    unknown = set(coords) - set(dims)
    if unknown:
        raise ValueError(f"coords for unknown dims {sorted(unknown)}; dims are {dims}")
    grids = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij") if shape else ()
    columns: dict[str, Any] = {}
    for d, n, g in zip(dims, shape, grids):
        idx = g.reshape(-1).numpy()
        if d in coords:
            labels = list(coords[d])
            if len(labels) != n:
                raise ValueError(f"coords[{d!r}] has {len(labels)} labels for a dim of size {n}")
            columns[d] = [labels[i] for i in idx]
        else:
            columns[d] = idx
    for k, v in tensors.items():
        v = v.detach().to("cpu")
        columns[k] = (v.float() if v.dtype == torch.bfloat16 else v).reshape(-1).numpy()
    return pd.DataFrame(columns)
