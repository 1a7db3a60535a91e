"""Flags that several studies share, each written once: the same default and help in every script.

Each function returns a dataclass ``field`` for a study's ``Config`` (:mod:`mechlie.core.cli`
turns the field into a ``--flag``); the annotation stays on the config, e.g.
``n_devices: int = n_devices_flag()``.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from mechlie.core.models import DEFAULT_MODEL


def model_flag(default: str = DEFAULT_MODEL) -> Any:
    """``--model``: the model a study loads."""
    return field(default=default, metadata={"help": "embedded name, .gguf file, HF dir, or TL name"})


def device_flag() -> Any:
    """``--device``: where the model runs."""
    return field(default="", metadata={"help": "cpu, cuda, ... (default: cuda if available)"})


def n_devices_flag() -> Any:
    """``--n-devices``: the model's layers split over several GPUs."""
    return field(default=1, metadata={"help": "split the layers over this many GPUs (TransformerLens's n_devices)"})


__all__ = ["device_flag", "model_flag", "n_devices_flag"]
