"""One command-line convention for every script in ``analyses/``.

A script declares its settings as a frozen dataclass and its work as ``main(cfg, run) -> dict``;
:func:`run_script` does the rest, in this order, so that bad input fails in a second, before any
model loads, and nothing is half-written:

1. flags from the dataclass fields (``n_pairs`` -> ``--n-pairs``; ``bool`` -> ``--x/--no-x``;
   ``Literal`` -> choices; ``tuple[int, ...]`` -> several values; ``int | None`` accepts ``none``;
   help from ``field(metadata={"help": ...})``), plus ``--debug``;
2. the config is built, so its ``__post_init__`` checks run (raise ``ValueError``); checks every
   script shares run too (:func:`check_common_fields`: integers fit in 64 bits, ``--n-boot`` is
   bounded, ``--device`` exists on this machine);
3. fields with ``metadata={"path": True}`` whose value looks like a path (has a suffix or a
   separator, or exists) must be readable files (a directory only with ``"dir": True``); their
   content's sha256 becomes part of the run;
4. ``out_dir`` must be writable;
5. the run folder is ``out_dir/run_name``, or, when ``run_name`` is empty, a name made of the
   settings that differ from the defaults plus a short hash of all settings and of the data files'
   content, so a rerun resumes and an edited data file starts a new run. The folder is locked for
   the run (a second run into it is refused), mechlie's stale temporary files in it are removed,
   and a folder that holds a different config is refused, with the differences listed (one that holds
   other files but no ``config.json`` is refused naming them, hidden ones such as ``.DS_Store`` too);
6. ``main`` runs; ``config.json`` is written (atomically) when the run first writes an output, and
   the summary ``main`` returns goes to ``summary.json``. ``manifest.json`` records the sha256 of
   every file written (:mod:`mechlie.core.manifest`); a stage is resumed only if it still matches.
   A run that wrote nothing leaves no folder (nor a new ``out_dir``) behind.

Fields with ``metadata={"run": False}`` (``out_dir``, ``run_name`` always; e.g. ``batch_size``)
do not change the results, so they are left out of the run's identity.

User errors (``ValueError``, ``OSError``, ``KeyError``, :class:`mechlie.core.io.UserError`) print one
line and exit with code 2; ``--debug`` shows the traceback and debug logs.

Example::

    @dataclass(frozen=True)
    class Config:
        dataset: str = field(default="all", metadata={"help": "a relation or a .jsonl file", "path": True})
        n_pairs: int = field(default=30, metadata={"help": "pairs per relation"})
        out_dir: str = "results/demo"
        run_name: str = ""

    def main(cfg: Config, run: RunDir) -> dict:
        acts = run.stage("acts.safetensors", compute, save_tensors_fn, load_fn)  # resumes
        return {"auroc": 0.9}

    if __name__ == "__main__":
        sys.exit(run_script(Config, main, doc=__doc__))
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union

from mechlie.core.io import UserError, atomic_write_json, ensure_writable_dir, file_sha256, jsonable, read_json
from mechlie.core.manifest import LOCK, MANIFEST, Manifest, RunLock, differences, lock_run, remove_stale_temps

log = logging.getLogger("mechlie")

USER_ERRORS = (UserError, ValueError, OSError, KeyError)
NOISY_LOGGERS = (
    "httpx",
    "httpcore",
    "urllib3",
    "filelock",
    "kaleido",
    "choreographer",
    "transformers",
    "datasets",
    "huggingface_hub",
    "matplotlib",
    "PIL",
    "sae_lens",
    "asyncio",
)
LOCATION_FIELDS = ("out_dir", "run_name")  # where a run lives, not what it computes
T = TypeVar("T")


class ConfigMismatchError(UserError, FileExistsError):
    """The run folder already holds a run with different settings."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _in_run(f: dataclasses.Field) -> bool:
    return f.name not in LOCATION_FIELDS and f.metadata.get("run", True)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _scalar_parser(tp: Any, name: str) -> Callable[[str], Any]:
    if tp in (int, float, str):
        return tp
    if tp is Path:
        return Path
    raise TypeError(f"run_script cannot make a flag for field {name!r} of type {tp!r}")


def _add_field(p: argparse.ArgumentParser, f: dataclasses.Field, tp: Any) -> None:
    default = _default(f)
    kw: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", "")}
    if default is dataclasses.MISSING:
        kw["required"] = True
    else:
        kw["default"] = default
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        kw["help"] += f" (default: {shown!r})" if shown == "" else f" (default: {shown})"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = origin in (Union, types.UnionType) and type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"run_script cannot make a flag for field {f.name!r} of type {tp!r}")
        tp = rest[0]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    flags = [_flag(f.name), *f.metadata.get("aliases", ())]
    if tp is bool:
        p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        return
    if origin is Literal:
        kw["choices"] = list(args)
        conv: Callable[[str], Any] = type(args[0])
    elif origin in (tuple, list):
        inner = args[0] if args else str
        conv = _scalar_parser(inner, f.name)
        kw["nargs"] = "+" if not optional else "*"
    else:
        conv = _scalar_parser(tp, f.name)
    if optional:
        base = conv
        conv = lambda s: None if s.lower() == "none" else base(s)  # noqa: E731
        conv.__name__ = getattr(base, "__name__", "value")  # argparse names the type in its errors
    kw["type"] = conv
    if kw.get("choices") is not None and "metavar" not in kw:
        kw["metavar"] = "{" + ",".join(map(str, args)) + "}"
    p.add_argument(*flags, **kw)


def build_parser(config_cls: type, doc: str | None = None) -> argparse.ArgumentParser:
    """The ``argparse`` parser for a frozen config dataclass (see the module docstring)."""
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
        raise TypeError(f"{config_cls!r} must be a frozen dataclass")
    hints = typing.get_type_hints(config_cls)
    p = argparse.ArgumentParser(
        description=doc or config_cls.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(config_cls):
        if f.init:
            _add_field(p, f, hints[f.name])
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return p


def parse_config(config_cls: type[T], argv: list[str] | None = None, doc: str | None = None) -> tuple[T, bool]:
    """``(config, debug)`` from the command line; the config's own checks have run."""
    ns = vars(build_parser(config_cls, doc).parse_args(argv))
    debug = ns.pop("debug")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if isinstance(ns.get(f.name), list) and typing.get_origin(hints[f.name]) is not list:
            ns[f.name] = tuple(ns[f.name])  # frozen configs hold tuples, argparse gives lists
    check_common_fields(ns)
    return config_cls(**ns), debug


INT64 = (-(2**63), 2**63 - 1)
MAX_N_BOOT = 100_000  # a bootstrap CI needs ~1e3-1e4 resamples; more only exhausts memory


def check_common_fields(values: dict[str, Any]) -> None:
    """Checks every script shares, each naming its flag (``ValueError``): integers fit in 64 bits
    (torch's seeds and sizes), ``n_boot`` is at most :data:`MAX_N_BOOT`, and ``device`` names a
    device this machine has (before any model loads)."""
    for name, value in values.items():
        ints = value if isinstance(value, (tuple, list)) else (value,)
        for v in ints:
            if isinstance(v, int) and not isinstance(v, bool) and not INT64[0] <= v <= INT64[1]:
                raise ValueError(f"{_flag(name)} must fit in a signed 64-bit integer, got {v}")
    n_boot = values.get("n_boot")
    if isinstance(n_boot, int) and n_boot > MAX_N_BOOT:
        raise ValueError(f"--n-boot must be at most {MAX_N_BOOT:,}, got {n_boot:,}")
    device = values.get("device")
    if isinstance(device, str) and device:
        check_device(device)


def check_device(device: str) -> None:
    """``ValueError`` naming ``--device`` when ``device`` is not a device this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a torch device ({e})") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")


def _looks_like_path(value: str) -> bool:
    return bool(Path(value).suffix) or os.sep in value or "/" in value or Path(value).exists()


def data_files(cfg: Any) -> dict[str, Path]:
    """The data files a config names (fields with ``metadata={"path": True}``), checked readable."""
    out: dict[str, Path] = {}
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("path"):
            continue
        value = getattr(cfg, f.name)
        if value is None or value == "" or not _looks_like_path(str(value)):
            continue  # a built-in name, not a file
        path = Path(value).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{_flag(f.name)}: no such file: {path}")
        if path.is_dir():
            if f.metadata.get("dir"):
                continue  # e.g. a model directory: too big to hash, and not user data
            raise IsADirectoryError(f"{_flag(f.name)}: {path} is a directory, not a file")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"{_flag(f.name)}: cannot read {path}")
        out[f.name] = path
    return out


def _identity(cfg: Any, files: dict[str, Path]) -> dict[str, Any]:
    """What a run computes from: the settings that matter, and the data files' content."""
    settings = {f.name: jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if _in_run(f)}
    return {"config": settings, "data_sha256": {k: file_sha256(p) for k, p in sorted(files.items())}}


def _slug(value: Any, is_path: bool) -> str:
    if isinstance(value, (tuple, list)):
        s = ",".join(map(str, value))
    elif is_path and isinstance(value, str) and _looks_like_path(value):
        s = Path(value).stem
    else:
        s = str(value)
    return re.sub(r"[^A-Za-z0-9.,=+-]+", "_", s).strip("_") or "none"


def run_name(cfg: Any, identity: dict[str, Any]) -> str:
    """``<settings that differ from the defaults>-<hash of settings and data>``; stable across runs."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    parts = []
    for f in dataclasses.fields(cfg):
        if not _in_run(f):
            continue
        value = getattr(cfg, f.name)
        default = _default(f)
        if default is dataclasses.MISSING or jsonable(value) != jsonable(default):
            parts.append(f"{f.name.replace('_', '-')}={_slug(value, bool(f.metadata.get('path')))}")
    stem = "_".join(parts)[:80] or "default"
    return f"{stem}-{digest}"


class RunDir:
    """A run's output folder, held by one run at a time (:func:`mechlie.core.manifest.lock_run`).
    ``config.json`` is written on the first output, so a run that fails before writing anything
    leaves nothing behind; ``manifest.json`` records the sha256 of every file the run writes, and
    a stage is resumed only when its file still matches it (see :mod:`mechlie.core.manifest`).

    Attributes:
        path: the folder (created, with ``config.json``, on first access).
        identity: ``{"config": settings, "data_sha256": {field: sha256}}``, as in ``config.json``.
    """

    def __init__(self, path: str | Path, identity: dict[str, Any]):
        self._path = Path(path)
        self.identity = identity
        self._created_dir = False
        self._created: list[Path] = []  # folders this run made (the run folder, a new --out-dir), deepest first
        self._wrote_config = False
        self._lock: RunLock | None = None
        self._manifest: Manifest | None = None

    def open(self) -> None:
        """Create the folder, lock it, remove mechlie's stale temporary files, refuse a different run."""
        if self._lock is not None:
            return
        p = self._path.absolute()
        while not p.exists():
            self._created.append(p)
            p = p.parent
        self._created_dir = bool(self._created)
        try:
            ensure_writable_dir(self._path)
            self._lock = lock_run(self._path)
            remove_stale_temps(self._path)
            self.check()
            self._manifest = Manifest(self._path, self.identity)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Record what the run wrote, remove the folder if it holds no output, release the lock."""
        if self._lock is None:
            return  # never held: the folder may be another run's
        if self._manifest is not None and self._wrote_config:
            self._manifest.sync()
        self.discard_if_empty()
        self._lock.release()
        self._lock = None

    def check(self) -> None:
        """Refuse a folder that holds a different run (or outputs with no ``config.json``)."""
        cfg_path = self._path / "config.json"
        if cfg_path.is_file():
            try:
                old = read_json(cfg_path)
            except json.JSONDecodeError as e:
                raise ConfigMismatchError(f"{cfg_path} is not valid JSON ({e}); delete {self._path}") from e
            if not isinstance(old, dict) or jsonable(old) != jsonable(self.identity):
                diff = differences(old if isinstance(old, dict) else {}, self.identity)
                raise ConfigMismatchError(
                    f"{self._path} holds a run with different settings ({diff}); "
                    "pass another --run-name or --out-dir, or delete that folder"
                )
        elif self._path.is_dir() and (found := sorted(p.name for p in self._path.iterdir() if p.name != LOCK)):
            # Named, hidden ones too: a Finder's .DS_Store is invisible to a plain `ls`.
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise ConfigMismatchError(
                f"{self._path} holds files but no config.json ({shown}), so they cannot be matched to these "
                "settings; pass another --run-name or --out-dir, or delete that folder"
            )

    @property
    def path(self) -> Path:
        if not self._wrote_config:
            self.open()
            if not (self._path / "config.json").is_file():
                atomic_write_json(self._path / "config.json", self.identity)
            self._wrote_config = True
        return self._path

    def file(self, name: str) -> Path:
        """``path / name``, the folder existing."""
        return self.path / name

    def sync(self) -> None:
        """Record in ``manifest.json`` the files written since the last record (done on every
        :meth:`stage` and :meth:`write_json`, and when the run ends)."""
        if self._manifest is not None:
            self._manifest.sync()

    def stage(
        self, name: str, compute: Callable[[], T], save: Callable[[Path, T], Any], load: Callable[[Path], T]
    ) -> T:
        """Load ``name`` if an earlier run of these settings saved it and it still matches its
        sha256; otherwise compute it and save it (``save`` must write atomically, e.g. with
        :func:`mechlie.core.io.save_tensors`)."""
        target = self._path / name
        self.open()
        if target.exists() and self._manifest is not None and self._manifest.resumable(name):
            log.info("resuming: reusing %s", target)
            return load(target)
        out = compute()
        save(self.file(name), out)
        self.sync()
        return out

    def write_json(self, name: str, obj: Any) -> Path:
        out = atomic_write_json(self.file(name), obj)
        self.sync()
        return out

    def discard_if_empty(self) -> None:
        """Remove the folder (and a new ``--out-dir``) if this process created it and wrote no output."""
        if self._created_dir and self._path.is_dir():
            left = [p.name for p in self._path.iterdir() if not p.name.startswith(".")]
            if not [n for n in left if n not in ("config.json", MANIFEST)]:
                shutil.rmtree(self._path, ignore_errors=True)
                for d in self._created[1:]:
                    try:
                        d.rmdir()  # only if empty
                    except OSError:
                        break


def prepare_run(cfg: Any) -> RunDir:
    """Checks data files and ``out_dir``, names the run, locks its folder, refuses a different config
    in it. Call ``close()`` on the result when the run ends (:func:`run_script` does)."""
    files = data_files(cfg)
    identity = _identity(cfg, files)
    out_dir = getattr(cfg, "out_dir", None)
    if out_dir is None:
        raise TypeError(f"{type(cfg).__name__} needs an out_dir field")
    name = getattr(cfg, "run_name", "") or run_name(cfg, identity)
    if Path(name).name != name or name in (".", ".."):
        raise ValueError(f"--run-name must be a plain folder name, got {name!r}")
    run = RunDir(Path(out_dir) / name, identity)
    run.open()
    for field, path in files.items():
        log.info("%s: %s (sha256 %s)", field, path, identity["data_sha256"][field][:12])
    return run


def setup_logging(debug: bool = False) -> None:
    # No force=True: a caller (a notebook, pytest) that configured logging keeps its handlers.
    logging.basicConfig(format="%(message)s")
    logging.getLogger().setLevel(logging.DEBUG if debug else logging.INFO)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if debug else logging.WARNING)


def _user_message(e: BaseException) -> str:
    if isinstance(e, KeyError) and len(e.args) == 1:
        return str(e.args[0])  # str(KeyError) adds quotes
    return str(e) or type(e).__name__


def run_script(
    config_cls: type[T],
    main: Callable[[T, RunDir], dict | None],
    *,
    argv: list[str] | None = None,
    doc: str | None = None,
) -> int:
    """Parse flags into ``config_cls``, check inputs, prepare the run folder, run ``main``.

    Args:
        config_cls: a frozen dataclass with ``out_dir`` and ``run_name`` fields; its
            ``__post_init__`` raises ``ValueError`` on bad settings.
        main: ``main(cfg, run) -> summary``; the summary (JSON-able) is written to ``summary.json``.
        argv: the arguments (default ``sys.argv[1:]``).
        doc: the ``--help`` description (pass the script's ``__doc__``).

    Returns:
        the exit code: 0 done, 2 user error (one line on stderr), 130 interrupted.

    Example:
        >>> sys.exit(run_script(HeadSweepConfig, main, doc=__doc__))
    """
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    setup_logging(debug)
    run: RunDir | None = None
    try:
        cfg, debug = parse_config(config_cls, argv, doc)
        run = prepare_run(cfg)
        summary = main(cfg, run)
        if summary is not None:
            run.write_json("summary.json", summary)
        if run._wrote_config:
            log.info("outputs in %s", run._path)
        else:
            log.info("nothing written")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume from the saved stages", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {_user_message(e)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    finally:
        if run is not None:
            run.close()  # records what was written, removes a folder with no output, releases the lock
