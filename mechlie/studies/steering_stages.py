"""The steering study's run machinery: per-stage wall times (:class:`Clock`), stages under a prefix
(:class:`Prefixed`, one split seed's files), JSON stages, and the mean and SD over split seeds."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager

from mechlie.core.cli import RunDir

log = logging.getLogger("mechlie")


class Clock:
    """Per-stage wall times, logged as each stage ends (the run's progress) and kept for the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t0 = time.time()

    @contextmanager
    def __call__(self, stage: str):
        t = time.time()
        log.info("stage %s ...", stage)
        yield
        self.seconds[stage] = round(time.time() - t, 1)
        log.info("stage %s done in %.1f s (%.1f s so far)", stage, self.seconds[stage], time.time() - self.t0)


class Prefixed:
    """A run folder whose stages carry a prefix (one split seed's edits, sweeps and evaluations)."""

    def __init__(self, run: RunDir, prefix: str):
        self.run, self.prefix = run, prefix

    def stage(self, name, compute, save, load):
        return self.run.stage(self.prefix + name, compute, save, load)


def save_json(path, obj) -> None:
    from mechlie.core.io import atomic_write_json

    atomic_write_json(path, obj)


def load_sweep(path):
    from mechlie.core.io import read_json
    from mechlie.studies.steering_figures import sweep_points

    return sweep_points(read_json(path))


def read_stage(path):
    from mechlie.core.io import read_json

    return read_json(path)


def avg(v: list[float]) -> float:
    return sum(v) / len(v)


def sd(v: list[float]) -> float:
    """Sample standard deviation over seeds (NaN for one seed)."""
    if len(v) < 2:
        return float("nan")
    m = avg(v)
    return (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5


def n_layers_without_loading(name: str) -> int | None:
    """The layer count from a local checkpoint's config.json (no weights loaded); None if unknown."""
    try:
        from mechlie.core.models import resolve_hf_dir

        d = resolve_hf_dir(name)
        if d is None:
            return None
        cfg = json.loads((d / "config.json").read_text())
        return int(cfg.get("num_hidden_layers") or cfg["text_config"]["num_hidden_layers"])
    except Exception:  # unknown layout: checked again once the model is loaded
        return None


__all__ = ["Clock", "Prefixed", "avg", "load_sweep", "n_layers_without_loading", "read_stage", "save_json", "sd"]
