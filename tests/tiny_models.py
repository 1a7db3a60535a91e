"""Tiny random HookedTransformers for fast tests (no weights downloaded): the one factory.

``tiny_model(...)`` builds a seeded random model from a config; the keyword knobs cover what the
tests vary (layers, heads, MLPs, normalization, positional embedding, GQA, seed, tokenizer), and
any other ``HookedTransformerConfig`` field can be passed through (``d_model=16``, ``act_fn=None``).
With ``tokenizer=True`` the model gets an in-memory word-level tokenizer over :data:`WORDS`, so
prompts such as ``"Q What is the capital of France ? A Paris"`` can be tokenized.
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechlie.core.pairs import AnswerSet, Batch, builtin_facts

WORDS = (
    "Q A What is the capital of France Paris Spain Madrid Italy Rome Japan Tokyo Peru Lima "
    "Chile Santiago Egypt Cairo Kenya Nairobi Cuba Havana Iran Tehran honest liar Answer truthfully "
    "lie always never you are an assistant opposite hot cold"
).split()
# Every built-in answer word too: an unknown word is <unk>, and two <unk> answers would share a first token.
WORDS += tuple(sorted({w for rel in builtin_facts().values() for _, a in rel["facts"] for w in a.split()} - set(WORDS)))
SPECIALS = ["<pad>", "<bos>", "<unk>", "?", ":", ".", ",", '"']


def tiny_tokenizer():
    """A word-level tokenizer built in memory: ids 0-7 are specials and punctuation, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")


def tiny_model(
    *,
    n_layers: int = 2,
    n_heads: int = 4,
    attn_only: bool = True,
    linear: bool = False,
    normalization: str | None = "LN",
    positional_embedding: str = "rotary",
    n_key_value_heads: int | None = None,
    d_vocab: int | None = None,
    n_ctx: int = 64,
    seed: int = 0,
    tokenizer: bool = False,
    **cfg_overrides,
) -> HookedTransformer:
    """A seeded random ``HookedTransformer`` (d_model 32, d_head 8, d_mlp 64 unless ``attn_only``).

    Args:
        linear: no layer norm at all (same as ``normalization=None``), so logits are linear in the
            last layer's head outputs.
        d_vocab: default 50, or the tokenizer's vocabulary size with ``tokenizer=True``.
        tokenizer: attach :func:`tiny_tokenizer` (``default_prepend_bos=False``).
        cfg_overrides: any other ``HookedTransformerConfig`` field; wins over the knobs above.
    """
    if d_vocab is None:
        d_vocab = len(SPECIALS) + len(WORDS) if tokenizer else 50
    cfg = dict(
        n_layers=n_layers,
        d_model=32,
        n_ctx=n_ctx,
        d_head=8,
        n_heads=n_heads,
        d_vocab=d_vocab,
        d_mlp=None if attn_only else 64,
        act_fn=None if attn_only else "gelu",
        attn_only=attn_only,
        normalization_type=None if linear else normalization,
        positional_embedding_type=positional_embedding,
        n_key_value_heads=n_key_value_heads,
        seed=seed,
        device="cpu",
    )
    cfg.update(cfg_overrides)
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    if tokenizer:
        # Assigned directly: set_tokenizer would try to reload it by name from a hub.
        model.tokenizer = tiny_tokenizer()
        model.cfg.default_prepend_bos = False
    model.eval()
    return model


def word_model(seed: int = 0, **overrides) -> HookedTransformer:
    """The conftest's ``tiny`` model: 3 layers with MLPs and the word-level tokenizer."""
    return tiny_model(**{"n_layers": 3, "attn_only": False, "tokenizer": True, "seed": seed, **overrides})


def softcap_model(seed: int = 0, cap: float = 2.0, scale: float = 20.0) -> HookedTransformer:
    """The word-level model with a Gemma-2-style output soft-cap (``cap * tanh(logits / cap)``) and
    its unembedding scaled by ``scale``, so raw logits are far beyond ``cap`` and the cap matters."""
    model = word_model(seed=seed, output_logits_soft_cap=cap)
    with torch.no_grad():
        model.W_U.mul_(scale)
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
