"""Residual patching by position x layer, from the honest (clean) run into the lying run.

For every layer ``l`` and prompt position, the lying prompt is rerun with the residual stream
(``blocks.l.hook_resid_pre`` by default, i.e. the input of block ``l``) at that one position
replaced by its value in the honest run, and the answer is scored. Effects are normalized as in
:class:`mechlie.patching.PatchResult` (0 = lying baseline, 1 = honest baseline, over means).

**Alignment.** Honest and lying prompts can differ in length (a chat template, a longer false
answer), so positions are aligned *from the end*: offset ``-1`` is the final prompt token in
both, ``-2`` the one before, and so on, over the common suffix (``min`` of the two lengths) only.
Across pairs, only offsets present in every pair are kept. For the built-in few-shot format both
prompts have the same tokens except the demonstration answers, so the whole prompt aligns. (The
last demonstrations, the question and the final ``A:`` are the same tokens in both; earlier
offsets may pair different tokens when the lengths differ, which is why alignment stops at the
shorter prompt.)

**Speed.** A patch at position ``p`` cannot change positions before ``p``, so the lying prompt is
run once into a key/value cache, and each position's patches (one per layer, as rows of one
batch) rerun only the suffix from ``p`` over a view of the cache truncated to ``p`` positions.
The cost is ``sum over patched positions of (suffix length x layers)`` tokens; patching only the
last ``n_positions`` positions and a subset of layers keeps a CPU run short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from mechlie.activations import LAYER_KINDS, hook_name
from mechlie.metrics import AnswerScores, score_logits
from mechlie.pairs import AnswerSet, ContrastPair, PairError, answer_set, tokenize


def align_from_end(len_clean: int, len_corrupt: int, n_positions: int | None = None) -> list[tuple[int, int]]:
    """``(clean_index, corrupt_index)`` for offsets ``-m .. -1`` (in that order), where ``m`` is
    the shorter length, capped at ``n_positions``."""
    if len_clean < 1 or len_corrupt < 1:
        raise PairError("prompts must have at least one token")
    m = min(len_clean, len_corrupt)
    if n_positions is not None:
        m = min(m, n_positions)
    return [(len_clean - k, len_corrupt - k) for k in range(m, 0, -1)]


@dataclass(frozen=True)
class PositionPatchResult:
    kind: str
    p_truth: Float[Tensor, "n pos layer"]  # patched, per pair / offset / layer
    logit_diff: Float[Tensor, "n pos layer"]
    clean: AnswerScores
    corrupt: AnswerScores
    offsets: tuple[int, ...]  # offset from the end of each position, e.g. (-16, ..., -1)
    layers: tuple[int, ...]

    def effect(self, metric: str = "logit_diff") -> Float[Tensor, "pos layer"]:
        patched = getattr(self, metric).mean(0)
        lo, hi = getattr(self.corrupt, metric).mean(), getattr(self.clean, metric).mean()
        return (patched - lo) / (hi - lo)


def _truncated_view(cache: TransformerLensKeyValueCache, p: int, n: int) -> TransformerLensKeyValueCache:
    """The first ``p`` cached positions of (batch-1) ``cache``, repeated ``n`` times, no copy."""
    entries = [
        TransformerLensKeyValueCacheEntry(
            e.past_keys[:1, :p].expand(n, -1, -1, -1), e.past_values[:1, :p].expand(n, -1, -1, -1), frozen=True
        )
        for e in cache.entries
    ]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask[:1, :p].expand(n, -1), frozen=True)


@torch.no_grad()
def patch_positions_tokens(
    model,
    clean: Sequence[Int[Tensor, " pos"]],
    corrupt: Sequence[Int[Tensor, " pos"]],
    answers: AnswerSet,
    *,
    kind: str = "resid_pre",
    layers: Sequence[int] | None = None,
    n_positions: int | None = None,
    progress: bool = True,
) -> PositionPatchResult:
    """Patch ``kind`` at every (aligned offset, layer) from ``clean[i]`` into ``corrupt[i]``.

    Prompts are unpadded 1-D token tensors, so prompt lengths may differ freely.
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"kind must be one of {LAYER_KINDS}")
    if len(clean) != len(corrupt) or not clean:
        raise PairError("need the same, non-zero number of clean and corrupt prompts")
    layers = tuple(range(model.cfg.n_layers)) if layers is None else tuple(int(l) for l in layers)
    n, nl = len(clean), len(layers)
    m = min(min(len(c), len(k)) for c, k in zip(clean, corrupt))
    P = m if n_positions is None else min(m, n_positions)
    dev = model.cfg.device
    p_truth, logit_diff = torch.empty((n, P, nl)), torch.empty((n, P, nl))
    clean_logits, corrupt_logits = torch.empty((n, model.cfg.d_vocab)), torch.empty((n, model.cfg.d_vocab))
    bar = tqdm(total=n * P, desc=f"patching {kind} by position", disable=not progress, leave=False)
    for i in range(n):
        ct, kt = clean[i].to(dev)[None], corrupt[i].to(dev)[None]
        store: dict[int, Tensor] = {}

        def saver(layer: int):
            def hook(act, hook):
                store[layer] = act[0].detach()

            return hook

        with model.hooks(fwd_hooks=[(hook_name(kind, l), saver(l)) for l in layers]):
            clean_logits[i] = model(ct)[0, -1].float().cpu()
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, dev, 1)
        corrupt_logits[i] = model(kt, attention_mask=torch.ones_like(kt), past_kv_cache=cache)[0, -1].float().cpu()
        cache.freeze()
        rows = AnswerSet(*(t[i : i + 1].expand(nl, -1) for t in (answers.truth, answers.lie, answers.choices)))
        for j, (ci, ki) in enumerate(align_from_end(ct.shape[1], kt.shape[1], P)):
            hooks = []
            for r, layer in enumerate(layers):

                def patch(act, hook, r=r, v=store[layer][ci]):
                    act[r, 0] = v.to(act.dtype)  # suffix position 0 is prompt position ki
                    return act

                hooks.append((hook_name(kind, layer), patch))
            suffix = kt[:, ki:].expand(nl, -1)
            with model.hooks(fwd_hooks=hooks):
                if ki == 0:
                    logits = model(suffix)[:, -1]
                else:
                    view = _truncated_view(cache, ki, nl)
                    logits = model(suffix, attention_mask=torch.ones_like(suffix), past_kv_cache=view)[:, -1]
            sc = score_logits(logits.float(), rows)
            p_truth[i, j], logit_diff[i, j] = sc.p_truth.cpu(), sc.logit_diff.cpu()
            bar.update(1)
    bar.close()
    return PositionPatchResult(
        kind, p_truth, logit_diff, score_logits(clean_logits, answers), score_logits(corrupt_logits, answers),
        tuple(range(-P, 0)), layers,
    )


def patch_positions(
    model,
    pairs: Sequence[ContrastPair],
    *,
    kind: str = "resid_pre",
    layers: Sequence[int] | None = None,
    n_positions: int | None = None,
    progress: bool = True,
) -> PositionPatchResult:
    """:func:`patch_positions_tokens` on ``pairs`` (honest = clean, lying = corrupt)."""
    if not pairs:
        raise PairError("no pairs to patch")

    def toks(text: str) -> Tensor:
        b = tokenize(model, [text])
        return b.tokens[0].cpu()

    return patch_positions_tokens(
        model, [toks(p.honest) for p in pairs], [toks(p.lying) for p in pairs], answer_set(model.tokenizer, pairs),
        kind=kind, layers=layers, n_positions=n_positions, progress=progress,
    )
