"""A study is one object: a ``Config``, a ``run()``, and a ``Result`` that loads, summarises and
draws itself.

Every experiment in mechlie (the head sweep, detection, steering, ...) is a :class:`Study`
registered here by name. The pieces:

- ``config``: a frozen dataclass whose fields are the script's flags (:mod:`mechlie.core.cli` turns
  them into ``--flags``, checks them, and names and resumes the run folder from them);
- ``run(cfg, model, run_dir) -> Result``: the computation, writing its stages into the run folder
  (``run_dir.stage(...)`` resumes each), and returning the result;
- ``result``: a :class:`StudyResult` subclass. ``Result.load(run_dir)`` reads a finished run back
  from its saved files only (``summary.json`` plus safetensors; never a pickle), ``summary()`` is the
  small JSON that ``summary.json`` holds, ``figures()`` the write-up figures (plotly, drawn by
  :mod:`mechlie.report`), ``headline()`` the Markdown lines of ``report.md`` and
  ``docs/results/<study>.md``, and ``report()`` what the script prints at the end.

A script in ``analyses/`` is then a launcher::

    from mechlie.studies.base import launch
    from mechlie.studies.head_sweep import STUDY

    if __name__ == "__main__":
        sys.exit(launch(STUDY, doc=__doc__))

and ``analyses/make_figures.py`` is a loop over ``load_result(run).figures()``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from mechlie.core.cli import RunDir, run_script
from mechlie.core.io import UserError
from mechlie.core.manifest import verify_run

if TYPE_CHECKING:  # plotly and TransformerLens load only when a study runs or draws
    import plotly.graph_objects as go
    from transformer_lens import HookedTransformer


class RunFormatError(UserError, ValueError):
    """A folder that is not a finished run of a known study: unknown kind, older format, missing file."""


def read_summary(run_dir: str | Path) -> dict:
    """The run's ``summary.json`` as a dict; :class:`RunFormatError` naming the file otherwise."""
    path = Path(run_dir) / "summary.json"
    if not Path(run_dir).is_dir():
        raise RunFormatError(f"{run_dir} is not a folder")
    if not path.is_file():
        raise RunFormatError(f"{run_dir} has no summary.json: not a finished mechlie run")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFormatError(f"{path} is not valid JSON ({e}); rerun the script that wrote it") from e
    if not isinstance(data, dict):
        raise RunFormatError(f"{path} holds a {type(data).__name__}, not a JSON object; rerun the script")
    return data


def ci_text(d: dict, spec: str = ".3f") -> str:
    """A saved estimate (``{"mean", "lo", "hi", ...}``) as ``mean [lo, hi]``, each in format ``spec``."""
    return f"{format(d['mean'], spec)} [{format(d['lo'], spec)}, {format(d['hi'], spec)}]"


class StudyResult:
    """A finished run of one study, read from its run folder (or just computed).

    Subclasses set ``study`` (the registered name), ``required`` (summary keys without which the
    run is from an older version), ``files`` (the results files beside ``summary.json``) and
    ``title_format``, and override ``figures``, ``headline`` and ``report``.
    """

    study: ClassVar[str] = ""
    required: ClassVar[tuple[str, ...]] = ()
    files: ClassVar[tuple[str, ...]] = ()
    # e.g. "Head sweep: {model}, n={n_pairs} pairs": each field from summary.json, "" where a key is absent
    title_format: ClassVar[str] = ""

    def __init__(self, run_dir: str | Path, summary: dict):
        self.run_dir = Path(run_dir)
        self._summary = summary

    @classmethod
    def load(cls, run_dir: str | Path) -> StudyResult:
        summary = read_summary(run_dir)
        cls.check_keys(run_dir, summary, cls.required)
        for name in cls.files:
            path = Path(run_dir) / name
            if not path.is_file():
                raise RunFormatError(f"missing results file: {path}")
        verify_run(run_dir, ("summary.json", *cls.files))  # every file still has the sha256 it was written with
        return cls(run_dir, summary)

    @classmethod
    def check_keys(cls, run_dir: str | Path, part: dict, keys: tuple[str, ...]) -> None:
        """Refuse the run when ``part`` (of its ``summary.json``) lacks any of ``keys``: an older version wrote it."""
        missing = [k for k in keys if k not in part]
        if missing:
            raise RunFormatError(
                f"{Path(run_dir) / 'summary.json'} lacks {missing}: it was written by an older version of "
                f"mechlie (or another script); rerun the {cls.study} study"
            )

    def summary(self) -> dict:
        return self._summary

    def config(self) -> dict:
        """The run's settings (``config.json``), or {} when the run has none."""
        path = self.run_dir / "config.json"
        return json.loads(path.read_text()).get("config", {}) if path.is_file() else {}

    def tensors(self, name: str) -> tuple[dict[str, Any], Any]:
        """The run's safetensors file ``name``: its tensors and its metadata."""
        from mechlie.core.io import load_tensors

        return load_tensors(self.run_dir / name)

    def figures(self) -> dict[str, go.Figure]:
        """The write-up figures by file stem, drawn from saved files only."""
        return {}

    def captions(self) -> dict[str, str]:
        return {}

    def title(self) -> str:
        if not self.title_format:
            return self.study
        return self.title_format.format_map(defaultdict(str, self._summary))

    def headline(self) -> list[str]:
        """Markdown lines with the headline numbers (each with its CI and its null)."""
        return []

    def report(self) -> str:
        """What the script prints when the run ends (default: the headline)."""
        return "\n".join(self.headline())

    def wrote(self) -> list[str]:
        """The report's closing lines: the run's files, then each figure's files."""
        out = [f"\nwrote {self.run_dir}/config.json, summary.json, {', '.join(self.files)} and figures:"]
        for name, v in self._summary.get("figures", {}).items():
            out.append(f"  {name}: " + ", ".join(str(x) for x in v.values() if x))
        return out


@dataclass(frozen=True)
class Study:
    """One experiment: its flags, its computation and its result type (see the module docstring)."""

    name: str
    config: type
    run: Callable[[Any, HookedTransformer, RunDir], StudyResult]
    result: type[StudyResult]
    load_model: bool = True  # False: run() loads what it needs itself (e.g. several models)
    # Cheap checks of the inputs, run by launch() before the model loads (e.g. read a pairs file), so
    # that a bad row fails in a second rather than after the weights load; raise a user error.
    check: Callable[[Any], None] | None = None
    # Boolean flags that make a run another experiment, not a rerun (steering's --corpus): a run with one
    # set gets its own docs page, ``<study>[_<model>]_<flag>``, beside the default run's.
    page_flags: tuple[str, ...] = ()


STUDIES: dict[str, Study] = {}


def register(study: Study) -> Study:
    """Add ``study`` to the registry (``make_figures`` and ``docs/results`` find it there)."""
    if study.result.study != study.name:
        raise ValueError(f"study {study.name!r}: its result class says study={study.result.study!r}")
    STUDIES[study.name] = study
    return study


def _import_all() -> None:
    # Registering is an import side effect of each study module; import them all before a lookup.
    import importlib
    import pkgutil

    import mechlie.studies as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "base":
            importlib.import_module(f"mechlie.studies.{info.name}")


def study_of(run_dir: str | Path) -> Study:
    """The registered study that wrote ``run_dir`` (its ``summary.json`` names it as ``kind``)."""
    summary = read_summary(run_dir)
    _import_all()
    kind = summary.get("kind")
    if kind not in STUDIES:
        known = ", ".join(sorted(STUDIES))
        raise RunFormatError(f"{run_dir} is not a run of a study mechlie knows (kind {kind!r}; known: {known})")
    return STUDIES[kind]


def load_result(run_dir: str | Path) -> StudyResult:
    """Read a finished run of any registered study."""
    return study_of(run_dir).result.load(run_dir)


def launch(study: Study, *, argv: list[str] | None = None, doc: str | None = None) -> int:
    """Run ``study`` as a script: flags, checks and the run folder from :func:`run_script`, the study's
    own input ``check`` (e.g. its data file's content), then load the model (late, so that bad flags and
    bad data fail before any weights load), ``run``, and print the result's report. ``summary.json``
    gets the result's summary with ``kind`` and timings added."""

    def main(cfg: Any, run: RunDir) -> dict:
        if study.check is not None:
            study.check(cfg)
        t0 = time.time()
        if isinstance(getattr(cfg, "seed", None), int):
            import torch

            torch.manual_seed(cfg.seed)  # before the model loads, as the scripts did: same global RNG state
        model = None
        if study.load_model:
            from mechlie.core.models import load_model

            model = load_model(cfg.model, **({"device": cfg.device} if hasattr(cfg, "device") else {}))
        loaded = time.time() - t0
        result = study.run(cfg, model, run)
        summary = result.summary()
        summary.setdefault("kind", study.name)
        summary.setdefault("seconds", round(time.time() - t0, 1))
        summary.setdefault("load_model_seconds", round(loaded, 1))
        print(result.report())
        return summary

    return run_script(study.config, main, argv=argv, doc=doc)


__all__ = [
    "RunFormatError",
    "STUDIES",
    "Study",
    "StudyResult",
    "ci_text",
    "launch",
    "load_result",
    "read_summary",
    "register",
    "study_of",
]
