"""How few heads carry the lie, and what feeds them: joint patching, top-k curves, path patching.

**Joint patching** (:func:`joint_patch`). A *set* of heads has its ``z`` at the final position
replaced together, in one pass, by its value in a source run:

- ``restore``: honest -> lying. Effect ``(m_patched - m_lying) / (m_honest - m_lying)`` (0 = still
  lying, 1 = fully honest), for ``m`` = logit difference truth - lie (or P(truth)), over pair means.
- ``induce``: lying -> honest. Effect ``(m_patched - m_honest) / (m_lying - m_honest)`` (0 = still
  honest, 1 = lying as much as the lying prompt).

**Top-k curve** (:func:`topk_curve`). Heads are ranked on *training* pairs by their single-head
effect (:func:`mechlie.causal.patching.patch_runs`), then the top ``k`` heads, ``k = 1, 2, 4, ...`` up
to all heads, are patched together on *held-out* pairs. Each point has a 95% bootstrap CI over the
held-out pairs, and sits beside ``n_random`` random sets of ``k`` heads (their 2.5-97.5%
quantiles across draws). The **minimal set** is the smallest ``k`` whose top-``k`` set reaches
``threshold`` (80%) of the effect; it is searched over every ``k`` (not only powers of two), and
its CI is the percentile interval of the minimal ``k`` over bootstrap resamples of the held-out
pairs. Campbell et al. (2023, *Localizing Lying in Llama*) found 46 heads, under 1% of
Llama-2-70B's, that together turn the liar honest.

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

Everything at the final position runs over the lying prompt's cached prefix
(:func:`mechlie.causal.patching.score_patches`); each set, sender or position is one row.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.causal.patching import Patches, patch_runs, score_patches
from mechlie.core.activations import hook_name
from mechlie.core.kv import final_tokens, prefix_cache, run_rows, top_heads
from mechlie.core.metrics import AnswerScores, score_logits
from mechlie.core.pairs import AnswerSet, Batch, ContrastPair, PairError, answer_set, tokenize
from mechlie.core.stats import Estimate, TensorEstimate, bootstrap_draws, bootstrap_tensor, normalized_effect

log = logging.getLogger(__name__)

Direction = Literal["restore", "induce"]
Head = tuple[int, int]
CHANNELS = ("q", "k", "v")


def _sides(pairs: Sequence[ContrastPair], direction: str) -> tuple[list[str], list[str]]:
    """(source prompts, target prompts): restore patches honest into lying, induce the reverse."""
    if direction == "restore":
        return [p.honest for p in pairs], [p.lying for p in pairs]
    if direction == "induce":
        return [p.lying for p in pairs], [p.honest for p in pairs]
    raise ValueError(f"direction must be 'restore' or 'induce', got {direction!r}")


def check_heads(model: HookedTransformer, heads: Sequence[Head], *, what: str = "head set") -> tuple[Head, ...]:
    """Validate (layer, head) pairs; an empty set, an unknown head or a duplicate is an error."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = tuple((int(l), int(h)) for l, h in heads)
    if not out:
        raise ValueError(f"empty {what}: give at least one (layer, head)")
    bad = [x for x in out if not (0 <= x[0] < L and 0 <= x[1] < H)]
    if bad:
        raise ValueError(f"unknown head(s) {bad}: the model has layers 0..{L - 1} and heads 0..{H - 1}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} lists a head twice: {out}")
    return out


# ---------------------------------------------------------------------------------------------
# joint patching


@dataclass(frozen=True)
class JointResult:
    """Per pair and head set, the target run with the set patched from the source run."""

    direction: str
    sets: tuple[tuple[Head, ...], ...]
    p_truth: Float[Tensor, "n s"]
    logit_diff: Float[Tensor, "n s"]
    source: AnswerScores  # the source prompts, unpatched
    target: AnswerScores  # the target prompts, unpatched

    def effect(self, metric: str = "logit_diff", idx: Int[Tensor, " m"] | None = None) -> Float[Tensor, " s"]:
        """0 = the target run, 1 = the source run (over the pairs ``idx``)."""
        sel = slice(None) if idx is None else idx
        return normalized_effect(
            getattr(self, metric)[sel].mean(0),
            getattr(self.target, metric)[sel].mean(),
            getattr(self.source, metric)[sel].mean(),
        )

    def effect_ci(self, metric: str = "logit_diff", *, n_boot: int = 1000, seed: int = 0) -> TensorEstimate:
        return bootstrap_tensor(lambda i: self.effect(metric, i), len(self.p_truth), n_boot=n_boot, seed=seed)


@torch.inference_mode()
def source_z(model: HookedTransformer, prompts: Sequence[str], batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """Final-position ``z`` of every head ``[n, L, H, d_head]`` and the logits of ``prompts``."""
    from mechlie.core.kv import collect_batch

    acts = collect_batch(model, tokenize(model, list(prompts)), ("z",), batch_size=batch_size)
    return acts.acts["z"], acts.logits


@torch.inference_mode()
def joint_patch(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    head_sets: Sequence[Sequence[Head]],
    *,
    direction: str = "restore",
    batch_size: int = 16,
    max_rows: int = 1024,
    progress: bool = True,
    source: tuple[Tensor, Tensor] | None = None,
) -> JointResult:
    """Patch each set of heads together (their ``z`` at the final position) from source to target.

    Args:
        pairs: (honest, lying) pairs.
        head_sets: sets of (layer, head); each set is one row per pair. Identical sets (as sets)
            run once.
        direction: ``"restore"`` (honest into lying) or ``"induce"`` (lying into honest).
        source: the source prompts' final-position ``z`` ``[n, L, H, d_head]`` and logits, if
            already collected (:func:`source_z`).

    Returns:
        :class:`JointResult` with ``[n_pairs, n_sets]`` scores; ``effect()`` is normalized.

    Example:
        >>> r = joint_patch(model, pairs, [[(20, 5)], [(20, 5), (21, 3)]])
        >>> r.effect()  # share of the honest-lying gap each set restores
    """
    if not pairs:
        raise PairError("no pairs to patch")
    all_sets = tuple(check_heads(model, s) for s in head_sets)
    if not all_sets:
        raise ValueError("no head sets to patch")
    # Patching is order-free within a set: run each distinct set once (e.g. every random k-set of
    # k = all heads is the same set).
    key = [frozenset(s) for s in all_sets]
    first = {k: i for i, k in reversed(list(enumerate(key)))}
    uniq_keys = list(dict.fromkeys(key))
    sets = tuple(all_sets[first[k]] for k in uniq_keys)
    pos = {k: j for j, k in enumerate(uniq_keys)}
    back = torch.tensor([pos[k] for k in key])
    src_prompts, tgt_prompts = _sides(pairs, direction)
    answers = answer_set(model.tokenizer, pairs)
    src_z, src_logits = source_z(model, src_prompts, batch_size) if source is None else source
    if src_z.shape[0] != len(pairs) or src_logits.shape[0] != len(pairs):
        raise ValueError(f"source activations hold {src_z.shape[0]} prompts for {len(pairs)} pairs")
    n, S = len(pairs), len(sets)
    # entries of one pair's rows: set s holds its heads
    set_of = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sets)])
    lay = torch.tensor([h[0] for s in sets for h in s])
    hd = torch.tensor([h[1] for s in sets for h in s])
    p_truth, logit_diff = torch.empty((n, S)), torch.empty((n, S))
    tgt_logits = torch.empty((n, model.cfg.d_vocab))
    for s0 in tqdm(range(0, n, batch_size), desc=f"joint patching ({direction})", disable=not progress, leave=False):
        idx = slice(s0, min(n, s0 + batch_size))
        b = tokenize(model, tgt_prompts[idx])
        B = b.tokens.shape[0]
        cache, last = prefix_cache(model, b), final_tokens(b)
        tgt_logits[idx] = run_rows(model, cache, torch.arange(B), last)[:, 0].cpu()
        # row s * B + j: set s on prompt j
        E = len(set_of)
        rows = (set_of[None] * B + torch.arange(B)[:, None]).reshape(-1)  # [B, E] -> B*E
        pj = torch.arange(B).repeat_interleave(E)
        patches = Patches("z", rows, lay.repeat(B), hd.repeat(B), src_z[idx][pj, lay.repeat(B), hd.repeat(B)])
        ans = AnswerSet(*(t[idx] for t in (answers.truth, answers.lie, answers.choices)))
        sc = score_patches(model, cache, last, torch.arange(B).repeat(S), patches, ans, max_rows=max_rows)
        p_truth[idx] = sc.p_truth.reshape(S, B).T
        logit_diff[idx] = sc.logit_diff.reshape(S, B).T
    return JointResult(
        direction,
        all_sets,
        p_truth[:, back],
        logit_diff[:, back],
        score_logits(src_logits, answers),
        score_logits(tgt_logits, answers),
    )


# ---------------------------------------------------------------------------------------------
# top-k curve and the minimal set


def k_grid(n_heads: int) -> tuple[int, ...]:
    """1, 2, 4, ... and ``n_heads`` itself."""
    ks, k = [], 1
    while k < n_heads:
        ks.append(k)
        k *= 2
    return tuple(ks + [n_heads])


@dataclass(frozen=True)
class TopKCurve:
    direction: str
    metric: str
    ranking: tuple[Head, ...]  # all heads, best first, ranked on the training pairs
    train_effect: Float[Tensor, "layer head"]  # single-head effect on the training pairs
    ks: tuple[int, ...]
    top: list[Estimate]  # effect of the top-k set on the test pairs, per k
    random_mean: Float[Tensor, " k"]  # random k-sets: mean over draws
    random_lo: Float[Tensor, " k"]  # 2.5% quantile over draws
    random_hi: Float[Tensor, " k"]  # 97.5% quantile over draws
    random_effects: Float[Tensor, "k draws"]
    threshold: float
    minimal_k: int | None  # smallest k whose top-k set reaches the threshold (None: none does)
    minimal_k_ci: tuple[float, float]  # percentile interval over bootstrap resamples of test pairs
    minimal_set: tuple[Head, ...]
    n_heads: int
    n_test: int
    # every k = 1..k_cap (the first curve k every bootstrap resample has crossed the threshold at;
    # all heads if none): enough to find the minimal k of the data and of every resample
    all_k_effect: Float[Tensor, " k_all"] = field(default_factory=lambda: torch.empty(0))

    @property
    def minimal_share(self) -> float:
        return float("nan") if self.minimal_k is None else self.minimal_k / self.n_heads

    def summary(self) -> dict:
        return {
            "direction": self.direction,
            "metric": self.metric,
            "n_heads": self.n_heads,
            "n_test_pairs": self.n_test,
            "ks": list(self.ks),
            "top": [e.to_dict() for e in self.top],
            "random_mean": self.random_mean.tolist(),
            "random_lo": self.random_lo.tolist(),
            "random_hi": self.random_hi.tolist(),
            "threshold": self.threshold,
            "minimal_k": self.minimal_k,
            "minimal_k_ci": list(self.minimal_k_ci),
            "minimal_share": self.minimal_share,
            "minimal_set": [list(h) for h in self.minimal_set],
            "ranking_top10": [list(h) for h in self.ranking[:10]],
        }


def _percentiles(draws: Tensor, level: float = 0.95) -> Tensor:
    """2.5% and 97.5% quantiles over draws (non-finite draws ignored), ``[2, *c]``: the
    percentile CI of :func:`mechlie.core.stats.bootstrap_tensor`."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2])
    return torch.nanquantile(draws.masked_fill(~torch.isfinite(draws), float("nan")), q, dim=0)


def minimal_k(effects: Float[Tensor, " k_all"], threshold: float) -> int | None:
    """Smallest k (1-based) with ``effects[k - 1] >= threshold``."""
    hit = (effects >= threshold).nonzero()
    return None if len(hit) == 0 else int(hit[0, 0]) + 1


def rank_heads(
    model: HookedTransformer,
    train: Sequence[ContrastPair],
    *,
    direction: str = "restore",
    metric: str = "logit_diff",
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[tuple[Head, ...], Tensor]:
    """All heads ranked by their single-head effect on ``train`` (best first), and the effects."""
    src, tgt = _sides(train, direction)
    res = patch_runs(model, src, tgt, answer_set(model.tokenizer, train), "z", batch_size=batch_size, progress=progress)
    eff = res.effect(metric)
    return top_heads(eff, eff.numel()), eff


def topk_curve(
    model: HookedTransformer,
    train: Sequence[ContrastPair],
    test: Sequence[ContrastPair],
    *,
    direction: str = "restore",
    metric: str = "logit_diff",
    ks: Sequence[int] | None = None,
    n_random: int = 50,
    threshold: float = 0.8,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> TopKCurve:
    """Rank heads on ``train``; patch the top-k (and random k-sets) together on ``test``.

    Args:
        train, test: pairs with no fact in common (ranking on one, evaluation on the other).
        ks: set sizes of the curve (default :func:`k_grid`); the minimal set is searched over all k.
        n_random: random head sets per k (the control).
        threshold: share of the effect the minimal set must reach.

    Returns:
        :class:`TopKCurve`.
    """
    if not train or not test:
        raise PairError("need training and test pairs")
    if {p.fact_id for p in train} & {p.fact_id for p in test}:
        raise PairError("a fact is in both the training and the test pairs")
    N = model.cfg.n_layers * model.cfg.n_heads
    ks = k_grid(N) if ks is None else tuple(int(k) for k in ks)
    if not ks or min(ks) < 1 or max(ks) > N:
        raise ValueError(f"every k must be in [1, {N}] (the number of heads), got {ks}")
    if n_random < 1 or not 0 < threshold <= 1:
        raise ValueError("need n_random >= 1 and threshold in (0, 1]")
    ranking, train_eff = rank_heads(
        model, train, direction=direction, metric=metric, batch_size=batch_size, progress=progress
    )
    g = torch.Generator().manual_seed(seed)
    rand_sets = [[ranking[int(i)] for i in torch.randperm(N, generator=g)[:k]] for k in ks for _ in range(n_random)]
    n = len(test)
    src_prompts, _ = _sides(test, direction)
    source = source_z(model, src_prompts, batch_size)

    def joint(sets):
        return joint_patch(
            model, test, sets, direction=direction, batch_size=batch_size, progress=progress, source=source
        )

    # Round 1: the curve's k, the random k-sets, and the bootstrap draws of the curve.
    res = joint([ranking[:k] for k in ks] + rand_sets)
    grid = res.effect(metric)[: len(ks)]
    rand = res.effect(metric)[len(ks) :].reshape(len(ks), n_random)
    top_draws = bootstrap_draws(lambda i: res.effect(metric, i)[: len(ks)], n, n_boot=n_boot, seed=seed)
    top_est = [
        Estimate(float(grid[j]), float(lo), float(hi), n)
        for j, (lo, hi) in enumerate(_percentiles(top_draws).T.tolist())
    ]
    # Round 2: every k up to k_cap, the first curve k whose top-k set reaches the threshold on the
    # full data and on every bootstrap resample: each one's minimal k is <= k_cap, so searching
    # k = 1..k_cap is exact (without such a k, every k up to all heads is searched).
    crossed = (grid >= threshold) & (top_draws >= threshold).all(0)
    k_cap = ks[int(crossed.nonzero()[0, 0])] if bool(crossed.any()) else N
    every = joint([ranking[:k] for k in range(1, k_cap + 1)])
    top_all = every.effect(metric)
    kmin = minimal_k(top_all, threshold)
    # The same seed gives the same resamples of the test pairs as the curve's CIs.
    draws = bootstrap_draws(lambda i: every.effect(metric, i), n, n_boot=n_boot, seed=seed)
    kd = torch.tensor([float(minimal_k(d, threshold) or math.inf) for d in draws])
    lo, hi = (
        torch.quantile(kd.clamp(max=N + 1), torch.tensor([0.025, 0.975])).tolist() if len(kd) else (math.nan, math.nan)
    )
    return TopKCurve(
        direction,
        metric,
        ranking,
        train_eff,
        ks,
        top_est,
        rand.mean(1),
        rand.quantile(0.025, dim=1),
        rand.quantile(0.975, dim=1),
        rand,
        threshold,
        kmin,
        (lo, hi),
        tuple(ranking[:kmin]) if kmin else (),
        N,
        n,
        top_all,
    )


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
class PathResult:
    receiver: Head
    direction: str
    senders: tuple[Sender, ...]
    channels: tuple[str, ...]
    p_truth: Float[Tensor, "n sender channel"]
    logit_diff: Float[Tensor, "n sender channel"]
    source: AnswerScores
    target: AnswerScores
    note: str = ""

    def effect(
        self, metric: str = "logit_diff", idx: Int[Tensor, " m"] | None = None
    ) -> Float[Tensor, "sender channel"]:
        sel = slice(None) if idx is None else idx
        return normalized_effect(
            getattr(self, metric)[sel].mean(0),
            getattr(self.target, metric)[sel].mean(),
            getattr(self.source, metric)[sel].mean(),
        )

    def effect_ci(self, metric: str = "logit_diff", *, n_boot: int = 1000, seed: int = 0) -> TensorEstimate:
        return bootstrap_tensor(lambda i: self.effect(metric, i), len(self.p_truth), n_boot=n_boot, seed=seed)


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
    if not pairs:
        raise PairError("no pairs to patch")
    src_prompts, tgt_prompts = _sides(pairs, direction)
    answers = answer_set(model.tokenizer, pairs)
    kvh = model.cfg.n_key_value_heads or model.cfg.n_heads
    kv_head = hr // (model.cfg.n_heads // kvh)
    n, S, C = len(pairs), len(senders), len(chans)
    p_truth, logit_diff = torch.empty((n, S, C)), torch.empty((n, S, C))
    src_logits, tgt_logits = torch.empty((n, model.cfg.d_vocab)), torch.empty((n, model.cfg.d_vocab))
    dev = model.cfg.device
    for i in tqdm(range(n), desc=f"path patching into L{lr}H{hr}", disable=not progress, leave=False):
        st, tt, m = _aligned_tokens(model, src_prompts[i], tgt_prompts[i])
        src, tgt = _full_run(model, st.to(dev), lr), _full_run(model, tt.to(dev), lr)
        src_logits[i] = model(st.to(dev)[None])[0, -1].float().cpu()
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
        x = tgt[hook_name("resid_pre", lr)]
        moved = x[None] + torch.stack(deltas)  # [S, pos, d]
        zs = torch.stack([_receiver_z(model, lr, x, {c: moved}, kv_head, hr) for c in chans], 1)  # [S, C, H, dh]
        touched = (
            [hr]
            if set(chans) == {"q"}
            else list(range(kv_head * (model.cfg.n_heads // kvh), (kv_head + 1) * (model.cfg.n_heads // kvh)))
        )
        b = Batch(tt[None].to(dev), torch.ones_like(tt[None]).to(dev))
        cache, last = prefix_cache(model, b), final_tokens(b)
        tgt_logits[i] = run_rows(model, cache, torch.zeros(1, dtype=torch.long), last)[0, -1].cpu()
        R = S * C
        heads = torch.tensor(touched)
        rows = torch.arange(R).repeat_interleave(len(heads))
        hh = heads.repeat(R)
        value = zs.reshape(R, model.cfg.n_heads, -1)[rows, hh]
        patches = Patches("z", rows, torch.full_like(rows, lr), hh, value)
        ans = AnswerSet(*(t[i : i + 1] for t in (answers.truth, answers.lie, answers.choices)))
        sc = score_patches(model, cache, last, torch.zeros(R, dtype=torch.long), patches, ans)
        p_truth[i], logit_diff[i] = sc.p_truth.reshape(S, C), sc.logit_diff.reshape(S, C)
    note = (
        ""
        if kvh == model.cfg.n_heads
        else (
            f"grouped-query attention: k/v paths enter key/value head {kv_head}, shared by query heads "
            f"{kv_head * (model.cfg.n_heads // kvh)}..{(kv_head + 1) * (model.cfg.n_heads // kvh) - 1}, "
            "whose z are all patched"
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
class ReceiverPositions:
    receiver: Head
    offsets: tuple[int, ...]  # offsets from the end
    p_truth: Float[Tensor, "n pos"]
    logit_diff: Float[Tensor, "n pos"]
    differs: Float[Tensor, "n pos"]  # 1 where the two prompts' tokens differ at this offset
    attention: Float[Tensor, "n pos"]  # the receiver's attention from the final token, target run
    source: AnswerScores
    target: AnswerScores

    def effect(self, metric: str = "logit_diff", idx: Int[Tensor, " m"] | None = None) -> Float[Tensor, " pos"]:
        sel = slice(None) if idx is None else idx
        return normalized_effect(
            getattr(self, metric)[sel].mean(0),
            getattr(self.target, metric)[sel].mean(),
            getattr(self.source, metric)[sel].mean(),
        )


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
    src_prompts, tgt_prompts = _sides(pairs, direction)
    answers = answer_set(model.tokenizer, pairs)
    toks = [_aligned_tokens(model, s, t) for s, t in zip(src_prompts, tgt_prompts)]
    M = min(m for _, _, m in toks)
    n = len(pairs)
    kvh = model.cfg.n_key_value_heads or model.cfg.n_heads
    g = model.cfg.n_heads // kvh
    kv_head = hr // g
    heads = torch.arange(kv_head * g, (kv_head + 1) * g)
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
                (f"blocks.{lr}.attn.hook_pattern", lambda a, hook: store.update(p=a[0, hr, -1].clone())),
            ]
        ):
            model(tt.to(dev)[None], return_type=None)
        x = store["x"]
        Lt, Ls = len(tt), len(st)
        moved = x[None].repeat(M, 1, 1)
        for j in range(M):  # row j: offset j - M
            moved[j, Lt - M + j] = xs[Ls - M + j]
        z = _receiver_z(model, lr, x, {"k": moved, "v": moved}, kv_head, hr)  # [M, H, dh]
        b = Batch(tt[None].to(dev), torch.ones_like(tt[None]).to(dev))
        cache, last = prefix_cache(model, b), final_tokens(b)
        tgt_logits[i] = run_rows(model, cache, torch.zeros(1, dtype=torch.long), last)[0, -1].cpu()
        rows = torch.arange(M).repeat_interleave(len(heads))
        hh = heads.repeat(M)
        patches = Patches("z", rows, torch.full_like(rows, lr), hh, z[rows, hh])
        ans = AnswerSet(*(t[i : i + 1] for t in (answers.truth, answers.lie, answers.choices)))
        sc = score_patches(model, cache, last, torch.zeros(M, dtype=torch.long), patches, ans)
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
