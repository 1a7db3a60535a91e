"""Batched generation with a KV cache, under interventions that know the prompt/generated phase.

:func:`generate` takes strings (tokenized with :func:`mechlie.core.pairs.tokenize`, left-padded) or a
:class:`mechlie.core.pairs.Batch` of token ids and attention mask (tokenizer-free). It runs the prompt
once into a ``TransformerLensKeyValueCache``, then one position per step, so a hook sees the whole
(padded) prompt in the first pass and exactly one new position per later pass. Before every pass it
tells the :class:`~mechlie.core.hooks.SteeringState` which phase is running, which is how the
``"prompt"`` / ``"generated"`` position policies work.

Decoding is greedy, or sampled from ``softmax(logits / temperature)`` (optionally top-k) with a
seeded ``torch.Generator``. A row stops at EOS, when its decoded continuation contains a stop
string, or after ``max_new_tokens``; once every row has stopped the loop ends. Tokens after a stop
are the pad id and are 0 in ``new_mask``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from mechlie.core.hooks import Intervention, SteeringError, SteeringState, steer
from mechlie.core.pairs import Batch, PairError, tokenize


class GenerationError(ValueError):
    """Bad generation arguments."""


@dataclass(frozen=True)
class GenerationResult:
    prompt: Batch
    tokens: Int[Tensor, "batch new"]  # generated ids; pad id after a row stopped
    new_mask: Int[Tensor, "batch new"]  # 1 = a generated token kept (the EOS itself is kept)
    logits: Float[Tensor, "batch new vocab"] | None  # the logits each token was chosen from
    texts: list[str] | None  # decoded continuation, cut before a stop string
    stop_reason: list[str]  # "eos", "stop_string" or "max_new_tokens"
    # log-softmax of ``logits`` at each chosen token (untempered; meaningless where new_mask is 0)
    logprobs: Float[Tensor, "batch new"] | None = None


def _pad_id(model: HookedTransformer) -> int:
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return 0


def _choose(
    logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, gen: torch.Generator | None
) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if top_k is not None:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(logits.device)


def _check_args(
    model: HookedTransformer,
    max_new_tokens: int,
    interventions: Sequence[Intervention],
    state: SteeringState | None,
    do_sample: bool,
    temperature: float,
    stop_strings: Sequence[str],
    n_per_prompt: int,
    greedy_first: bool,
) -> None:
    if n_per_prompt < 1:
        raise GenerationError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    if n_per_prompt > 1 and (interventions or state is not None):
        raise GenerationError("n_per_prompt > 1 is not supported under interventions (their rows are per prompt)")
    if greedy_first and not do_sample:
        raise GenerationError("greedy_first only makes sense with do_sample=True")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not (temperature > 0 and temperature == temperature):
        raise GenerationError(f"temperature must be > 0 when sampling, got {temperature}")
    if interventions and state is not None:
        raise GenerationError("pass either interventions (applied here) or the state of a steer() you opened")
    if stop_strings and getattr(model, "tokenizer", None) is None:
        raise GenerationError("stop strings need a tokenizer to decode with")


def _prompt_batch(model: HookedTransformer, prompts: Sequence[str] | Batch, max_new_tokens: int) -> Batch:
    """The left-padded prompt batch, checked (shape, and room in the context for the new tokens)."""
    if isinstance(prompts, Batch):
        batch = prompts
        if batch.tokens.ndim != 2 or batch.tokens.shape != batch.attention_mask.shape or batch.tokens.shape[0] == 0:
            raise GenerationError("a Batch needs 2-d tokens and attention_mask of the same, non-empty shape")
    else:
        if len(prompts) == 0:
            raise PairError("no prompts to generate from")
        if getattr(model, "tokenizer", None) is None:
            raise GenerationError("string prompts need a model with a tokenizer; pass a Batch of token ids")
        batch = tokenize(model, list(prompts))
    if batch.tokens.shape[1] + max_new_tokens > model.cfg.n_ctx:
        raise GenerationError(f"prompt ({batch.tokens.shape[1]}) + max_new_tokens exceeds n_ctx {model.cfg.n_ctx}")
    return batch


def _repeat_rows(cache: TransformerLensKeyValueCache, logits: Tensor, k: int) -> Tensor:
    """Every prompt's cache rows and logits, repeated: ``k`` continuations from one prompt pass."""
    for e in cache.entries:
        e.past_keys = e.past_keys.repeat_interleave(k, 0)
        e.past_values = e.past_values.repeat_interleave(k, 0)
    cache.previous_attention_mask = cache.previous_attention_mask.repeat_interleave(k, 0)
    return logits.repeat_interleave(k, 0)


@dataclass
class _Decoding:
    """The rows being decoded: tokens chosen so far, which are kept, and why each row stopped."""

    tokens: Tensor  # [n, max_new_tokens], pad after a stop
    mask: Tensor  # [n, max_new_tokens], 1 = a kept token
    done: Tensor  # [n] bool
    reason: list[str]

    @classmethod
    def empty(cls, n: int, max_new_tokens: int, pad: int) -> "_Decoding":
        return cls(
            torch.full((n, max_new_tokens), pad, dtype=torch.long),
            torch.zeros((n, max_new_tokens), dtype=torch.long),
            torch.zeros(n, dtype=torch.bool),
            ["max_new_tokens"] * n,
        )

    def record(self, step: int, nxt: Tensor, pad: int, eos_token_id: int | None, stop_strings, tok) -> Tensor:
        """Store step ``step``'s tokens (pad for stopped rows), mark rows that stop; the fed tokens."""
        nxt = torch.where(self.done, torch.full_like(nxt, pad), nxt)
        live = ~self.done
        self.tokens[:, step] = nxt
        self.mask[live, step] = 1
        for i in live.nonzero().flatten().tolist():
            if eos_token_id is not None and int(nxt[i]) == eos_token_id:
                self.done[i], self.reason[i] = True, "eos"
            elif stop_strings:
                text = tok.decode(self.tokens[i, : step + 1][self.mask[i, : step + 1].bool()])
                if any(s in text for s in stop_strings):
                    self.done[i], self.reason[i] = True, "stop_string"
        return nxt

    def texts(self, tok, stop_strings: Sequence[str]) -> list[str] | None:
        """Decoded continuations, cut before the first stop string."""
        if tok is None:
            return None
        out = []
        for i in range(len(self.tokens)):
            text = tok.decode(self.tokens[i][self.mask[i].bool()], skip_special_tokens=True)
            cuts = [text.index(s) for s in stop_strings if s in text]
            out.append(text[: min(cuts)] if cuts else text)
        return out


@torch.no_grad()
def generate(
    model: HookedTransformer,
    prompts: Sequence[str] | Batch,
    *,
    max_new_tokens: int = 16,
    interventions: Sequence[Intervention] = (),
    state: SteeringState | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_token_id: int | None | str = "model",
    stop_strings: Sequence[str] = (),
    return_logits: bool = False,
    n_per_prompt: int = 1,
    greedy_first: bool = False,
) -> GenerationResult:
    """Generate from ``prompts`` with ``interventions`` applied (see :mod:`mechlie.control.steering`).

    Pass ``interventions`` to have them applied (and removed) around this call, or apply them
    yourself with :func:`mechlie.control.steering.steer` and pass the ``state`` it yields. ``eos_token_id``
    defaults to the tokenizer's EOS; ``None`` disables stopping at EOS. ``n_per_prompt`` and
    ``greedy_first``: see the module docstring (``prompt`` in the result stays one row per prompt).
    The logits are the model's own output (soft-capped by TransformerLens like
    :func:`mechlie.core.metrics.final_logits`), read from the cached passes.
    """
    _check_args(
        model, max_new_tokens, interventions, state, do_sample, temperature, stop_strings, n_per_prompt, greedy_first
    )
    tok = getattr(model, "tokenizer", None)
    batch = _prompt_batch(model, prompts, max_new_tokens)
    if eos_token_id == "model":
        eos_token_id = tok.eos_token_id if tok is not None else None

    device = model.cfg.device
    tokens, mask = batch.tokens.to(device), batch.attention_mask.to(device)
    width = tokens.shape[1]
    n = tokens.shape[0] * n_per_prompt  # rows decoded
    pad = _pad_id(model)
    gen = torch.Generator().manual_seed(seed) if do_sample else None
    ctx = steer(model, *interventions) if interventions else nullcontext(state)
    dec = _Decoding.empty(n, max_new_tokens, pad)
    out_logits: list[Tensor] = []
    out_lp: list[Tensor] = []  # kept always: one float per row and step, not the whole vocabulary

    with ctx as st:
        st = st if st is not None else SteeringState()
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, tokens.shape[0])
        st.begin_forward("prompt", 0, 0)
        logits = model(tokens, attention_mask=mask, past_kv_cache=cache)[:, -1]
        if n_per_prompt > 1:
            logits = _repeat_rows(cache, logits, n_per_prompt)
        for step in range(max_new_tokens):
            if return_logits:
                out_logits.append(logits.float().cpu())
            nxt = _choose(logits, do_sample, temperature, top_k, gen).cpu()
            if greedy_first:
                nxt[::n_per_prompt] = logits[::n_per_prompt].argmax(-1).cpu()
            out_lp.append(logits.float().log_softmax(-1).gather(-1, nxt[:, None].to(logits.device))[:, 0].cpu())
            nxt = dec.record(step, nxt, pad, eos_token_id, stop_strings, tok)
            if dec.done.all() or step == max_new_tokens - 1:
                break
            # Finished rows keep being fed (pad ids) so the batch stays rectangular; nothing reads them.
            st.begin_forward("generated", step + 1, width + step)
            logits = model(
                nxt[:, None].to(device),
                attention_mask=torch.ones((n, 1), dtype=mask.dtype, device=device),
                past_kv_cache=cache,
            )[:, -1]

    n_steps = int(dec.mask.sum(0).nonzero().max()) + 1 if dec.mask.any() else 0
    return GenerationResult(
        prompt=batch,
        tokens=dec.tokens[:, :n_steps],
        new_mask=dec.mask[:, :n_steps],
        logits=torch.stack(out_logits, 1)[:, :n_steps] if return_logits else None,
        texts=dec.texts(tok, stop_strings),
        stop_reason=dec.reason,
        logprobs=torch.stack(out_lp, 1)[:, :n_steps],
    )


__all__ = ["GenerationError", "GenerationResult", "SteeringError", "generate"]
