"""Fixtures: tiny random HookedTransformers with a word-level tokenizer built in memory, and the
real embedded model (loaded once per session)."""

from __future__ import annotations

import os

import pytest
import torch

# The factories live in tiny_models; these names stay importable from conftest for older tests.
from tiny_models import WORDS, tiny_tokenizer, word_model  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_model(seed: int = 0, **overrides):
    """The word-level tiny model (3 layers, MLPs, tokenizer); overrides are config fields."""
    return word_model(seed=seed, **overrides)


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def smol():
    from mechlie.core.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu")


def no_hooks(model) -> bool:
    return all(len(hp.fwd_hooks) == 0 and len(hp.bwd_hooks) == 0 for hp in model.hook_dict.values())


@pytest.fixture(autouse=True)
def _no_grad_leak():
    yield
    torch.set_grad_enabled(True)
