"""Activation patching at the final position, from the honest (clean) run into the lying run.

For every pair and every component (each head's ``z``, or each layer's residual), the lying
prompt is rerun with that component's activation at the final position replaced by its value in
the honest run, and the answer is scored.

Metric, normalized per component over the pairs' means:
``effect = (mean(m_patched) - mean(m_lying)) / (mean(m_honest) - mean(m_lying))``, so 0 is the
lying baseline and 1 the honest baseline, for ``m`` = the logit difference (truth vs. the pair's
lie answer) and for ``m`` = P(truth). Normalizing the means, not each pair, keeps pairs with a tiny
honest-lying gap from dominating. Per-pair raw metrics are kept, so :meth:`PatchResult.effect_ci`
bootstraps the effect over pairs. Every result of the patching family computes both the same way,
from :class:`mechlie.causal.effects.EffectResult`.

Why it is fast: a patch at the final position cannot change any earlier position (attention is
causal), so each lying prompt's prefix is run once into a key/value cache, and every patch is a
row of a single-token pass over it (:func:`mechlie.core.kv.run_rows`): rows of several pairs share one
pass, the prefix attention is computed without repeating the cache, and a row patched at layer
``l`` runs only blocks ``l ..``. TransformerLens's patching functions rerun the whole prompt once
per component. ``benchmarks/bench_patching.py`` measures the difference.

:class:`Patches` is the one way to say "which rows get which activations": single-component
sweeps, joint patching of head sets (:mod:`mechlie.causal.circuits`), mean-activation patching of
function vectors (:mod:`mechlie.causal.function_vectors`) and vector addition all go through
:func:`score_patches`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.causal.effects import EffectResult
from mechlie.core.hooks import HEAD_KINDS, LAYER_KINDS, hook_name
from mechlie.core.kv import (
    Baseline,
    FinalActs,
    PrefixCache,
    baseline_inputs,
    collect_batch,
    final_tokens,
    run_rows,
    top_heads,
)
from mechlie.core.kv import prefix_cache as _prefix_cache
from mechlie.core.metrics import AnswerScores, score_logits
from mechlie.core.pairs import AnswerSet, Batch, ContrastPair, PairError, answer_set, tokenize

PATCHABLE = ("z",) + LAYER_KINDS

__all__ = [
    "PATCHABLE",
    "PatchResult",
    "Patches",
    "answer_rows",
    "component_grid",
    "patch_final_position",
    "patch_final_positions",
    "patch_runs",
    "patch_runs_kinds",
    "prefix_cache",
    "score_patches",
    "top_heads",
]


def prefix_cache(model: HookedTransformer, batch: Batch):
    """TransformerLens's cache of every position but the last (kept for callers that run
    TransformerLens's own cached forward; new code uses :func:`mechlie.core.kv.prefix_cache`)."""
    return _prefix_cache(model, batch).tl


@dataclass(frozen=True)
class PatchResult(EffectResult):
    """Per pair and component, the lying (corrupt) run with that component patched from the honest
    (clean) run; ``effect`` / ``effect_ci``: 0 = lying baseline, 1 = honest baseline."""

    LO: ClassVar[str] = "corrupt"
    HI: ClassVar[str] = "clean"

    kind: str  # "z" (per head) or a residual/layer kind
    p_truth: Float[Tensor, "n ..."]  # per pair, per component, after patching
    logit_diff: Float[Tensor, "n ..."]
    clean: AnswerScores  # honest run
    corrupt: AnswerScores  # lying run


def component_grid(model: HookedTransformer, kind: str) -> tuple[int, ...]:
    return (model.cfg.n_layers, model.cfg.n_heads) if kind in HEAD_KINDS else (model.cfg.n_layers,)


def answer_rows(answers: AnswerSet, idx: Tensor | slice) -> AnswerSet:
    """The answer ids of the prompts ``idx`` (a slice or an index tensor, repeats allowed)."""
    return AnswerSet(*(t[idx] for t in (answers.truth, answers.lie, answers.choices)))


@dataclass(frozen=True)
class Patches:
    """Entries ``e``: in row ``row[e]``, set (or with ``add``, add to) ``kind`` at block
    ``layer[e]`` (head ``head[e]`` for ``z``; ``-1`` for layer kinds) to ``value[e]``, at the
    row's new token ``pos[e]`` (default 0: the final prompt token of a one-token row). A row may
    hold many entries (joint patching); a row with none is unpatched."""

    kind: str
    row: Int[Tensor, " e"]
    layer: Int[Tensor, " e"]
    head: Int[Tensor, " e"]
    value: Float[Tensor, "e d"]
    add: bool = False
    pos: Int[Tensor, " e"] | None = None

    def __post_init__(self) -> None:
        if self.kind not in PATCHABLE:
            raise ValueError(f"cannot patch {self.kind!r}; patchable kinds: {PATCHABLE}")
        n = len(self.row)
        if not (len(self.layer) == len(self.head) == len(self.value) == n) or (
            self.pos is not None and len(self.pos) != n
        ):
            raise ValueError("row, layer, head, value (and pos) need one entry each")

    def hooks(self, rows: Int[Tensor, " e"] | None = None) -> list:
        """Hooks writing the entries (rows renumbered by ``rows`` if given)."""
        row = self.row if rows is None else rows
        pos = torch.zeros_like(self.row) if self.pos is None else self.pos
        out = []
        for layer in self.layer.unique().tolist():
            sel = (self.layer == layer).nonzero().squeeze(1)
            r, p, v = row[sel], pos[sel], self.value[sel]
            if self.kind == "z":
                h = self.head[sel]

                def hook(act, hook, r=r, p=p, h=h, v=v):
                    v = v.to(act.device, act.dtype)
                    act[r, p, h] = act[r, p, h] + v if self.add else v
                    return act
            else:

                def hook(act, hook, r=r, p=p, v=v):
                    v = v.to(act.device, act.dtype)
                    act[r, p] = act[r, p] + v if self.add else v
                    return act

            out.append((hook_name(self.kind, layer), hook))
        return out


@torch.inference_mode()
def run_patches(
    model: HookedTransformer,
    cache: PrefixCache,
    tokens: Int[Tensor, "B t"],
    prompt: Int[Tensor, " R"],
    patches: Patches,
    reduce: Callable[[Tensor, Tensor], Tensor],
    *,
    max_rows: int = 512,
    baseline: Baseline | None = None,
) -> Tensor:
    """Run ``R`` rows (row ``r`` continues prompt ``prompt[r]`` with the new tokens
    ``tokens[prompt[r]]``, with the entries of ``patches`` for that row) and return
    ``reduce(logits[r, t, vocab], rows[r])`` for every row, in row order. Rows run in chunks of
    ``max_rows``, sorted by the first block they change, each over the cached prefix
    (:func:`mechlie.core.kv.run_rows`); the prompts' plain residuals (where a row joins at its first
    changed block) are computed once for every chunk, or taken from ``baseline``."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    R = len(prompt)
    if len(patches.row) and (int(patches.row.min()) < 0 or int(patches.row.max()) >= R):
        raise ValueError(f"patch rows must be in [0, {R})")
    L = model.cfg.n_layers
    start = torch.full((R,), L - 1, dtype=torch.long)
    start.scatter_reduce_(0, patches.row, patches.layer, reduce="amin")
    order = torch.argsort(start * R + torch.arange(R))  # stable by start layer
    where = torch.empty(R, dtype=torch.long)
    where[order] = torch.arange(R)
    if baseline is None and int(start.max()) > 0:
        uniq = prompt.unique()
        baseline = baseline_inputs(model, cache, tokens[uniq], uniq)
    out: Tensor | None = None
    for c0 in range(0, R, max_rows):
        rows = order[c0 : c0 + max_rows]
        keep = (where[patches.row] >= c0) & (where[patches.row] < c0 + len(rows))
        sub = Patches(
            patches.kind,
            patches.row[keep],
            patches.layer[keep],
            patches.head[keep],
            patches.value[keep],
            patches.add,
            None if patches.pos is None else patches.pos[keep],
        )
        pr = prompt[rows]
        logits = run_rows(
            model,
            cache,
            pr,
            tokens[pr],
            fwd_hooks=sub.hooks(where[sub.row] - c0),
            start_layers=start[rows],
            baseline=baseline,
        )
        r = reduce(logits, rows).cpu()
        if out is None:
            out = torch.empty((R, *r.shape[1:]), dtype=r.dtype)
        out[rows] = r
    assert out is not None
    return out


@torch.inference_mode()
def score_patches(
    model: HookedTransformer,
    cache: PrefixCache,
    tokens: Int[Tensor, "B t"],
    prompt: Int[Tensor, " R"],
    patches: Patches,
    answers: AnswerSet,
    *,
    max_rows: int = 512,
    baseline: Baseline | None = None,
) -> AnswerScores:
    """Score ``R`` rows (:func:`run_patches`) at their last new token against ``answers`` (one row
    of answer ids per prompt).

    Example:
        >>> p = Patches("z", rows, layers, heads, clean_z[prompt[rows], layers, heads])
        >>> scores = score_patches(model, prefix, final_tokens(batch), prompt, p, answers)
    """

    def reduce(logits: Tensor, rows: Tensor) -> Tensor:
        pr = prompt[rows]
        s = score_logits(logits[:, -1], answer_rows(answers, pr))
        return torch.stack([s.p_truth, s.logit_diff, s.correct.float(), s.choice_cov], 1)

    x = run_patches(model, cache, tokens, prompt, patches, reduce, max_rows=max_rows, baseline=baseline)
    return AnswerScores(x[:, 0], x[:, 1], x[:, 2] > 0.5, x[:, 3])


@torch.inference_mode()
def patch_final_position(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    kind: str = "z",
    *,
    batch_size: int = 16,
    max_rows: int = 1024,
    progress: bool = True,
    clean: FinalActs | None = None,
    answer: Literal["first", "full"] = "first",
) -> PatchResult:
    """Patch every component of ``kind`` from honest into lying, at the final position.

    Args:
        pairs: (honest, lying) prompt pairs.
        kind: ``"z"`` patches each head's ``hook_z`` (so its output); a layer kind such as
            ``"resid_pre"`` patches that layer's whole vector.
        batch_size: prompts per prefix cache (their patches share passes).
        max_rows: rows of one single-token pass (memory: ``max_rows x d_vocab`` logits).
        clean: the honest prompts' final-position activations and logits, when already collected
            (:func:`mechlie.core.kv.collect_batch`); otherwise they are run here.
        answer: ``"first"`` scores multi-token answers by the first token of each spelling (a
            pair whose truth and lie share a first token raises :class:`PairError`); ``"full"``
            by the teacher-forced log-probability of the whole answer (``full_answers`` of
            :func:`patch_runs_kinds`), which tells such pairs apart.

    Returns:
        :class:`PatchResult` with per-pair scores ``[n, layer, (head)]``.

    Example:
        >>> res = patch_final_position(model, pairs, "z")
        >>> res.effect().shape  # [n_layers, n_heads]; 1 = fully honest
    """
    return patch_final_positions(
        model, pairs, (kind,), batch_size=batch_size, max_rows=max_rows, progress=progress, clean=clean, answer=answer
    )[kind]


@torch.inference_mode()
def patch_final_positions(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    kinds: Sequence[str] = ("z", "resid_pre"),
    *,
    batch_size: int = 16,
    max_rows: int = 1024,
    progress: bool = True,
    clean: FinalActs | None = None,
    answer: Literal["first", "full"] = "first",
) -> dict[str, PatchResult]:
    """:func:`patch_final_position` for several kinds at once: each lying prompt's prefix is
    cached once for all of them.

    Example:
        >>> res = patch_final_positions(model, pairs, ("z", "resid_pre"))
        >>> res["z"].effect().shape, res["resid_pre"].effect().shape
    """
    if len(pairs) == 0:
        raise PairError("no pairs to patch")
    if answer not in ("first", "full"):
        raise ValueError(f"answer must be 'first' or 'full', got {answer!r}")
    if answer == "full" and any(not p.lie for p in pairs):
        raise PairError("full-answer scores need a lie answer for every pair")
    return patch_runs_kinds(
        model,
        [p.honest for p in pairs],
        [p.lying for p in pairs],
        answer_set(model.tokenizer, pairs) if answer == "first" else None,
        kinds,
        batch_size=batch_size,
        max_rows=max_rows,
        progress=progress,
        clean=clean,
        full_answers=([p.truth for p in pairs], [p.lie for p in pairs]) if answer == "full" else None,
    )


def _single_component_patches(
    kind: str, grid: tuple[int, ...], clean: Tensor, n_prompts: int
) -> tuple[Tensor, Patches]:
    """Rows ``(component, prompt)`` in component order (so sorted by layer); row ``c * n + b``
    patches component ``c`` of prompt ``b`` with ``clean[b]``'s value."""
    comps = torch.cartesian_prod(*[torch.arange(s) for s in grid]).reshape(-1, len(grid))
    C = len(comps)
    prompt = torch.arange(n_prompts).repeat(C)
    comp = torch.arange(C).repeat_interleave(n_prompts)
    layer = comps[comp, 0]
    head = comps[comp, 1] if kind == "z" else torch.full_like(layer, -1)
    value = clean[prompt, layer, head] if kind == "z" else clean[prompt, layer]
    return prompt, Patches(kind, torch.arange(len(prompt)), layer, head, value)


@torch.inference_mode()
def patch_runs(
    model: HookedTransformer,
    clean_prompts: Sequence[str],
    corrupt_prompts: Sequence[str],
    answers: AnswerSet,
    kind: str = "z",
    *,
    batch_size: int = 16,
    max_rows: int = 1024,
    progress: bool = True,
    clean: FinalActs | None = None,
) -> PatchResult:
    """Patch each component of ``kind`` from ``clean_prompts[i]``'s run into ``corrupt_prompts[i]``'s."""
    return patch_runs_kinds(
        model,
        clean_prompts,
        corrupt_prompts,
        answers,
        (kind,),
        batch_size=batch_size,
        max_rows=max_rows,
        progress=progress,
        clean=clean,
    )[kind]


@torch.inference_mode()
def patch_runs_kinds(
    model: HookedTransformer,
    clean_prompts: Sequence[str],
    corrupt_prompts: Sequence[str],
    answers: AnswerSet | None,
    kinds: Sequence[str] = ("z",),
    *,
    batch_size: int = 16,
    max_rows: int = 1024,
    progress: bool = True,
    clean: FinalActs | None = None,
    full_answers: tuple[Sequence[str], Sequence[str]] | None = None,
) -> dict[str, PatchResult]:
    """Patch each component of every kind of ``kinds`` from ``clean_prompts[i]``'s run into
    ``corrupt_prompts[i]``'s; the corrupt prefixes are cached once for all kinds.

    Args:
        answers: one row per pair (:func:`mechlie.core.pairs.answer_set`): first-token scores.
        kinds: patchable kinds (:data:`PATCHABLE`), each component of each patched on its own.
        clean: the clean prompts' final-position activations (every kind of ``kinds``) and logits,
            when already collected; otherwise one clean pass collects them.
        full_answers: (truths, lies), one string each per pair: score instead by the full answers
            (``answers`` is then unused). Each spelling of each answer (:func:`mechlie.core.pairs.answer_sequences`)
            is teacher-forced after the patched final token, as rows of one pass over the cached
            prefix; ``log P`` sums over its tokens and ``logsumexp`` over spellings, as
            :func:`mechlie.core.metrics.answer_logprob`. Then ``logit_diff`` is ``log P(truth) - log P(lie)``
            and ``p_truth`` is ``P(truth)``, the full answer's probability.

    Returns:
        ``{kind: PatchResult}``.
    """
    kinds = tuple(kinds)
    n = _check_runs(model, clean_prompts, corrupt_prompts, answers, kinds, batch_size, max_rows, full_answers)
    if clean is None:
        clean = collect_batch(
            model,
            tokenize(model, list(clean_prompts)),
            kinds,
            batch_size=batch_size,
            progress=progress,
            desc="clean run",
        )
    else:
        _check_clean(model, clean, kinds, n)
    grids = {k: component_grid(model, k) for k in kinds}
    p_truth = {k: torch.empty((n, *g)) for k, g in grids.items()}
    logit_diff = {k: torch.empty((n, *g)) for k, g in grids.items()}
    corrupt_logits = torch.empty((n, model.cfg.d_vocab))
    desc = f"patching {', '.join(kinds)}"
    for s in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        idx = slice(s, min(n, s + batch_size))
        b = tokenize(model, list(corrupt_prompts[idx]))
        B = b.tokens.shape[0]
        cache = _prefix_cache(model, b)
        last = final_tokens(b)
        corrupt_logits[idx] = run_rows(model, cache, torch.arange(B), last)[:, 0].cpu()
        acts = {k: clean.acts[k][idx] for k in kinds}
        full = None if full_answers is None else tuple(list(x[idx]) for x in full_answers)
        ans = None if answers is None else answer_rows(answers, idx)
        for kind, (p, ld) in _patch_batch(model, cache, last, grids, acts, ans, full, max_rows).items():
            p_truth[kind][idx], logit_diff[kind][idx] = p, ld
    if full_answers is not None:
        clean_scores = _full_answer_scores(model, clean_prompts, *full_answers, batch_size)
        corrupt_scores = _full_answer_scores(model, corrupt_prompts, *full_answers, batch_size)
    else:
        clean_scores, corrupt_scores = score_logits(clean.logits, answers), score_logits(corrupt_logits, answers)
    return {
        k: PatchResult(kind=k, p_truth=p_truth[k], logit_diff=logit_diff[k], clean=clean_scores, corrupt=corrupt_scores)
        for k in kinds
    }


def _patch_batch(
    model: HookedTransformer,
    cache: PrefixCache,
    last: Int[Tensor, "B 1"],
    grids: dict[str, tuple[int, ...]],
    clean_acts: dict[str, Tensor],
    answers: AnswerSet | None,
    full: tuple[list[str], list[str]] | None,
    max_rows: int,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Each component of each kind patched, on its own, into one batch of corrupt prompts (cached in
    ``cache``): ``{kind: (p_truth, logit_diff)}``, each ``[B, *grid]``; scored by first tokens
    (``answers``) or by the full answers (``full``: truths, lies)."""
    B = last.shape[0]
    out = {}
    if full is not None:
        for kind, grid in grids.items():
            lt, ll = _full_answer_patches(model, cache, last, *full, kind, grid, clean_acts[kind], max_rows)
            out[kind] = lt.exp().reshape(B, *grid), (lt - ll).reshape(B, *grid)
        return out
    base = baseline_inputs(model, cache, last)  # shared by every kind and chunk of rows
    for kind, grid in grids.items():
        prompt, patches = _single_component_patches(kind, grid, clean_acts[kind], B)
        sc = score_patches(model, cache, last, prompt, patches, answers, max_rows=max_rows, baseline=base)
        # rows are (component, prompt): reshape to [prompt, *grid]
        out[kind] = sc.p_truth.reshape(-1, B).T.reshape(B, *grid), sc.logit_diff.reshape(-1, B).T.reshape(B, *grid)
    return out


def _check_runs(
    model: HookedTransformer,
    clean_prompts: Sequence[str],
    corrupt_prompts: Sequence[str],
    answers: AnswerSet | None,
    kinds: tuple[str, ...],
    batch_size: int,
    max_rows: int,
    full_answers: tuple[Sequence[str], Sequence[str]] | None,
) -> int:
    """Validate :func:`patch_runs_kinds`'s inputs; return the number of pairs."""
    bad = [k for k in kinds if k not in PATCHABLE]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"cannot patch {bad or list(kinds)}; patchable kinds: {PATCHABLE} (each once)")
    if batch_size < 1 or max_rows < 1:
        raise ValueError("batch_size and max_rows must be >= 1")
    n = len(clean_prompts)
    n_ans = len(full_answers[0]) if full_answers is not None else len(answers.truth) if answers is not None else -1
    if full_answers is not None and len(full_answers[1]) != n_ans:
        raise PairError(f"{n_ans} truths but {len(full_answers[1])} lies")
    if n == 0 or n != len(corrupt_prompts) or n != n_ans:
        raise PairError(
            f"need as many clean prompts ({n}) as corrupted prompts ({len(corrupt_prompts)}) and answers "
            f"({n_ans}), and at least one"
        )
    return n


def _check_clean(model: HookedTransformer, clean: FinalActs, kinds: tuple[str, ...], n: int) -> None:
    """Already collected clean activations must hold every kind, for ``n`` prompts, and their logits."""
    grids = {k: (n, *component_grid(model, k)) for k in kinds}
    for k in kinds:
        if k not in clean.acts or tuple(clean.acts[k].shape[: len(grids[k])]) != grids[k]:
            raise ValueError(f"clean activations need {k!r} of shape {grids[k]} + (d,)")
    if tuple(clean.logits.shape) != (n, model.cfg.d_vocab):
        raise ValueError(f"clean logits need shape {(n, model.cfg.d_vocab)}, got {tuple(clean.logits.shape)}")


def _full_answer_scores(
    model: HookedTransformer, prompts: Sequence[str], truths: Sequence[str], lies: Sequence[str], batch_size: int
) -> AnswerScores:
    """Unpatched runs scored by the full answers (:func:`mechlie.core.metrics.answer_logprob`)."""
    from mechlie.core.metrics import answer_logprob

    lt = answer_logprob(model, list(prompts), list(truths), batch_size=batch_size)
    ll = answer_logprob(model, list(prompts), list(lies), batch_size=batch_size)
    return AnswerScores(lt.exp(), lt - ll, lt > ll, torch.full_like(lt, float("nan")), lt, ll)


def _full_answer_patches(
    model: HookedTransformer,
    cache: PrefixCache,
    last: Int[Tensor, "B 1"],
    truths: Sequence[str],
    lies: Sequence[str],
    kind: str,
    grid: tuple[int, ...],
    clean: Tensor,
    max_rows: int,
) -> tuple[Float[Tensor, "B C"], Float[Tensor, "B C"]]:
    """``log P(truth)`` and ``log P(lie)`` (full answers) of every prompt of ``cache`` with each
    component of ``kind`` patched at the final prompt token. A spelling of ``t`` tokens is a row of
    ``t`` new tokens (the final prompt token, then the spelling but its last token), over a cache
    row of its own (:meth:`mechlie.core.kv.PrefixCache.select`), so rows of one spelling share a baseline."""
    from mechlie.core.pairs import answer_sequences

    B = len(truths)
    C = int(torch.tensor(grid).prod())
    spell = [  # (prompt, is truth, token ids)
        (j, is_truth, seq)
        for j in range(B)
        for is_truth, text in ((True, truths[j]), (False, lies[j]))
        for seq in answer_sequences(model.tokenizer, text)
    ]
    logp = torch.empty((len(spell), C))
    for length in sorted({len(q) for _, _, q in spell}):
        ids = [i for i, sp in enumerate(spell) if len(sp[2]) == length]
        pj = torch.tensor([spell[i][0] for i in ids])
        target = torch.tensor([spell[i][2] for i in ids])  # [S, length]
        toks = torch.cat([last[pj].cpu(), target[:, :-1]], 1).to(last.device)  # [S, length]
        sub = cache.select(pj)
        prompt, patches = _single_component_patches(kind, grid, clean[pj], len(ids))

        def reduce(logits: Tensor, rows: Tensor, prompt=prompt, target=target) -> Tensor:
            lp = logits.log_softmax(-1)
            return lp.gather(-1, target[prompt[rows]].to(lp.device)[..., None]).squeeze(-1).sum(-1)

        rows_lp = run_patches(model, sub, toks, prompt, patches, reduce, max_rows=max(1, max_rows // length))
        logp[ids] = rows_lp.reshape(C, len(ids)).T  # rows are (component, spelling)
    out = []
    for want in (True, False):
        m = torch.full((B, len(spell)), float("-inf"))
        for i, (j, is_truth, _) in enumerate(spell):
            if is_truth == want:
                m[j, i] = 0.0
        out.append((m[:, :, None] + logp[None]).logsumexp(1))  # [B, C]: logsumexp over spellings
    return out[0], out[1]
