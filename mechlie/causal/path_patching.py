"""Path patching into a receiver head, and position patching of the receiver's inputs.

**Path patching** (:func:`path_patch`; Wang et al. 2022, *Interpretability in the Wild*, sec.
3.1). For a receiver head ``(l_r, h_r)`` and each sender (every head and MLP in blocks before
``l_r``), the sender's output is changed from its target-run to its source-run value (at every
aligned position) *only along the path into the receiver's queries, keys or values*: the
receiver's ``channel`` input is ``LN1(resid_pre + delta_sender)`` while every other input of every
other component stays at the target run. The receiver's new ``z`` at the final position is
patched into the target run, and the answer scored. With grouped-query attention a key/value
input belongs to a key/value head, which the receiver shares with the other query heads of its
group; their ``z`` changes too and is patched with it (said so in the result's ``note``).

**Position patching of the receiver's inputs** (:func:`receiver_positions`). The receiver's key
and value inputs at one source position at a time take the source run's residual (its query stays
at the target run): from which positions does the receiver take the lie? In the few-shot format
the honest and lying prompts differ only at the demonstrations' answers; the result marks those
positions.

Directions (``restore`` / ``induce``) and effects are as in :mod:`mechlie.causal.joint_patching`;
each sender or position is one row over the target prompt's cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.causal.effects import EffectResult
from mechlie.causal.joint_patching import Head, check_heads, patch_sides
from mechlie.causal.patching import Patches, answer_rows, score_patches
from mechlie.core.hooks import hook_name
from mechlie.core.kv import final_tokens, prefix_cache, run_rows
from mechlie.core.metrics import AnswerScores, score_logits
from mechlie.core.pairs import AnswerSet, Batch, ContrastPair, PairError, answer_set, tokenize

CHANNELS = ("q", "k", "v")

# ---------------------------------------------------------------------------------------------
# path patching into a receiver head


@dataclass(frozen=True)
class Sender:
    kind: Literal["head", "mlp"]
    layer: int
    head: int = -1

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}" if self.kind == "head" else f"MLP{self.layer}"


@dataclass(frozen=True)
class PathResult(EffectResult):
    """Per pair, sender and channel, the target run with the receiver's ``z`` as moved by the
    sender along that channel; ``effect``: 0 = the target run, 1 = the source run."""

    LO: ClassVar[str] = "target"
    HI: ClassVar[str] = "source"
    CI_BATCHED: ClassVar[bool] = False

    receiver: Head
    direction: str
    senders: tuple[Sender, ...]
    channels: tuple[str, ...]
    p_truth: Float[Tensor, "n sender channel"]
    logit_diff: Float[Tensor, "n sender channel"]
    source: AnswerScores
    target: AnswerScores
    note: str = ""


def _full_run(model: HookedTransformer, tokens: Tensor, layers: int) -> dict[str, Tensor]:
    """z and mlp_out of blocks < ``layers`` and resid_pre of block ``layers`` (all positions)."""
    store: dict[str, Tensor] = {}

    def saver(name: str):
        def hook(act, hook):
            store[name] = act[0].clone()

        return hook

    names = [hook_name("resid_pre", layers)] + [hook_name("z", l) for l in range(layers)]
    if not model.cfg.attn_only:
        names += [hook_name("mlp_out", l) for l in range(layers)]
    with model.hooks(fwd_hooks=[(n, saver(n)) for n in names]):
        model(tokens[None], return_type=None)
    return store


def _receiver_z(
    model: HookedTransformer,
    layer: int,
    x: Float[Tensor, "pos d"],
    inputs: dict[str, Float[Tensor, "s pos d"]],
    kv_head: int,
    q_head: int,
) -> Float[Tensor, "s head d_head"]:
    """z of every head of block ``layer`` at the final position, when the receiver's ``q`` input
    (query head ``q_head``) and/or ``k``/``v`` inputs (key/value head ``kv_head``) are the rows of
    ``inputs`` (residual streams, before ``ln1``) instead of ``x``."""
    block = model.blocks[layer]
    attn = block.attn
    S = next(iter(inputs.values())).shape[0]
    base = block.ln1(x[None])  # [1, pos, d]
    # queries, keys, values from the unchanged input, repeated per row
    q, k, v = attn.calculate_qkv_matrices(base, base, base)  # [1, pos, H|kv, dh]
    q, k, v = (t.expand(S, -1, -1, -1).clone() for t in (q, k, v))
    grouped = hasattr(attn, "_W_K") and not getattr(model.cfg, "ungroup_grouped_query_attention", False)
    for ch, inp in inputs.items():
        if model.cfg.use_qk_norm:  # the norm needs every head: project them all
            new = block.ln1(inp)
            nq, nk, nv = attn.calculate_qkv_matrices(new, new, new)
            if ch == "q":
                q[:, :, q_head] = nq[:, :, q_head]
            elif ch == "k":
                k[:, :, kv_head] = nk[:, :, kv_head]
            else:
                v[:, :, kv_head] = nv[:, :, kv_head]
        elif ch == "q":  # only the receiver's query at the final position is ever read
            q[:, -1, q_head] = block.ln1(inp[:, -1:])[:, 0] @ attn.W_Q[q_head] + attn.b_Q[q_head]
        else:  # only the receiver's key/value head
            W = (attn._W_K if grouped else attn.W_K) if ch == "k" else (attn._W_V if grouped else attn.W_V)
            b = (attn._b_K if grouped else attn.b_K) if ch == "k" else (attn._b_V if grouped else attn.b_V)
            (k if ch == "k" else v)[:, :, kv_head] = block.ln1(inp) @ W[kv_head] + b[kv_head]
    if model.cfg.positional_embedding_type == "rotary":
        q, k = attn.apply_rotary(q, 0, None), attn.apply_rotary(k, 0, None)
    H, kvh = q.shape[2], k.shape[2]
    g = H // kvh
    qf = q[:, -1].reshape(S, kvh, g, -1)  # final position only
    scores = torch.einsum("skgd,spkd->skgp", qf, k) / attn.attn_scale
    from transformer_lens.utilities.activation_functions import apply_softcap

    pattern = apply_softcap(scores, model.cfg.attn_scores_soft_cap).softmax(-1)
    z = torch.einsum("skgp,spkd->skgd", pattern, v)
    return z.reshape(S, H, -1)


def _check_path_input(
    model: HookedTransformer, receiver: Head, channels: Sequence[str]
) -> tuple[Head, tuple[str, ...]]:
    (receiver,) = check_heads(model, [receiver], what="receiver")
    if receiver[0] == 0:
        raise ValueError("the receiver is in block 0: no sender comes before it")
    chans = tuple(channels)
    if not chans or any(c not in CHANNELS for c in chans):
        raise ValueError(f"channels must be a non-empty subset of {CHANNELS}, got {chans}")
    c = model.cfg
    if c.positional_embedding_type not in ("rotary", "standard") or c.use_attn_result or c.use_split_qkv_input:
        raise ValueError("path patching supports causal rotary/standard attention without split inputs")
    return receiver, chans


def _aligned_tokens(model, src: str, tgt: str) -> tuple[Tensor, Tensor, int]:
    s, t = tokenize(model, [src]).tokens[0], tokenize(model, [tgt]).tokens[0]
    return s, t, min(len(s), len(t))


def _kv_group(model: HookedTransformer, q_head: int) -> tuple[int, list[int]]:
    """The key/value head that query head ``q_head`` reads, and every query head sharing it."""
    g = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
    kv_head = q_head // g
    return kv_head, list(range(kv_head * g, (kv_head + 1) * g))


def _check_senders(model: HookedTransformer, receiver: Head, senders: Sequence[Sender] | None) -> tuple[Sender, ...]:
    """The senders (default: every head and MLP in blocks before the receiver's), validated."""
    lr, hr = receiver
    if senders is None:
        senders = [Sender("head", l, h) for l in range(lr) for h in range(model.cfg.n_heads)]
        if not model.cfg.attn_only:
            senders += [Sender("mlp", l) for l in range(lr)]
    senders = tuple(senders)
    for s in senders:
        if s.kind not in ("head", "mlp") or (s.kind == "head" and not 0 <= s.head < model.cfg.n_heads):
            raise ValueError(f"unknown sender {s}")
        if not 0 <= s.layer < lr:
            raise ValueError(
                f"sender {s} is not before the receiver L{lr}H{hr}: path patching needs sender layer < receiver layer"
            )
        if s.kind == "mlp" and model.cfg.attn_only:
            raise ValueError("the model has no MLPs")
    return senders


def _sender_deltas(
    model: HookedTransformer, senders: Sequence[Sender], src: dict[str, Tensor], tgt: dict[str, Tensor], m: int
) -> Float[Tensor, "s pos d"]:
    """Each sender's source-run minus target-run output at the last ``m`` (aligned) positions."""
    deltas = []
    for s in senders:
        if s.kind == "head":
            w = model.blocks[s.layer].attn.W_O[s.head]
            a, b = src[hook_name("z", s.layer)][:, s.head] @ w, tgt[hook_name("z", s.layer)][:, s.head] @ w
        else:
            a, b = src[hook_name("mlp_out", s.layer)], tgt[hook_name("mlp_out", s.layer)]
        d = torch.zeros_like(b)
        d[len(b) - m :] = a[len(a) - m :] - b[len(b) - m :]  # aligned from the end
        deltas.append(d)
    return torch.stack(deltas)


def _patch_receiver_z(
    model: HookedTransformer,
    tokens: Tensor,
    layer: int,
    heads: Sequence[int],
    z: Float[Tensor, "r head d_head"],
    answers: AnswerSet,
    i: int,
) -> tuple[Tensor, AnswerScores]:
    """The target prompt ``tokens`` (pair ``i``) unpatched (its final logits), and with ``heads`` of
    block ``layer`` set to each row of ``z`` at the final position (one scored row each)."""
    dev = model.cfg.device
    b = Batch(tokens[None].to(dev), torch.ones_like(tokens[None]).to(dev))
    cache, last = prefix_cache(model, b), final_tokens(b)
    logits = run_rows(model, cache, torch.zeros(1, dtype=torch.long), last)[0, -1].cpu()
    R, heads = len(z), torch.tensor(heads)
    rows = torch.arange(R).repeat_interleave(len(heads))
    hh = heads.repeat(R)
    patches = Patches("z", rows, torch.full_like(rows, layer), hh, z[rows, hh])
    ans = answer_rows(answers, slice(i, i + 1))
    return logits, score_patches(model, cache, last, torch.zeros(R, dtype=torch.long), patches, ans)


@torch.inference_mode()
def path_patch(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    receiver: Head,
    *,
    senders: Sequence[Sender] | None = None,
    channels: Sequence[str] = CHANNELS,
    direction: str = "restore",
    progress: bool = True,
) -> PathResult:
    """Effect of each sender on the answer along the path into ``receiver``'s q, k or v.

    Args:
        receiver: (layer, head); senders default to every head and MLP in earlier blocks.
        channels: which receiver inputs the path enters.
        direction: restore (sender at its honest value in the lying run) or induce.

    Returns:
        :class:`PathResult` ``[n_pairs, n_senders, n_channels]``; ``effect()`` is normalized
        (0 = target run, 1 = source run).

    Example:
        >>> r = path_patch(model, pairs, (20, 5), channels=("q", "k", "v"))
        >>> r.effect()[:, 0]  # each sender's effect through the receiver's queries
    """
    receiver, chans = _check_path_input(model, receiver, channels)
    lr, hr = receiver
    senders = _check_senders(model, receiver, senders)
    if not pairs:
        raise PairError("no pairs to patch")
    src_prompts, tgt_prompts = patch_sides(pairs, direction)
    answers = answer_set(model.tokenizer, pairs)
    kv_head, group = _kv_group(model, hr)
    touched = [hr] if set(chans) == {"q"} else group
    n, S, C = len(pairs), len(senders), len(chans)
    p_truth, logit_diff = torch.empty((n, S, C)), torch.empty((n, S, C))
    src_logits, tgt_logits = torch.empty((n, model.cfg.d_vocab)), torch.empty((n, model.cfg.d_vocab))
    dev = model.cfg.device
    for i in tqdm(range(n), desc=f"path patching into L{lr}H{hr}", disable=not progress, leave=False):
        st, tt, m = _aligned_tokens(model, src_prompts[i], tgt_prompts[i])
        src, tgt = _full_run(model, st.to(dev), lr), _full_run(model, tt.to(dev), lr)
        src_logits[i] = model(st.to(dev)[None])[0, -1].float().cpu()
        x = tgt[hook_name("resid_pre", lr)]
        moved = x[None] + _sender_deltas(model, senders, src, tgt, m)  # [S, pos, d]
        zs = torch.stack([_receiver_z(model, lr, x, {c: moved}, kv_head, hr) for c in chans], 1)  # [S, C, H, dh]
        tgt_logits[i], sc = _patch_receiver_z(
            model, tt, lr, touched, zs.reshape(S * C, model.cfg.n_heads, -1), answers, i
        )
        p_truth[i], logit_diff[i] = sc.p_truth.reshape(S, C), sc.logit_diff.reshape(S, C)
    note = (
        ""
        if len(group) == 1
        else (
            f"grouped-query attention: k/v paths enter key/value head {kv_head}, shared by query heads "
            f"{group[0]}..{group[-1]}, whose z are all patched"
        )
    )
    return PathResult(
        receiver,
        direction,
        senders,
        chans,
        p_truth,
        logit_diff,
        score_logits(src_logits, answers),
        score_logits(tgt_logits, answers),
        note,
    )


@dataclass(frozen=True)
class ReceiverPositions(EffectResult):
    """Per pair and offset, the target run with the receiver's key/value inputs at that offset from
    the source run; ``effect``: 0 = the target run, 1 = the source run."""

    LO: ClassVar[str] = "target"
    HI: ClassVar[str] = "source"
    CI_BATCHED: ClassVar[bool] = False

    receiver: Head
    offsets: tuple[int, ...]  # offsets from the end
    p_truth: Float[Tensor, "n pos"]
    logit_diff: Float[Tensor, "n pos"]
    differs: Float[Tensor, "n pos"]  # 1 where the two prompts' tokens differ at this offset
    attention: Float[Tensor, "n pos"]  # the receiver's attention from the final token, target run
    source: AnswerScores
    target: AnswerScores


@torch.inference_mode()
def receiver_positions(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    receiver: Head,
    *,
    direction: str = "restore",
    progress: bool = True,
) -> ReceiverPositions:
    """The receiver's key and value inputs at one source position at a time from the source run.

    Offsets cover the common suffix of every pair (aligned from the end)."""
    receiver, _ = _check_path_input(model, receiver, ("k", "v"))
    lr, hr = receiver
    if not pairs:
        raise PairError("no pairs to patch")
    src_prompts, tgt_prompts = patch_sides(pairs, direction)
    answers = answer_set(model.tokenizer, pairs)
    toks = [_aligned_tokens(model, s, t) for s, t in zip(src_prompts, tgt_prompts)]
    M = min(m for _, _, m in toks)
    n = len(pairs)
    kv_head, group = _kv_group(model, hr)
    p_truth, logit_diff, differs, attn = (torch.empty((n, M)) for _ in range(4))
    src_logits, tgt_logits = torch.empty((n, model.cfg.d_vocab)), torch.empty((n, model.cfg.d_vocab))
    dev = model.cfg.device
    for i, (st, tt, _) in enumerate(tqdm(toks, desc=f"positions into L{lr}H{hr}", disable=not progress, leave=False)):
        src_logits[i] = model(st.to(dev)[None])[0, -1].float().cpu()
        xs = _full_run(model, st.to(dev), lr)[hook_name("resid_pre", lr)]
        store: dict[str, Tensor] = {}
        with model.hooks(
            fwd_hooks=[
                (hook_name("resid_pre", lr), lambda a, hook: store.update(x=a[0].clone())),
                (model.blocks[lr].attn.hook_pattern.name, lambda a, hook: store.update(p=a[0, hr, -1].clone())),
            ]
        ):
            model(tt.to(dev)[None], return_type=None)
        x = store["x"]
        Lt, Ls = len(tt), len(st)
        moved = x[None].repeat(M, 1, 1)
        for j in range(M):  # row j: offset j - M
            moved[j, Lt - M + j] = xs[Ls - M + j]
        z = _receiver_z(model, lr, x, {"k": moved, "v": moved}, kv_head, hr)  # [M, H, dh]
        tgt_logits[i], sc = _patch_receiver_z(model, tt, lr, group, z, answers, i)
        p_truth[i], logit_diff[i] = sc.p_truth, sc.logit_diff
        differs[i] = (st[Ls - M :] != tt[Lt - M :]).float()
        attn[i] = store["p"][Lt - M :].float().cpu()
    return ReceiverPositions(
        receiver,
        tuple(range(-M, 0)),
        p_truth,
        logit_diff,
        differs,
        attn,
        score_logits(src_logits, answers),
        score_logits(tgt_logits, answers),
    )


__all__ = ["CHANNELS", "PathResult", "ReceiverPositions", "Sender", "path_patch", "receiver_positions"]
