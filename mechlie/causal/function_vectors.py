"""A "lie function vector" (Todd et al. 2023, *Function Vectors in Large Language Models*).

Pipeline, on few-shot prompts (format ``fewshot``: demonstrations with false answers):

1. **Mean head activations.** For every head, the mean ``hook_z`` (and ``head_out = z @ W_O``)
   at the final prompt token over the *lying* prompts.
2. **Corrupted prompts.** The same demonstrations with labels that carry no honest/lying signal
   (:func:`mechlie.core.pairs.corrupted_fewshot`; default ``mixed``: half true, half false answers).
   Todd et al. shuffle labels; for lying, a shuffled label is just another false answer, so the
   shuffled prompt already *is* a lying prompt and leaves no room for an effect (``permuted`` keeps
   that variant available for comparison).
3. **Average indirect effect (AIE)** of a head: patch its mean lying ``z`` into the corrupted
   prompts' final position and measure, averaged over prompts,

   - ``truth_drop`` = P(truth | corrupted) - P(truth | corrupted, head patched)  (ranking metric)
   - ``lie_rise``   = P(lie | patched) - P(lie | corrupted), for the pair's designated lie.

   The ranking metric is ``truth_drop``: a lying model can name any false answer, so the designated
   lie catches only a small, arbitrary part of the lie mass, while the truth is one well-defined
   token. Both are reported.
4. **Function vector** = sum of the mean ``head_out`` of the top-``k`` heads by AIE (``k = 10`` by
   default; Todd et al. used 10 heads for GPT-J 6B, and scaled ``k`` with model size, so for
   SmolLM2-135M's 270 heads 10 is an arbitrary choice, about 4% of them). The AIE patches
   leave-one-out means: a training prompt is never patched with a mean containing its own fact.
5. **Interventions.** The FV is added to the residual stream ``blocks.L.hook_resid_post`` (block
   ``L``'s output) at the *final position only*, as in Todd et al., at the layers its heads live
   in (default); then it can run over a cached prefix. Added to honest and zero-shot prompts it
   should lower P(truth) (lie induction);
   subtracted from lying prompts it should raise it (truth recovered). The difference-of-means
   residual direction of the same layer (honest -> lying, fitted on the same training prompts),
   rescaled to the FV's norm, and many random Gaussian directions of that norm run beside it:
   their distribution (not a signed mean) is the null, with bootstrap CIs over test pairs for the
   FV and the diff of means (:meth:`FVExperiment.effect_ci`).

Speed: a patch at the final position cannot change any earlier position, so each prompt's prefix
is run once into a key/value cache and all heads (or all vectors x layers) of several prompts run
as the rows of single-token passes (:func:`mechlie.causal.patching.score_patches` over
:func:`mechlie.core.kv.run_rows`).
:func:`head_aie_naive` is the one-forward-pass-per-head loop, kept as a benchmark and test baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.causal.effects import top_k_components
from mechlie.causal.patching import Patches, answer_rows, score_patches
from mechlie.core.activations import head_out_from_z
from mechlie.core.hooks import hook_name
from mechlie.core.kv import collect_batch, final_tokens, prefix_cache, run_rows
from mechlie.core.metrics import AnswerScores, score_logits
from mechlie.core.pairs import (
    AnswerSet,
    Batch,
    ContrastPair,
    PairError,
    answer_set,
    corrupted_fewshot,
    tokenize,
    zero_shot_prompt,
)
from mechlie.core.stats import bootstrap
from mechlie.read.directions import diff_of_means

AIE_METRICS = ("truth_drop", "lie_rise", "logit_diff_drop")


def _rows(answers: AnswerSet, i: int, n: int) -> AnswerSet:
    """Answer ids of prompt ``i`` repeated for ``n`` rows."""
    return AnswerSet(*(t[i : i + 1].expand(n, -1) for t in (answers.truth, answers.lie, answers.choices)))


def _sub(batch: Batch, idx: slice) -> Batch:
    return Batch(batch.tokens[idx], batch.attention_mask[idx])


def p_lie(scores: AnswerScores) -> Tensor:
    """P(designated lie), recovered from ``logit_diff = log P(truth) - log P(lie)``."""
    return scores.p_truth / scores.logit_diff.exp()


# ---------------------------------------------------------------------------------------------
# 1. mean head activations


@dataclass(frozen=True)
class HeadMeans:
    z: Float[Tensor, "layer head d_head"]
    head_out: Float[Tensor, "layer head d_model"]  # z @ W_O (b_O excluded: it is shared)


def mean_head_activations(model: HookedTransformer, batch: Batch, *, batch_size: int = 16) -> HeadMeans:
    z = collect_batch(model, batch, ("z",), batch_size=batch_size).acts["z"].mean(0)
    with torch.no_grad():
        return HeadMeans(z, head_out_from_z(model, z[None])[0].detach())


def leave_one_out_means(z: Float[Tensor, "n ..."]) -> Float[Tensor, "n ..."]:
    """Row ``i``: the mean of every row but ``i`` (a prompt's own activation is left out)."""
    n = z.shape[0]
    if n < 2:
        raise ValueError("leave-one-out means need at least 2 prompts")
    return (z.sum(0, keepdim=True) - z) / (n - 1)


# ---------------------------------------------------------------------------------------------
# 2-3. average indirect effect


@dataclass(frozen=True)
class HeadAIE:
    """Per-prompt scores with each head's mean ``z`` patched in, and the unpatched baseline."""

    p_truth: Float[Tensor, "n layer head"]
    logit_diff: Float[Tensor, "n layer head"]
    base: AnswerScores  # corrupted prompts, unpatched

    @property
    def p_lie(self) -> Float[Tensor, "n layer head"]:
        return self.p_truth / self.logit_diff.exp()

    def aie(self, metric: str = "truth_drop") -> Float[Tensor, "layer head"]:
        """Average indirect effect; positive = towards lying, for every metric."""
        if metric == "truth_drop":
            return self.base.p_truth.mean() - self.p_truth.mean(0)
        if metric == "lie_rise":
            return self.p_lie.mean(0) - p_lie(self.base).mean()
        if metric == "logit_diff_drop":
            return self.base.logit_diff.mean() - self.logit_diff.mean(0)
        raise ValueError(f"unknown AIE metric {metric!r}; metrics: {AIE_METRICS}")


def _all_heads(model) -> Int[Tensor, "c 2"]:
    return torch.cartesian_prod(torch.arange(model.cfg.n_layers), torch.arange(model.cfg.n_heads))


@torch.no_grad()
def head_aie(
    model,
    corrupt: Batch,
    answers: AnswerSet,
    mean_z: Float[Tensor, "layer head d_head"] | Float[Tensor, "n layer head d_head"],
    *,
    heads: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 16,
    max_rows: int = 512,
    progress: bool = True,
) -> HeadAIE:
    """Patch each head's ``mean_z`` into every corrupted prompt's final position (KV-cached).

    ``mean_z`` may hold one mean per prompt (``[n, layer, head, d_head]``), e.g. leave-one-out
    means (:func:`leave_one_out_means`) so that a prompt is never patched with a mean that contains
    its own fact's activation. ``heads`` restricts the sweep to some (layer, head)s (for
    benchmarks); the others are NaN.
    """
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if mean_z.ndim == 4 and len(mean_z) != corrupt.tokens.shape[0]:
        raise ValueError(f"per-prompt means need one row per prompt: {len(mean_z)} vs {corrupt.tokens.shape[0]}")
    comps = (
        _all_heads(model) if heads is None else torch.tensor([tuple(h) for h in heads], dtype=torch.long).reshape(-1, 2)
    )
    if (
        len(comps) == 0
        or int(comps[:, 0].min()) < 0
        or int(comps[:, 0].max()) >= L
        or int(comps[:, 1].min()) < 0
        or int(comps[:, 1].max()) >= H
    ):
        raise ValueError(f"heads must be (layer, head) pairs within {L} x {H}")
    n, C = corrupt.tokens.shape[0], len(comps)
    p_truth, logit_diff = torch.empty((n, C)), torch.empty((n, C))
    base = torch.empty((n, model.cfg.d_vocab))
    flat = comps[:, 0] * H + comps[:, 1]
    bar = tqdm(total=n, desc="head AIE", disable=not progress, leave=False)
    for s in range(0, n, batch_size):
        b = _sub(corrupt, slice(s, s + batch_size))
        B = b.tokens.shape[0]
        cache, last = prefix_cache(model, b), final_tokens(b)
        base[s : s + B] = run_rows(model, cache, torch.arange(B), last)[:, 0].cpu()
        # rows (head, prompt): head c of prompt j is row c * B + j, patched with the head's mean z
        prompt = torch.arange(B).repeat(C)
        comp = torch.arange(C).repeat_interleave(B)
        if mean_z.ndim == 4:  # one mean per prompt
            value = mean_z[s + prompt, comps[comp, 0], comps[comp, 1]]
        else:
            value = mean_z[comps[comp, 0], comps[comp, 1]]
        patches = Patches("z", torch.arange(C * B), comps[comp, 0], comps[comp, 1], value)
        sc = score_patches(
            model, cache, last, prompt, patches, answer_rows(answers, slice(s, s + B)), max_rows=max_rows
        )
        p_truth[s : s + B] = sc.p_truth.reshape(C, B).T
        logit_diff[s : s + B] = sc.logit_diff.reshape(C, B).T
        bar.update(B)
    bar.close()
    full_p, full_ld = torch.full((n, L * H), float("nan")), torch.full((n, L * H), float("nan"))
    full_p[:, flat], full_ld[:, flat] = p_truth, logit_diff
    return HeadAIE(full_p.reshape(n, L, H), full_ld.reshape(n, L, H), score_logits(base, answers))


@torch.no_grad()
def head_aie_naive(
    model,
    corrupt: Batch,
    answers: AnswerSet,
    mean_z: Float[Tensor, "layer head d_head"],
    heads: Sequence[tuple[int, int]] | None = None,
) -> tuple[Float[Tensor, "n c"], Float[Tensor, "n c"]]:
    """Baseline: one full forward pass per (prompt, head). Returns (p_truth, logit_diff) [n, c]."""
    heads = [tuple(h) for h in (heads if heads is not None else _all_heads(model).tolist())]
    n = corrupt.tokens.shape[0]
    p_truth, logit_diff = torch.empty((n, len(heads))), torch.empty((n, len(heads)))
    for i in range(n):
        toks, mask = corrupt.tokens[i : i + 1], corrupt.attention_mask[i : i + 1]
        for j, (layer, head) in enumerate(heads):

            def hook(act, hook, head=head, v=mean_z[layer, head]):
                act[:, -1, head] = v.to(act.dtype).to(act.device)
                return act

            with model.hooks(fwd_hooks=[(hook_name("z", layer), hook)]):
                logits = model(toks, attention_mask=mask)[:, -1].float()
            sc = score_logits(logits, _rows(answers, i, 1))
            p_truth[i, j], logit_diff[i, j] = sc.p_truth[0], sc.logit_diff[0]
    return p_truth, logit_diff


# ---------------------------------------------------------------------------------------------
# 4. the function vector


@dataclass(frozen=True)
class FunctionVector:
    vector: Float[Tensor, " d_model"]
    heads: tuple[tuple[int, int], ...]  # (layer, head), best first
    aie: tuple[float, ...]  # their AIE (ranking metric)
    metric: str = "truth_drop"


def build_function_vector(
    head_out_mean: Float[Tensor, "layer head d_model"],
    aie: Float[Tensor, "layer head"],
    k: int = 10,
    metric: str = "truth_drop",
) -> FunctionVector:
    """Sum of the mean head outputs of the ``k`` heads with the largest AIE."""
    heads = top_k_components(aie, k)  # NaN (unswept) heads rank last
    vec = torch.stack([head_out_mean[l, h] for l, h in heads]).sum(0)
    return FunctionVector(vec, heads, tuple(float(aie[l, h]) for l, h in heads), metric)


# ---------------------------------------------------------------------------------------------
# 5. adding vectors at the final position


@dataclass(frozen=True)
class SteerResult:
    """P(truth) with vector ``v`` added at block ``layers[j]``'s output, final position."""

    p_truth: Float[Tensor, "n v layer"]
    logit_diff: Float[Tensor, "n v layer"]
    base: AnswerScores
    layers: tuple[int, ...]

    def delta_p_truth(self) -> Float[Tensor, "v layer"]:
        return self.p_truth.mean(0) - self.base.p_truth.mean()


@torch.no_grad()
def add_at_final_position(
    model,
    batch: Batch,
    answers: AnswerSet,
    vectors: Float[Tensor, "v d_model"] | Float[Tensor, "v layer d_model"],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "adding vectors",
) -> SteerResult:
    """Score every prompt with each vector added at each of ``layers`` (block output, final
    position). ``vectors`` may differ per layer (``[v, len(layers), d]``). All (vector, layer) rows,
    plus an unchanged row 0, share one single-token pass per prompt over its cached prefix."""
    layers = tuple(int(l) for l in layers)
    if vectors.ndim == 2:
        vectors = vectors[:, None].expand(-1, len(layers), -1)
    nv, nl, _ = vectors.shape
    if nl != len(layers):
        raise ValueError(f"vectors have {nl} layers, but {len(layers)} layers were given")
    vectors = vectors.float()
    n = batch.tokens.shape[0]
    p_truth, logit_diff = torch.empty((n, nv, nl)), torch.empty((n, nv, nl))
    base = torch.empty((n, model.cfg.d_vocab))
    bar = tqdm(total=n, desc=desc, disable=not progress, leave=False)
    for s in range(0, n, batch_size):
        b = _sub(batch, slice(s, s + batch_size))
        B = b.tokens.shape[0]
        cache, last = prefix_cache(model, b), final_tokens(b)
        base[s : s + B] = run_rows(model, cache, torch.arange(B), last)[:, 0].cpu()
        # rows (vector, layer, prompt): vector v added at layers[j] of prompt i is row (v * nl + j) * B + i
        vi = torch.arange(nv).repeat_interleave(nl * B)
        ji = torch.arange(nl).repeat_interleave(B).repeat(nv)
        prompt = torch.arange(B).repeat(nv * nl)
        li = torch.tensor(layers, dtype=torch.long)[ji]
        patches = Patches(
            "resid_post", torch.arange(len(prompt)), li, torch.full_like(li, -1), vectors[vi, ji], add=True
        )
        sc = score_patches(model, cache, last, prompt, patches, answer_rows(answers, slice(s, s + B)))
        p_truth[s : s + B] = sc.p_truth.reshape(nv, nl, B).permute(2, 0, 1)
        logit_diff[s : s + B] = sc.logit_diff.reshape(nv, nl, B).permute(2, 0, 1)
        bar.update(B)
    bar.close()
    return SteerResult(p_truth, logit_diff, score_logits(base, answers), layers)


# ---------------------------------------------------------------------------------------------
# the whole experiment on pairs


VECTOR_NAMES = ("fv", "diff_of_means")  # then the random directions, random_0 .. random_{r-1}


@dataclass(frozen=True)
class FVExperiment:
    means: HeadMeans  # over the training pairs' lying prompts
    aie: HeadAIE  # on the training pairs' corrupted prompts
    fv: FunctionVector
    dom: Float[Tensor, "layer d_model"]  # diff of means of resid_post, honest -> lying (training pairs)
    random: Float[Tensor, "r d_model"]  # unit random directions (seeded)
    # held-out pairs; vectors: VECTOR_NAMES, then each random direction; all at the FV's norm:
    honest_plus: SteerResult  # honest prompts + vector
    zero_shot_plus: SteerResult  # "Q: ...\nA:" + vector
    lying_minus: SteerResult  # lying prompts - vector
    layer: int  # the layer reported as the headline

    def effects(self, result: SteerResult, layer: int | None = None) -> dict[str, float]:
        """Mean ΔP(truth) at ``layer`` (default: the headline layer) of the FV, the rescaled
        diff of means, and the random directions: their mean, mean |ΔP| and max |ΔP|."""
        d = result.delta_p_truth()[:, result.layers.index(self.layer if layer is None else layer)]
        rand = d[len(VECTOR_NAMES) :]
        out = {name: float(d[i]) for i, name in enumerate(VECTOR_NAMES)}
        out.update(
            random_mean=float(rand.mean()),
            random_mean_abs=float(rand.abs().mean()),
            random_max_abs=float(rand.abs().max()),
        )
        return out

    def effect_ci(self, result: SteerResult, layer: int | None = None, *, n_boot: int = 1000, seed: int = 0) -> dict:
        """ΔP(truth) at ``layer`` with 95% CIs over test pairs for the FV and the diff of means, and
        the random directions' distribution (each direction's mean ΔP over the test pairs): its
        2.5/50/97.5% quantiles and the share of random directions with ``|ΔP| >= |ΔP_FV|``
        (an empirical p-value; ``(1 + count) / (1 + n_random)``)."""
        j = result.layers.index(self.layer if layer is None else layer)
        per_pair = result.p_truth[:, :, j] - result.base.p_truth[:, None]  # [n, v]
        n = per_pair.shape[0]
        out = {
            name: bootstrap(lambda i, v=v: per_pair[i, v].mean(), n, n_boot=n_boot, seed=seed).to_dict()
            for v, name in enumerate(VECTOR_NAMES)
        }
        rand = per_pair[:, len(VECTOR_NAMES) :].mean(0)
        q = torch.quantile(rand, torch.tensor([0.025, 0.5, 0.975])).tolist()
        fv = float(per_pair[:, 0].mean())
        out["random"] = {"n": len(rand), "q025": q[0], "median": q[1], "q975": q[2], "max_abs": float(rand.abs().max())}
        out["fv_p_vs_random"] = float((1 + (rand.abs() >= abs(fv)).sum()) / (1 + len(rand)))
        return out

    def cosine_fv_dom(self) -> Float[Tensor, " layer"]:
        return torch.nn.functional.cosine_similarity(self.fv.vector[None].float(), self.dom.float(), dim=-1)


def _vector_stack(fv: Tensor, dom: Tensor, rand: Tensor) -> Float[Tensor, "v layer d_model"]:
    """[fv, dom rescaled, random 1..r] at every layer, all at the FV's norm (dom differs per layer)."""
    norm = fv.norm()
    L = dom.shape[0]
    fv_l = fv[None].expand(L, -1)
    dom_l = dom / dom.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm
    rand_l = (rand * norm)[:, None].expand(-1, L, -1)
    return torch.cat([fv_l[None], dom_l[None], rand_l])


def run_function_vector(
    model,
    train: Sequence[ContrastPair],
    test: Sequence[ContrastPair],
    *,
    k: int = 10,
    layer: int | None = None,
    layers: Sequence[int] | None = None,
    corrupt_mode: Literal["mixed", "permuted"] = "mixed",
    metric: str = "truth_drop",
    n_random: int = 100,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> FVExperiment:
    """Heads, AIE, FV and diff-of-means on ``train``; every intervention measured on ``test``.

    Each training prompt's AIE patches a leave-one-out mean (its own fact's lying activation is
    not in the mean it is patched with). ``layer`` is the headline layer; by default the earliest
    layer among the FV's heads (where the vector's first part is written; Todd et al.'s L/3 rule
    came from models whose FV heads sat there, and here they sit elsewhere). The interventions are
    measured at every layer of ``layers`` (default: the layers the FV's heads live in), which
    always includes ``layer``. ``n_random`` random directions give the null distribution.
    """
    if len(train) < 2 or not test:
        raise PairError("need at least 2 training pairs (leave-one-out means) and some test pairs")
    if set(p.fact_id for p in train) & set(p.fact_id for p in test):
        raise PairError("a fact is in both the training and the test pairs")
    L = model.cfg.n_layers
    if layer is not None and not 0 <= layer < L:
        raise ValueError(f"layer must be in [0, {L}), got {layer}")
    if n_random < 1:
        raise ValueError("n_random must be >= 1")
    tok = model.tokenizer
    tr_ans, te_ans = answer_set(tok, train), answer_set(tok, test)

    lying_tr = tokenize(model, [p.lying for p in train])
    honest_tr = tokenize(model, [p.honest for p in train])
    corrupt_tr = tokenize(model, [corrupted_fewshot(p, corrupt_mode, seed) for p in train])
    z_all = collect_batch(model, lying_tr, ("z",), batch_size=batch_size).acts["z"]
    with torch.no_grad():
        means = HeadMeans(z_all.mean(0), head_out_from_z(model, z_all.mean(0)[None])[0].detach().float())
    aie = head_aie(model, corrupt_tr, tr_ans, leave_one_out_means(z_all), batch_size=batch_size, progress=progress)
    fv = build_function_vector(means.head_out, aie.aie(metric), k, metric)
    head_layers = sorted({l for l, _ in fv.heads})
    layer = head_layers[0] if layer is None else layer
    layers = sorted(set(head_layers if layers is None else layers) | {layer})
    dom = diff_of_means(
        collect_batch(model, honest_tr, ("resid_post",), batch_size=batch_size).acts["resid_post"],
        collect_batch(model, lying_tr, ("resid_post",), batch_size=batch_size).acts["resid_post"],
    )

    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn((n_random, model.cfg.d_model), generator=gen)
    rand = rand / rand.norm(dim=-1, keepdim=True)
    stack = _vector_stack(fv.vector.cpu().float(), dom[layers], rand)
    kw = dict(batch_size=batch_size, progress=progress)
    runs = {}
    for name, prompts, sign in (
        ("honest_plus", [p.honest for p in test], 1.0),
        ("zero_shot_plus", [zero_shot_prompt(p) for p in test], 1.0),
        ("lying_minus", [p.lying for p in test], -1.0),
    ):
        r = add_at_final_position(model, tokenize(model, prompts), te_ans, sign * stack, layers, desc=name, **kw)
        runs[name] = r
    return FVExperiment(means, aie, fv, dom, rand, layer=layer, **runs)
