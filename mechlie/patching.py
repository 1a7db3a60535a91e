"""Activation patching at the final position, from the honest (clean) run into the lying run.

For every pair and every component (each head's ``z``, or each layer's residual), the lying
prompt is rerun with that component's activation at the final position replaced by its value in
the honest run, and the answer is scored.

Metric, normalized per component over the pairs' means:
``effect = (mean(m_patched) - mean(m_lying)) / (mean(m_honest) - mean(m_lying))``, so 0 is the
lying baseline and 1 the honest baseline, for ``m`` = the logit difference (truth vs. the pair's
lie answer) and for ``m`` = P(truth). Normalizing the means, not each pair, keeps pairs with a
tiny honest-lying gap from dominating. Per-pair raw metrics are kept in the result as well.

Why it is fast: a patch at the final position cannot change any earlier position (attention is
causal), so the lying prompt's prefix is run once and its keys and values are cached. Each patch
is then a single-token forward pass over that cache, and many patches (one per batch row) run in
one pass over a cache view expanded without copying. TransformerLens's patching functions rerun
the whole prompt once per component.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from mechlie.activations import HEAD_KINDS, LAYER_KINDS, collect, hook_name
from mechlie.metrics import AnswerScores, score_logits
from mechlie.pairs import AnswerSet, Batch, ContrastPair, PairError, answer_set, tokenize

PATCHABLE = ("z",) + LAYER_KINDS


@dataclass(frozen=True)
class PatchResult:
    kind: str  # "z" (per head) or a residual/layer kind
    p_truth: Float[Tensor, "n *c"]  # per pair, per component, after patching
    logit_diff: Float[Tensor, "n *c"]
    clean: AnswerScores  # honest run
    corrupt: AnswerScores  # lying run

    def effect(self, metric: str = "logit_diff") -> Float[Tensor, "*c"]:
        """Normalized effect: 0 = lying baseline, 1 = honest baseline."""
        patched = getattr(self, metric).mean(0)
        lo = getattr(self.corrupt, metric).mean()
        hi = getattr(self.clean, metric).mean()
        return (patched - lo) / (hi - lo)


def _view_cache(cache: TransformerLensKeyValueCache, row: int, n: int) -> TransformerLensKeyValueCache:
    """A frozen cache holding row ``row`` of ``cache`` repeated ``n`` times, without copying."""
    entries = [
        TransformerLensKeyValueCacheEntry(
            e.past_keys[row : row + 1].expand(n, -1, -1, -1),
            e.past_values[row : row + 1].expand(n, -1, -1, -1),
            frozen=True,
        )
        for e in cache.entries
    ]
    mask = cache.previous_attention_mask[row : row + 1].expand(n, -1)
    return TransformerLensKeyValueCache(entries, mask, frozen=True)


@torch.no_grad()
def prefix_cache(model, batch: Batch) -> TransformerLensKeyValueCache:
    """Keys and values of every position but the last, for each prompt of ``batch``."""
    if batch.tokens.shape[1] < 2 or (batch.lengths < 2).any():
        raise PairError("patching needs prompts of at least 2 tokens")
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch.tokens.shape[0])
    model(batch.tokens[:, :-1], attention_mask=batch.attention_mask[:, :-1], past_kv_cache=cache, return_type=None)
    cache.freeze()
    return cache


@torch.no_grad()
def final_step_logits(
    model,
    cache: TransformerLensKeyValueCache,
    row: int,
    last_token: int,
    n: int,
    fwd_hooks: Sequence = (),
) -> Float[Tensor, "n vocab"]:
    """Logits of ``n`` copies of prompt ``row``'s final token over its cached prefix."""
    view = _view_cache(cache, row, n)
    tokens = torch.full((n, 1), last_token, dtype=torch.long, device=model.cfg.device)
    mask = torch.ones((n, 1), dtype=torch.long, device=model.cfg.device)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        return model(tokens, attention_mask=mask, past_kv_cache=view)[:, -1].float()


def component_grid(model, kind: str) -> tuple[int, ...]:
    return (model.cfg.n_layers, model.cfg.n_heads) if kind in HEAD_KINDS else (model.cfg.n_layers,)


def _patch_hooks(model, kind: str, comps: Tensor, clean: Tensor) -> list:
    """Hooks that write ``clean[comp]`` into row r's final position, for row r's component."""
    hooks = []
    for layer in comps[:, 0].unique().tolist():
        rows = (comps[:, 0] == layer).nonzero().squeeze(1)

        if kind == "z":
            heads = comps[rows, 1]
            values = clean[layer][heads]  # [r, d_head]

            def hook(act, hook, rows=rows, heads=heads, values=values):
                act[rows, -1, heads] = values.to(act.dtype)
                return act

        else:
            values = clean[layer].expand(len(rows), -1)

            def hook(act, hook, rows=rows, values=values):
                act[rows, -1] = values.to(act.dtype)
                return act

        hooks.append((hook_name(kind, layer), hook))
    return hooks


@torch.no_grad()
def patch_final_position(
    model,
    pairs: Sequence[ContrastPair],
    kind: str = "z",
    *,
    batch_size: int = 16,
    max_rows: int = 512,
    progress: bool = True,
) -> PatchResult:
    """Patch every component of ``kind`` from honest into lying, at the final position.

    ``kind="z"`` patches each head's ``hook_z`` (so its output); a layer kind such as
    ``"resid_pre"`` patches that layer's whole vector. ``max_rows`` bounds the rows of one
    single-token pass (memory).
    """
    if len(pairs) == 0:
        raise PairError("no pairs to patch")
    return patch_runs(
        model, [p.honest for p in pairs], [p.lying for p in pairs], answer_set(model.tokenizer, pairs), kind,
        batch_size=batch_size, max_rows=max_rows, progress=progress,
    )


@torch.no_grad()
def patch_runs(
    model,
    clean_prompts: Sequence[str],
    corrupt_prompts: Sequence[str],
    answers: AnswerSet,
    kind: str = "z",
    *,
    batch_size: int = 16,
    max_rows: int = 512,
    progress: bool = True,
) -> PatchResult:
    """Patch each component of ``kind`` from ``clean_prompts[i]``'s run into ``corrupt_prompts[i]``'s."""
    if kind not in PATCHABLE:
        raise ValueError(f"cannot patch {kind!r}; patchable kinds: {PATCHABLE}")
    n = len(clean_prompts)
    if n == 0 or n != len(corrupt_prompts) or n != len(answers.truth):
        raise PairError(
            f"need as many clean prompts ({n}) as corrupted prompts ({len(corrupt_prompts)}) and answers "
            f"({len(answers.truth)}), and at least one"
        )
    clean = collect(
        model, list(clean_prompts), kinds=(kind,), batch_size=batch_size,
        progress=progress, desc="clean run", return_logits=True,
    )
    clean_acts = clean[kind]  # [n, L, (H,) d]
    grid = component_grid(model, kind)
    comps = torch.cartesian_prod(*[torch.arange(s) for s in grid]).reshape(-1, len(grid))
    p_truth = torch.empty((n, len(comps)))
    logit_diff = torch.empty((n, len(comps)))
    corrupt_logits = torch.empty((n, model.cfg.d_vocab))
    bar = tqdm(total=n, desc=f"patching {kind}", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        batch = tokenize(model, [corrupt_prompts[i] for i in idx])
        cache = prefix_cache(model, batch)
        for row, i in enumerate(idx):
            last = int(batch.tokens[row, -1])
            corrupt_logits[i] = final_step_logits(model, cache, row, last, 1)[0].cpu()
            for c0 in range(0, len(comps), max_rows):
                chunk = comps[c0 : c0 + max_rows]
                hooks = _patch_hooks(model, kind, chunk, clean_acts[i].to(model.cfg.device))
                logits = final_step_logits(model, cache, row, last, len(chunk), hooks)
                rows = AnswerSet(*(t[i : i + 1].expand(len(chunk), -1) for t in (answers.truth, answers.lie, answers.choices)))
                s = score_logits(logits, rows)
                p_truth[i, c0 : c0 + len(chunk)] = s.p_truth.cpu()
                logit_diff[i, c0 : c0 + len(chunk)] = s.logit_diff.cpu()
            bar.update(1)
    bar.close()
    return PatchResult(
        kind=kind,
        p_truth=p_truth.reshape(n, *grid),
        logit_diff=logit_diff.reshape(n, *grid),
        clean=score_logits(clean.logits, answers),
        corrupt=score_logits(corrupt_logits, answers),
    )
