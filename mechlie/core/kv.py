"""One engine for "many short passes over a cached prompt prefix": the KV-cache runner.

Patching at a late position, adding a vector at the final token, or scoring a teacher-forced
answer all rerun only the last few tokens of a prompt: a change at position ``p`` cannot affect
any earlier position (attention is causal). So each prompt's prefix is run **once** into a key /
value cache (:func:`prefix_cache`), and the variants run as the **rows** of one short pass
(:func:`run_rows`): row ``r`` belongs to prompt ``prompt[r]``, carries ``t`` new tokens (the final
prompt token, plus any teacher-forced answer tokens), and may have its own hooks. Rows of several
prompts share one pass.

Why it is fast (see ``benchmarks/bench_patching.py`` for the profile that motivated each point):

- **Shared-prefix attention.** TransformerLens's own cached forward repeats each prompt's cache
  to the number of rows, concatenates the new keys, re-applies the rotary embedding to every
  cached key, and repeats grouped key/value heads, in every layer of every pass. Here the prefix
  keys are position-encoded once (:class:`PrefixCache`), and each layer's attention computes the
  rows' scores against their prompt's prefix directly (one matmul per prompt), plus the scores
  against the rows' own new tokens. Grouped-query heads are handled by reshaping the queries,
  never by repeating keys. Everything else (embeddings, norms, MLP, every hook point, the
  unembedding) is TransformerLens's own code.
- **Rows start where they diverge.** A row that is changed first at layer ``l`` (``start_layers``)
  is identical to its prompt's unchanged run below ``l``. Rows are kept sorted by start layer, and
  block ``j`` runs only the rows with ``start <= j``; a row joins with its prompt's unchanged
  residual, taken from one baseline pass. Patching every head of a 30-layer model thus runs about
  half the row-layers. Hooks at block ``j`` see rows ``0 .. k_j - 1`` (the active ones), which are
  the global row indices because the rows are sorted.

Models whose attention is not covered by the fast path (ALiBi, relative position bias,
attention sinks, split-head inputs, ``use_attn_result``, OLMo QK-norm, 4-bit weights, local
attention windows) fall back to TransformerLens's own cached forward over a repeated cache view:
the same numbers, slower. :func:`fast_path_supported` says which path a model takes.

Conventions: positions are offsets from the end (``-1`` = the final prompt token); batches are
left-padded (:class:`mechlie.core.pairs.Batch`). "Layer l" is block ``l``.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.utilities.activation_functions import apply_softcap
from transformer_lens.utilities.multi_gpu import get_device_for_block_index

from mechlie.core.activations import head_out_from_z
from mechlie.core.hooks import HEAD_KINDS, KINDS, Hook, hook_name
from mechlie.core.metrics import final_resid_hook, logits_from_resid
from mechlie.core.pairs import Batch, PairError
from mechlie.core.stats import top_k_components

# ---------------------------------------------------------------------------------------------
# the prefix cache


@dataclass(frozen=True)
class PrefixCache:
    """Keys and values of each prompt's positions ``0 .. P-1`` (left-padded to a common ``P``).

    ``tl`` is TransformerLens's cache (raw keys, for the fallback path); ``keys`` are the same keys
    with the position encoding applied (rotary models; otherwise the raw keys), per layer.
    """

    tl: TransformerLensKeyValueCache
    keys: tuple[Tensor, ...]  # per layer [B, P, kv_heads, d_head], position-encoded
    values: tuple[Tensor, ...]  # per layer [B, P, kv_heads, d_head]
    mask: Int[Tensor, "B P"]  # 1 = real token

    @property
    def n_prompts(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def select(self, prompts: Int[Tensor, " m"]) -> "PrefixCache":
        """The prefixes of ``prompts`` (repeats allowed), as a cache of ``m`` prompts: e.g. one per
        spelling of a teacher-forced answer, so that each cache row has one token sequence."""
        idx = prompts.to(torch.long)
        tl = TransformerLensKeyValueCache(
            [
                TransformerLensKeyValueCacheEntry(
                    e.past_keys[idx.to(e.past_keys.device)], e.past_values[idx.to(e.past_values.device)], frozen=True
                )
                for e in self.tl.entries
            ],
            self.tl.previous_attention_mask[idx.to(self.tl.previous_attention_mask.device)],
            frozen=True,
        )
        return PrefixCache(
            tl,
            tuple(k[idx.to(k.device)] for k in self.keys),
            tuple(v[idx.to(v.device)] for v in self.values),
            self.mask[idx.to(self.mask.device)],
        )

    def truncate(self, p: int) -> "PrefixCache":
        """The first ``p`` cached positions (a view, no copy): the prefix of a patch at position ``p``."""
        if not 0 <= p <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-position prefix to {p}")
        tl = TransformerLensKeyValueCache(
            [
                TransformerLensKeyValueCacheEntry(e.past_keys[:, :p], e.past_values[:, :p], frozen=True)
                for e in self.tl.entries
            ],
            self.tl.previous_attention_mask[:, :p],
            frozen=True,
        )
        return PrefixCache(
            tl, tuple(k[:, :p] for k in self.keys), tuple(v[:, :p] for v in self.values), self.mask[:, :p]
        )

    def tl_view(self, prompt: Int[Tensor, " R"]) -> TransformerLensKeyValueCache:
        """A frozen TransformerLens cache with prompt ``prompt[r]``'s prefix in row ``r`` (the
        fallback path). A single prompt is repeated without copying."""
        one = bool((prompt == prompt[0]).all())

        def pick(x: Tensor) -> Tensor:
            if one:
                i = int(prompt[0])
                return x[i : i + 1].expand(len(prompt), *x.shape[1:])
            return x[prompt.to(x.device)]

        entries = [
            TransformerLensKeyValueCacheEntry(pick(e.past_keys), pick(e.past_values), frozen=True)
            for e in self.tl.entries
        ]
        return TransformerLensKeyValueCache(entries, pick(self.tl.previous_attention_mask), frozen=True)


def _position_encoded(model: HookedTransformer, layer: int, keys: Tensor, mask: Tensor) -> Tensor:
    attn = model.blocks[layer].attn
    if model.cfg.positional_embedding_type != "rotary" or keys.shape[1] == 0:
        return keys
    # TransformerLens caches raw keys and rotates all of them in every pass; rotate them once here.
    return attn.apply_rotary(keys, 0, mask.to(keys.device))


@torch.inference_mode()
def prefix_cache(model: HookedTransformer, batch: Batch) -> PrefixCache:
    """Run every position but the last of each prompt of ``batch`` once, keeping keys and values.

    Example:
        >>> cache = prefix_cache(model, tokenize(model, prompts))
        >>> logits = run_rows(model, cache, torch.arange(len(prompts)), final_tokens(batch))
    """
    if batch.tokens.shape[1] < 2 or bool((batch.lengths < 2).any()):
        raise PairError("a cached prefix needs prompts of at least 2 tokens")
    tl = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch.tokens.shape[0])
    model(batch.tokens[:, :-1], attention_mask=batch.attention_mask[:, :-1], past_kv_cache=tl, return_type=None)
    tl.freeze()
    mask = tl.previous_attention_mask
    keys = tuple(_position_encoded(model, i, e.past_keys, mask) for i, e in enumerate(tl.entries))
    return PrefixCache(tl, keys, tuple(e.past_values for e in tl.entries), mask)


def final_tokens(batch: Batch) -> Int[Tensor, "B 1"]:
    """Each prompt's final token, as the one new token of its rows."""
    return batch.tokens[:, -1:]


# ---------------------------------------------------------------------------------------------
# shared-prefix attention


def fast_path_supported(model: HookedTransformer, length: int | None = None) -> bool:
    """Whether :func:`run_rows` can use the shared-prefix attention for ``model``.

    Local (sliding-window) attention layers, as Gemma 3 has, attend to every key while the whole
    sequence (cached prefix, padding included, plus new tokens) fits in ``cfg.window_size``: then
    they are global layers, and rows of at most ``length`` tokens may take the fast path (their
    rotary base and QK-norm are the layer's own, applied by TransformerLens's code). Without
    ``length`` a model with local layers is not supported.
    """
    c = model.cfg
    window = getattr(c, "window_size", None)
    fits = length is not None and isinstance(window, int) and length <= window
    return (
        c.positional_embedding_type in ("rotary", "standard")
        and c.attention_dir == "causal"
        and not c.use_attn_result
        and not c.use_split_qkv_input
        and not c.use_attn_in
        and not getattr(c, "use_attention_sinks", False)
        and not getattr(c, "load_in_4bit", False)
        and not getattr(c, "use_logn_attn", False)
        and getattr(c, "clip_qkv", None) is None
        and not getattr(c, "use_dynamic_ntk_rope", False)
        and not getattr(c, "ungroup_grouped_query_attention", False)
        and c.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
        and all(getattr(b.attn, "attn_type", "global") == "global" or fits for b in model.blocks)
    )


def _shared_prefix_attention(attn, layer: int, state: "_RowState"):
    """A replacement ``attn.forward`` for rows over a shared prefix (same hooks, same numbers)."""

    def forward(
        self,
        query_input,
        key_input,
        value_input,
        past_kv_cache_entry=None,
        additive_attention_mask=None,
        attention_mask=None,
        position_bias=None,
    ):
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)  # [R, t, H|kv, d]
        R, t, H, d = q.shape
        P = state.cache.length
        if self.cfg.positional_embedding_type == "rotary":
            # attention_mask is [R, P + t]: the rows' prefix masks and their new tokens.
            q = self.hook_rot_q(self.apply_rotary(q, P, attention_mask))
            k = self.hook_rot_k(self.apply_rotary(k, P, attention_mask))  # the new keys only
        kv = k.shape[2]
        g = H // kv
        qg = q.reshape(R, t, kv, g, d)
        prompt = state.prompt[:R]
        pre_k, pre_v = state.cache.keys[layer], state.cache.values[layer]
        # Scores against the prefix, one matmul per prompt of the rows (no repeated cache).
        s_pre = q.new_empty((R, kv, g, t, P))
        for b, idx in state.groups(R):
            s_pre[idx] = torch.einsum("rtkgd,pkd->rkgtp", qg[idx], pre_k[b].to(q.dtype))
        s_new = torch.einsum("rtkgd,rskd->rkgts", qg, k)
        scores = torch.cat([s_pre, s_new], dim=-1).reshape(R, H, t, P + t) / self.attn_scale
        scores = apply_softcap(scores, self.cfg.attn_scores_soft_cap)
        causal = torch.ones((t, t), dtype=torch.bool, device=scores.device).tril()
        keep = torch.cat(
            [
                state.cache.mask[prompt].bool().to(scores.device)[:, None, None, :].expand(R, 1, t, P),
                causal[None, None].expand(R, 1, t, t),
            ],
            dim=-1,
        )
        scores = torch.where(keep, scores, self.IGNORE.to(scores.device))
        if additive_attention_mask is not None:
            scores = scores + additive_attention_mask
        scores = self.hook_attn_scores(scores)
        pattern = F.softmax(scores, dim=-1)
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        pattern = self.hook_pattern(pattern).to(v.dtype)
        pg = pattern.reshape(R, kv, g, t, P + t)
        z = torch.einsum("rkgts,rskd->rtkgd", pg[..., P:], v)
        for b, idx in state.groups(R):
            z[idx] += torch.einsum("rkgtp,pkd->rtkgd", pg[idx][..., :P], pre_v[b].to(v.dtype))
        z = self.hook_z(z.reshape(R, t, H, d))
        w = einops.rearrange(self.W_O, "h d m -> m (h d)")
        return F.linear(z.reshape(R, t, H * d).to(w.dtype), w, self.b_O)

    return types.MethodType(forward, attn)


class _RowState:
    """Which prompt each row belongs to, with the row groups per prompt cached per row count."""

    def __init__(self, cache: PrefixCache, prompt: Tensor):
        self.cache, self.prompt = cache, prompt
        self._groups: dict[int, list[tuple[int, Tensor]]] = {}

    def groups(self, R: int) -> list[tuple[int, Tensor]]:
        if R not in self._groups:
            p = self.prompt[:R]
            self._groups[R] = [(int(b), (p == b).nonzero().squeeze(1)) for b in p.unique()]
        return self._groups[R]


@contextmanager
def _shared_prefix(model: HookedTransformer, state: _RowState) -> Iterator[None]:
    olds = []
    try:
        for i, block in enumerate(model.blocks):
            olds.append(block.attn.__dict__.get("forward"))
            block.attn.forward = _shared_prefix_attention(block.attn, i, state)
        yield
    finally:
        for block, old in zip(model.blocks, olds):
            if old is None:
                block.attn.__dict__.pop("forward", None)
            else:
                block.attn.forward = old


# ---------------------------------------------------------------------------------------------
# the runner


def _check_rows(model, cache: PrefixCache, prompt: Tensor, tokens: Tensor, start_layers: Tensor | None) -> None:
    if tokens.ndim != 2 or tokens.shape[0] != prompt.shape[0] or tokens.shape[0] == 0:
        raise ValueError(
            f"need tokens [rows, t] with one prompt index per row; got {tuple(tokens.shape)}, {tuple(prompt.shape)}"
        )
    if int(prompt.min()) < 0 or int(prompt.max()) >= cache.n_prompts:
        raise ValueError(f"prompt indices must be in [0, {cache.n_prompts})")
    if start_layers is not None:
        if start_layers.shape != prompt.shape:
            raise ValueError("start_layers needs one layer per row")
        if bool((start_layers[1:] < start_layers[:-1]).any()):
            raise ValueError("rows must be sorted by start layer (hooks at block j see the first k_j rows)")
        if int(start_layers.min()) < 0 or int(start_layers.max()) >= model.cfg.n_layers:
            raise ValueError(f"start layers must be in [0, {model.cfg.n_layers})")


@torch.inference_mode()
def run_rows(
    model: HookedTransformer,
    cache: PrefixCache,
    prompt: Int[Tensor, " R"],
    tokens: Int[Tensor, "R t"],
    *,
    fwd_hooks: Sequence[Hook] = (),
    start_layers: Int[Tensor, " R"] | None = None,
    fast: bool | None = None,
    baseline: "Baseline | None" = None,
) -> Float[Tensor, "R t vocab"]:
    """Logits of ``R`` rows, each ``t`` new tokens over its prompt's cached prefix.

    Args:
        cache: from :func:`prefix_cache` (or a :meth:`PrefixCache.truncate` view).
        prompt: the prompt (row of ``cache``) each row continues.
        tokens: the new tokens of each row (usually the prompt's final token).
        fwd_hooks: TransformerLens hooks; activations have rows as their batch axis and the ``t``
            new tokens as positions (position ``-1`` of a one-token row is the final prompt token).
        start_layers: optional, sorted: row ``r`` is changed first at block ``start_layers[r]``
            and is identical to its prompt's plain run (same tokens) below it; those blocks skip
            it. Hooks at block ``j`` then see rows ``0 .. k_j - 1``, those with start ``<= j``.
        fast: force (True) or forbid (False) the shared-prefix attention; default: when supported.
        baseline: the prompts' plain residuals (:func:`baseline_inputs`), when the caller runs
            several chunks of rows over the same cache; computed here when needed and not given.

    Returns:
        float32 logits ``[R, t, d_vocab]``.

    Example:
        >>> cache = prefix_cache(model, batch)
        >>> rows = torch.zeros(8, dtype=torch.long)            # 8 variants of prompt 0
        >>> logits = run_rows(model, cache, rows, final_tokens(batch)[rows], fwd_hooks=hooks)
    """
    dev = model.cfg.device
    prompt = prompt.to(torch.long).cpu()
    tokens = tokens.to(dev)
    _check_rows(model, cache, prompt, tokens, start_layers)
    R, t = tokens.shape
    supported = fast_path_supported(model, cache.length + t)
    use_fast = supported if fast is None else fast
    if use_fast and not supported:
        raise ValueError(
            "the shared-prefix attention does not support this model's attention"
            f" (or {cache.length + t} tokens exceed its local attention window)"
        )
    if not use_fast:
        # TransformerLens's own cached forward; start_layers only saves time, so it is ignored.
        new_mask = torch.ones((R, t), dtype=torch.long, device=dev)
        with model.hooks(fwd_hooks=list(fwd_hooks)):
            if cache.length == 0:
                return model(tokens, attention_mask=new_mask).float()
            return model(tokens, attention_mask=new_mask, past_kv_cache=cache.tl_view(prompt)).float()
    base_resid, base_index = None, None
    if start_layers is not None and int(start_layers.max()) > 0:
        # The residual each row joins with at its start layer: its prompt's plain run.
        if baseline is None:
            uniq, first = _first_rows(prompt)
            baseline = baseline_inputs(model, cache, tokens[first], uniq)
        base_index = baseline.index(prompt)
        if not bool((tokens == baseline.tokens.to(dev)[base_index]).all()):
            raise ValueError("rows that skip blocks must have their prompt's tokens")
        base_resid = baseline.resid
    state = _RowState(cache, prompt)
    mask_full = torch.cat([cache.mask[prompt].to(dev), torch.ones((R, t), dtype=cache.mask.dtype, device=dev)], dim=1)
    starts = torch.zeros(R, dtype=torch.long) if start_layers is None else start_layers.cpu()
    fake = _shape_only_cache(model, cache, prompt, mask_full[:, : cache.length])
    with _shared_prefix(model, state), model.hooks(fwd_hooks=list(fwd_hooks)):
        resid, _, shortformer, attention_mask = model.input_to_embed(
            tokens, attention_mask=mask_full[:, cache.length :], past_kv_cache=fake
        )
        resid = _run_blocks(model, resid, shortformer, attention_mask, starts, base_resid, base_index)
        logits = logits_from_resid(model, resid)
    return logits.float()


def _run_blocks(
    model: HookedTransformer,
    resid: Tensor,
    shortformer: Tensor | None,
    attention_mask: Tensor,
    starts: Tensor,
    base_resid: tuple[Tensor, ...] | None,
    base_index: Tensor | None,
) -> Tensor:
    """Every block over the rows active at it (start layer ``<= block``); a row joins, at its start
    layer, with its prompt's plain residual ``base_resid[block][base_index[row]]``."""
    for i, block in enumerate(model.blocks):
        k = int((starts <= i).sum())
        block_dev = get_device_for_block_index(i, model.cfg)
        if base_resid is not None and k > resid.shape[0]:
            joining = base_resid[i][base_index[resid.shape[0] : k]].to(block_dev)
            resid = torch.cat([resid.to(block_dev), joining])
        elif base_resid is not None and i == 0:
            resid = resid[:k]
        resid = block(
            resid.to(block_dev),
            shortformer_pos_embed=None if shortformer is None else shortformer[:k].to(block_dev),
            attention_mask=attention_mask[:k],
        )
    return resid


def _first_rows(prompt: Tensor) -> tuple[Tensor, Tensor]:
    uniq = prompt.unique()
    first = torch.stack([(prompt == b).nonzero()[0, 0] for b in uniq])
    return uniq, first


def _shape_only_cache(model, cache: PrefixCache, prompt: Tensor, mask: Tensor) -> TransformerLensKeyValueCache:
    """A frozen TransformerLens cache of the right shape (for the position offset) and the rows'
    prefix masks, whose keys are never read (zero-stride, no memory)."""
    kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    dummy = torch.zeros((1, 1, 1, 1), dtype=model.cfg.dtype, device=mask.device).expand(
        len(prompt), cache.length, kv, model.cfg.d_head
    )
    return TransformerLensKeyValueCache(
        [TransformerLensKeyValueCacheEntry(dummy, dummy, frozen=True)], mask, frozen=True
    )


@dataclass(frozen=True)
class Baseline:
    """``blocks.l.hook_resid_pre`` (every block ``l``) of the plain rows of ``prompts``: where a
    row that starts at block ``l`` joins its prompt's unchanged run."""

    prompts: Int[Tensor, " u"]  # sorted cache rows
    tokens: Int[Tensor, "u t"]
    resid: tuple[Tensor, ...]  # per layer [u, t, d_model]

    def index(self, prompt: Int[Tensor, " R"]) -> Int[Tensor, " R"]:
        """Position of each row's prompt in ``prompts`` (an error if one is missing)."""
        i = torch.searchsorted(self.prompts, prompt).clamp(max=len(self.prompts) - 1)
        if not bool((self.prompts[i] == prompt).all()):
            raise ValueError("the baseline does not cover every row's prompt")
        return i


@torch.inference_mode()
def baseline_inputs(
    model: HookedTransformer, cache: PrefixCache, tokens: Int[Tensor, "u t"], prompts: Int[Tensor, " u"] | None = None
) -> Baseline:
    """One plain pass of ``prompts`` (default: every prompt of ``cache``) with their ``tokens``,
    keeping each block's input; computed once and shared by every chunk of rows over ``cache``."""
    prompts = torch.arange(cache.n_prompts) if prompts is None else prompts.to(torch.long).cpu()
    if bool((prompts[1:] <= prompts[:-1]).any()):
        raise ValueError("baseline prompts must be sorted and distinct")
    store: list[Tensor | None] = [None] * model.cfg.n_layers

    def saver(i: int):
        def hook(act, hook):
            store[i] = act.clone()

        return hook

    run_rows(
        model,
        cache,
        prompts,
        tokens,
        fwd_hooks=[(hook_name("resid_pre", i), saver(i)) for i in range(model.cfg.n_layers)],
    )
    return Baseline(prompts, tokens.cpu(), tuple(store))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# final-position capture and top-k heads


@dataclass(frozen=True)
class FinalActs:
    acts: dict[str, Tensor]  # kind -> [n, L, (H,) d], float32, on CPU
    logits: Float[Tensor, "n vocab"]  # next-token logits after the final prompt token


@torch.inference_mode()
def collect_batch(
    model: HookedTransformer,
    batch: Batch,
    kinds: Sequence[str] = ("z",),
    *,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "activations",
) -> FinalActs:
    """``kinds`` at the final position of each prompt of a left-padded :class:`Batch` (no tokenizer
    needed), with the final-position logits of the same passes. ``head_out`` is computed from ``z``.

    Example:
        >>> acts = collect_batch(model, tokenize(model, prompts), ("z", "resid_post"))
        >>> acts.acts["z"].shape  # [n, n_layers, n_heads, d_head]
    """
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown activation kinds {sorted(unknown)}; known: {KINDS}")
    need = sorted({"z" if k == "head_out" else k for k in kinds})
    L = model.cfg.n_layers
    out: dict[str, list[Tensor]] = {k: [] for k in need}
    logits = []
    n = batch.tokens.shape[0]
    # Prompts of similar length share a slice, so little padding is computed; results go back
    # to the caller's order at the end.
    order = batch.attention_mask.sum(1).argsort(stable=True)
    batch = Batch(batch.tokens[order], batch.attention_mask[order])
    for s in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        store: dict[tuple[str, int], Tensor] = {}

        def saver(kind: str, layer: int):
            def hook(act, hook):
                store[(kind, layer)] = act[:, -1].float().cpu()

            return hook

        tokens, mask = batch.tokens[s : s + batch_size], batch.attention_mask[s : s + batch_size]
        # Columns that are padding in every prompt of this slice change nothing (positions come
        # from the mask): drop them.
        pad = int((mask.sum(0) == 0).cumprod(0).sum())
        tokens, mask = tokens[:, pad:], mask[:, pad:]
        # No unembedding of every position: only the final one is needed (a fifth of the FLOPs).
        kept: list[Tensor] = []
        hooks = [(hook_name(k, l), saver(k, l)) for k in need for l in range(L)]
        with model.hooks(fwd_hooks=[*hooks, final_resid_hook(model, kept, every_position=False)]):
            model(tokens, attention_mask=mask, return_type=None)
            lg = logits_from_resid(model, kept[-1])
        logits.append(lg[:, -1].float().cpu())
        for k in need:
            out[k].append(torch.stack([store[(k, l)] for l in range(L)], dim=1))
    back = order.argsort()
    acts = {k: torch.cat(v)[back] for k, v in out.items()}
    if "head_out" in kinds:
        acts["head_out"] = head_out_from_z(model, acts["z"]).float()
    return FinalActs({k: acts[k] for k in kinds}, torch.cat(logits)[back])


def top_heads(scores: Float[Tensor, "layer head"], k: int, *, largest: bool = True) -> tuple[tuple[int, int], ...]:
    """The ``k`` (layer, head) pairs with the largest (or smallest) score, best first; NaNs last."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be [layer, head], got shape {tuple(scores.shape)}")
    return top_k_components(scores, k, largest=largest)  # type: ignore[return-value]


__all__ = [
    "HEAD_KINDS",
    "Baseline",
    "baseline_inputs",
    "FinalActs",
    "PrefixCache",
    "collect_batch",
    "fast_path_supported",
    "final_tokens",
    "load_model_split",
    "prefix_cache",
    "run_rows",
    "top_heads",
]


def load_model_split(name: str, *, device: str = "", dtype: str = "float32", n_devices: int = 1) -> HookedTransformer:
    """:func:`mechlie.core.models.load_model` on ``device`` (default: cuda if available) in ``dtype``,
    its layers split over ``n_devices`` GPUs by TransformerLens's own ``n_devices`` placement
    (:func:`run_rows` moves each row's residual to each block's device, like TransformerLens)."""
    from mechlie.core.models import load_model

    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if n_devices < 1:
        raise ValueError("n_devices must be >= 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if n_devices > 1 and (not device.startswith("cuda") or torch.cuda.device_count() < n_devices):
        raise ValueError(f"n_devices={n_devices} needs that many CUDA devices ({torch.cuda.device_count()} found)")
    model = load_model(name, device=device, dtype=getattr(torch, dtype))
    if n_devices > 1:
        model.cfg.n_devices = n_devices
        model.move_model_modules_to_device()
    return model
