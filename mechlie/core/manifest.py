"""A run folder's integrity: one run at a time, and a sha256 per result file.

- **The lock.** A run holds ``<run>/.lock`` (``fcntl.flock``, non-blocking) from the moment its
  folder is prepared until it ends; a second run into the same folder is refused at once
  (:class:`RunLockedError`), so two runs can never mix their stages (issue 21, C12).
- **The manifest.** ``<run>/manifest.json`` records, for every file the run wrote, its size, its
  sha256 and the identity (settings + data content, as in ``config.json``) of the run that wrote
  it. It is rewritten atomically whenever the run folder writes a file. A stage is resumed only
  when its file still has its recorded sha256 and was made with the same identity
  (:meth:`Manifest.resumable`); ``make_figures`` and ``StudyResult.load`` verify every recorded
  file (:func:`verify_run`). Runs from before the manifest existed are read with a warning.

Only files this run wrote (new, or changed while it held the lock) are hashed, so a file damaged
between two runs keeps the hash it was written with, and the damage is found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import IO, Any

from mechlie.core.io import UserError, atomic_write_json, file_sha256, jsonable, read_json

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("mechlie")

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT = 1
NOT_RESULTS = ("config.json", MANIFEST)  # top-level files that are not result files
# mechlie's own temporary files (mechlie.core.io): tempfile's 8-character random part between ".<result name>."
# and ".tmp", where the result name has an extension mechlie writes; a user's ".notes.tmp" never matches.
STALE_TEMP = re.compile(
    r"^\.[^/]+\.(json|safetensors|md|html|png|svg|txt|csv|jsonl|arrow)\.[a-z0-9_]{8}\.tmp$|^\.write-test-[a-z0-9_]{8}$"
)


class RunLockedError(UserError, OSError):
    """Another run holds the run folder."""


class ResultChecksumError(UserError, ValueError):
    """A result file does not match the sha256 recorded when it was written."""


class StageIdentityError(UserError, FileExistsError):
    """A stage's file was made with other settings or data than this run's."""


def identity_sha256(identity: dict[str, Any]) -> str:
    """A short hash of a run's identity (settings + data content)."""
    return hashlib.sha256(json.dumps(jsonable(identity), sort_keys=True).encode()).hexdigest()[:16]


_HELD: dict[str, list] = {}  # folder -> [open lock file, holders] of the locks this process holds


class RunLock:
    """This process's hold on a run folder. Several holders in one process share the lock (a
    notebook that keeps an old run folder object while it reruns a study); another process is
    refused. Released by :meth:`release`, or when the holder is garbage-collected."""

    def __init__(self, key: str):
        self._key: str | None = key
        _HELD[key][1] += 1

    def release(self) -> None:
        key, self._key = self._key, None
        held = _HELD.get(key) if key is not None else None
        if held is not None:
            held[1] -= 1
            if held[1] <= 0:
                del _HELD[key]
                held[0].close()  # closing the file releases the flock

    def __del__(self) -> None:
        self.release()


def lock_run(run_dir: Path) -> RunLock:
    """Hold ``run_dir/.lock`` (the folder exists); :class:`RunLockedError` when another process
    holds it."""
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return RunLock(key)
    if fcntl is None:
        log.debug("no fcntl on this platform: %s is not locked", run_dir)
        _HELD[key] = [open(os.devnull, "a"), 0]
        return RunLock(key)
    _HELD[key] = [_flock(Path(run_dir)), 0]
    return RunLock(key)


def _flock(run_dir: Path) -> IO:
    lock = run_dir / LOCK
    for _ in range(5):
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RunLockedError(
                f"another run holds {run_dir} (its lock {lock} is taken); wait for that run to end, "
                "or pass another --run-name or --out-dir"
            ) from None
        try:  # the folder may have been removed (an empty run discarded) between open and flock
            same = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()
    raise RunLockedError(f"could not lock {run_dir}: its lock file keeps being replaced")


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete mechlie's temporary files left in ``run_dir`` by an interrupted atomic write (call it
    while holding the lock: no other run can be writing them)."""
    removed = []
    for p in sorted(run_dir.rglob(".*")):
        if p.is_file() and p.name != LOCK and STALE_TEMP.match(p.name):
            p.unlink(missing_ok=True)
            log.warning("removed %s, a temporary file left by an interrupted write", p)
            removed.append(p)
    return removed


def result_files(run_dir: Path) -> dict[str, os.stat_result]:
    """The run's result files (relative POSIX paths), hidden files and config/manifest left out."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if len(rel.parts) == 1 and rel.name in NOT_RESULTS:
            continue
        out[rel.as_posix()] = p.stat()
    return out


def read_manifest(run_dir: str | Path) -> dict | None:
    """``manifest.json`` of a run, or None when the run has none (an older mechlie)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultChecksumError(f"{path} is not valid JSON ({e}); delete the run folder and rerun") from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ResultChecksumError(f"{path} is not a mechlie manifest (no 'files' object); delete the run and rerun")
    return data


def _mismatch(path: Path, entry: dict) -> str | None:
    if path.stat().st_size != entry.get("bytes"):
        return f"{path.stat().st_size} bytes, {entry.get('bytes')} when written"
    if file_sha256(path) != entry.get("sha256"):
        return "its sha256 differs from the one recorded when it was written"
    return None


def verify_run(run_dir: str | Path, required: tuple[str, ...] = ()) -> None:
    """Check every file ``manifest.json`` records against its sha256; :class:`ResultChecksumError`
    naming the first file that differs. Without a manifest (an older run), or for a ``required``
    file the manifest does not record, a warning."""
    run_dir = Path(run_dir)
    man = read_manifest(run_dir)
    if man is None:
        log.warning("%s has no %s (written by an older mechlie): its files are read unverified", run_dir, MANIFEST)
        return
    for name, entry in man["files"].items():
        path = run_dir / name
        if path.is_file() and isinstance(entry, dict) and (why := _mismatch(path, entry)):
            raise ResultChecksumError(
                f"{path} does not match {run_dir / MANIFEST} ({why}): changed or damaged since the run wrote it; "
                "rerun the study to rewrite it"
            )
    for name in required:
        if name not in man["files"] and (run_dir / name).is_file():
            log.warning("%s is not recorded in %s: read unverified", run_dir / name, MANIFEST)


class Manifest:
    """The manifest of a run folder that this process holds (locked)."""

    def __init__(self, run_dir: Path, identity: dict[str, Any]):
        self.dir = Path(run_dir)
        self.identity = identity
        self.id = identity_sha256(identity)
        self._data = read_manifest(self.dir)
        self.legacy = self._data is None  # an older run's folder, or a new one
        self._start = {k: _key(st) for k, st in result_files(self.dir).items()}
        self._seen: dict[str, tuple] = {}

    def _blank(self) -> dict:
        return {"format": FORMAT, "identity_sha256": self.id, "identities": {}, "files": {}}

    def _record(self, data: dict, name: str, st: os.stat_result) -> None:
        data["files"][name] = {"bytes": st.st_size, "sha256": file_sha256(self.dir / name), "identity_sha256": self.id}
        data.setdefault("identities", {})[self.id] = jsonable(self.identity)

    def sync(self) -> None:
        """Record every file this run wrote since the last sync (new, or changed while it held the
        lock); drop the entries of files that are gone. Files untouched by this run keep their entry."""
        if not self.dir.is_dir():
            return
        data = self._data if self._data is not None else self._blank()
        changed = False
        files = result_files(self.dir)
        for name, st in files.items():
            key = _key(st)
            if self._seen.get(name) == key or self._start.get(name) == key:
                continue
            self._record(data, name, st)
            self._seen[name] = key
            changed = True
        for name in [n for n in data["files"] if n not in files]:
            del data["files"][name]
            changed = True
        if changed:
            data["identity_sha256"] = self.id
            atomic_write_json(self.dir / MANIFEST, data)
            self._data = data

    def resumable(self, name: str) -> bool:
        """Whether the saved stage ``name`` may be resumed: True when it matches its record; False,
        with a warning, when it changed since it was written, was never recorded, or the run has no
        manifest yet (an older mechlie: the file cannot be verified, so it is recomputed).

        Raises:
            StageIdentityError: the file was made with other settings or data, listed.
        """
        path = self.dir / name
        entry = self._data["files"].get(name) if self._data is not None else None
        if entry is None and self.legacy:
            # Never record a checksum over a file nothing has verified (the weight cache's rule too):
            # a stage of a run from before manifests is recomputed, and recorded from then on.
            log.warning(
                "recomputing %s: the run has no %s (an older mechlie), so the saved file cannot be verified",
                path,
                MANIFEST,
            )
            return False
        if not isinstance(entry, dict):
            log.warning("%s is not recorded in %s (an interrupted save?): recomputing it", path, MANIFEST)
            return False
        if entry.get("identity_sha256") != self.id:
            old = self._data.get("identities", {}).get(entry.get("identity_sha256"), {})
            raise StageIdentityError(
                f"{path} was made by a run with other settings or data ({differences(old, self.identity)}); "
                "pass another --run-name or --out-dir, or delete that folder"
            )
        why = _mismatch(path, entry)
        if why:
            log.warning("%s does not match %s (%s): damaged since it was written; recomputing it", path, MANIFEST, why)
            return False
        return True


def differences(old: dict, new: dict) -> str:
    """The settings and data files that differ between two run identities, as one line."""
    lines = []
    for section in ("config", "data_sha256"):
        a, b = old.get(section, {}), new.get(section, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                what = f"{k} content" if section == "data_sha256" else k
                lines.append(f"{what}: {_short(a.get(k, '<absent>'))} -> {_short(b.get(k, '<absent>'))}")
    return "; ".join(lines) or "the recorded config is not in the expected format"


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "..."


def _key(st: os.stat_result) -> tuple:
    # An atomic rewrite makes a new inode; any other write changes the size or the mtime.
    return (st.st_ino, st.st_size, st.st_mtime_ns)


__all__ = [
    "LOCK",
    "MANIFEST",
    "Manifest",
    "ResultChecksumError",
    "RunLock",
    "RunLockedError",
    "StageIdentityError",
    "differences",
    "identity_sha256",
    "lock_run",
    "read_manifest",
    "remove_stale_temps",
    "result_files",
    "verify_run",
]
