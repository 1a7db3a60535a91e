"""Tiny random HookedTransformers for fast, tokenizer-free tests (no weights downloaded)."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechlie.pairs import AnswerSet, Batch


def tiny_model(
    *, n_layers: int = 2, n_heads: int = 4, attn_only: bool = True, linear: bool = False,
    n_key_value_heads: int | None = None, d_vocab: int = 50, seed: int = 0,
) -> HookedTransformer:
    """``linear=True``: no layer norm, so logits are linear in the last layer's head outputs."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=32, n_ctx=64, d_head=8, n_heads=n_heads, d_vocab=d_vocab,
        d_mlp=None if attn_only else 64, act_fn=None if attn_only else "gelu", attn_only=attn_only,
        normalization_type=None if linear else "LN", positional_embedding_type="rotary",
        n_key_value_heads=n_key_value_heads, seed=seed, device="cpu",
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model


def random_batch(n: int, length: int, d_vocab: int = 50, seed: int = 0, last_token: int | None = None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, d_vocab, (n, length), generator=g)
    if last_token is not None:
        tokens[:, -1] = last_token
    return Batch(tokens, torch.ones_like(tokens))


def answers(n: int, truth: int = 3, lie: int = 4) -> AnswerSet:
    return AnswerSet(
        torch.full((n, 1), truth), torch.full((n, 1), lie), torch.tensor([[truth, lie]]).expand(n, -1).clone()
    )
