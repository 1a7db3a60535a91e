"""Fixtures: tiny random HookedTransformers with a word-level tokenizer built in memory, and the
real embedded model (loaded once per session)."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "Q A What is the capital of France Paris Spain Madrid Italy Rome Japan Tokyo Peru Lima "
    "Chile Santiago Egypt Cairo Kenya Nairobi Cuba Havana Iran Tehran honest liar Answer truthfully "
    "lie always never you are an assistant opposite hot cold"
).split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<unk>", "?", ":", ".", ",", '"'] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")


def tiny_model(seed: int = 0, **overrides) -> HookedTransformer:
    cfg = dict(
        n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64, act_fn="gelu",
        normalization_type="LN", positional_embedding_type="rotary", seed=seed, device="cpu",
        d_vocab=len(WORDS) + 8,
    )
    cfg.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    # Assigned directly: set_tokenizer would try to reload it by name from a hub.
    model.tokenizer = tiny_tokenizer()
    model.cfg.default_prepend_bos = False
    model.eval()
    return model


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def smol():
    from mechlie.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu")


def no_hooks(model) -> bool:
    return all(len(hp.fwd_hooks) == 0 and len(hp.bwd_hooks) == 0 for hp in model.hook_dict.values())


@pytest.fixture(autouse=True)
def _no_grad_leak():
    yield
    torch.set_grad_enabled(True)
