"""Residual patching by position x layer, from the honest (clean) run into the lying run.

For every layer ``l`` and prompt position, the lying prompt is rerun with the residual stream
(``blocks.l.hook_resid_pre`` by default, i.e. the input of block ``l``) at that one position
replaced by its value in the honest run, and the answer is scored. **Groups** of positions (e.g.
all tokens of one demonstration's answer) are also patched together, since a signal spread over
several tokens may show only when they move at once. Effects are normalized as in
:class:`mechlie.causal.patching.PatchResult` (0 = lying baseline, 1 = honest baseline, over means).

**Which positions.** In the built-in few-shot format the honest and lying prompts share every
token except the demonstrations' answers, 15 to 70 tokens before the end; patching a position
where both prompts hold the same token and the same prefix changes nothing. So the default sweep
(:func:`patch_positions`, ``positions="differing"``) covers every offset where any pair's tokens
differ, plus the last ``n_final`` offsets (the question and ``A:``, where the prompts' contexts
differ), and each maximal run of differing tokens (one demonstration's answer) as a group.

**Alignment.** Honest and lying prompts can differ in length (a chat template, a longer false
answer), so positions are aligned *from the end*: offset ``-1`` is the final prompt token in
both, ``-2`` the one before, and so on, over the common suffix (``min`` of the two lengths) only.
Across pairs, only offsets present in every pair are kept.

**Speed.** A patch at position ``p`` cannot change positions before ``p``, so the lying prompt is
run once into a key/value cache, and each position's patches (one per layer, as rows of one
pass) rerun only the suffix from ``p`` over the cache truncated to ``p`` positions
(:func:`mechlie.core.kv.run_rows`); a row patched at block ``l`` runs only blocks ``l ..``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.causal.effects import EffectResult, normalized_mean_effect
from mechlie.causal.patching import Patches, answer_rows, score_patches
from mechlie.core.hooks import LAYER_KINDS, hook_name
from mechlie.core.kv import prefix_cache, run_rows
from mechlie.core.metrics import AnswerScores, score_logits
from mechlie.core.pairs import AnswerSet, Batch, ContrastPair, PairError, answer_set, tokenize

log = logging.getLogger(__name__)


def align_from_end(len_clean: int, len_corrupt: int, n_positions: int | None = None) -> list[tuple[int, int]]:
    """``(clean_index, corrupt_index)`` for offsets ``-m .. -1`` (in that order), where ``m`` is
    the shorter length, capped at ``n_positions``."""
    if len_clean < 1 or len_corrupt < 1:
        raise PairError("prompts must have at least one token")
    m = min(len_clean, len_corrupt)
    if n_positions is not None:
        m = min(m, n_positions)
    return [(len_clean - k, len_corrupt - k) for k in range(m, 0, -1)]


def differing_offsets(clean: Int[Tensor, " a"], corrupt: Int[Tensor, " b"]) -> list[int]:
    """Offsets from the end (ascending) where the aligned tokens of the two prompts differ."""
    m = min(len(clean), len(corrupt))
    diff = clean[len(clean) - m :].cpu() != corrupt[len(corrupt) - m :].cpu()
    return [int(i) - m for i in diff.nonzero().squeeze(1)]


def differing_groups(clean: Int[Tensor, " a"], corrupt: Int[Tensor, " b"]) -> list[list[int]]:
    """Maximal runs of consecutive differing offsets (one demonstration's answer each), in order."""
    groups: list[list[int]] = []
    for o in differing_offsets(clean, corrupt):
        if groups and groups[-1][-1] == o - 1:
            groups[-1].append(o)
        else:
            groups.append([o])
    return groups


@dataclass(frozen=True)
class PositionPatchResult(EffectResult):
    """Per pair, offset (or group of offsets) and layer, the lying run patched from the honest run;
    ``effect`` / ``group_effect``: 0 = lying baseline, 1 = honest baseline."""

    LO: ClassVar[str] = "corrupt"
    HI: ClassVar[str] = "clean"

    kind: str
    p_truth: Float[Tensor, "n pos layer"]  # patched, per pair / offset / layer
    logit_diff: Float[Tensor, "n pos layer"]
    clean: AnswerScores
    corrupt: AnswerScores
    offsets: tuple[int, ...]  # offset from the end of each position, e.g. (-16, ..., -1)
    layers: tuple[int, ...]
    group_p_truth: Float[Tensor, "n group layer"] | None = None  # each group of offsets patched together
    group_logit_diff: Float[Tensor, "n group layer"] | None = None
    groups: tuple[tuple[tuple[int, ...], ...], ...] = ()  # per pair, the offsets of each group

    def group_effect(
        self, metric: str = "logit_diff", idx: Int[Tensor, " m"] | None = None
    ) -> Float[Tensor, "group layer"]:
        if self.group_p_truth is None:
            raise ValueError("no groups were patched")
        return normalized_mean_effect(getattr(self, f"group_{metric}"), *self.baselines(metric), idx)


def _check_positions(
    model: HookedTransformer,
    clean: Sequence[Tensor],
    corrupt: Sequence[Tensor],
    kind: str,
    layers: Sequence[int] | None,
    n_positions: int | None,
    offsets: Sequence[int] | None,
    groups: Sequence[Sequence[Sequence[int]]] | None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate :func:`patch_positions_tokens`'s inputs; return its ``(layers, offsets)``."""
    if kind not in LAYER_KINDS:
        raise ValueError(f"kind must be one of {LAYER_KINDS}")
    if len(clean) != len(corrupt) or not clean:
        raise PairError("need the same, non-zero number of clean and corrupt prompts")
    L = model.cfg.n_layers
    layers = tuple(range(L)) if layers is None else tuple(sorted(int(l) for l in layers))
    if not layers or layers[0] < 0 or layers[-1] >= L:
        raise ValueError(f"layers must be in [0, {L})")
    m = min(min(len(c), len(k)) for c, k in zip(clean, corrupt))
    if offsets is None:
        P = m if n_positions is None else min(m, n_positions)
        offsets = tuple(range(-P, 0))
    else:
        offsets = tuple(sorted(set(int(o) for o in offsets)))
        if not offsets or offsets[0] < -m or offsets[-1] > -1:
            raise ValueError(f"offsets must be in [-{m}, -1] (the common suffix of every pair)")
    if groups is not None:
        if len(groups) != len(clean) or len({len(g) for g in groups}) != 1:
            raise ValueError("groups needs one list per pair, with the same number of groups in each")
        for i, gs in enumerate(groups):
            m_i = min(len(clean[i]), len(corrupt[i]))
            if any(not g or min(g) < -m_i or max(g) > -1 for g in gs):
                raise ValueError(f"pair {i}: every group needs offsets in [-{m_i}, -1]")
    return layers, offsets


class _PairPatcher:
    """One pair: the clean run's ``kind`` at ``layers`` (every position) and the corrupt prompt's
    cache; :meth:`run` scores every layer's row with a set of offsets patched at once."""

    def __init__(
        self, model: HookedTransformer, clean: Tensor, corrupt: Tensor, kind: str, layers: tuple[int, ...], ans
    ):
        dev = model.cfg.device
        self.model, self.kind, self.layers, self.ans = model, kind, layers, ans
        ct, self.kt = clean.to(dev)[None], corrupt.to(dev)[None]
        self.store: dict[int, Tensor] = {}

        def saver(layer: int):
            def hook(act, hook):
                self.store[layer] = act[0].clone()

            return hook

        with model.hooks(fwd_hooks=[(hook_name(kind, l), saver(l)) for l in layers]):
            self.clean_logits = model(ct)[0, -1].float().cpu()
        self.Lc, self.Lk = ct.shape[1], self.kt.shape[1]
        self.cache = prefix_cache(model, Batch(self.kt, torch.ones_like(self.kt)))
        zero = torch.zeros(1, dtype=torch.long)
        self.corrupt_logits = run_rows(model, self.cache, zero, self.kt[:, -1:])[0, -1].cpu()

    def run(self, offs: Sequence[int]) -> AnswerScores:
        """All layers' rows, patching every offset of ``offs`` at once."""
        nl, Lk = len(self.layers), self.Lk
        first = Lk + min(offs)
        rows = torch.arange(nl).repeat(len(offs))
        lay = torch.tensor(self.layers, dtype=torch.long).repeat(len(offs))
        pos = torch.tensor([Lk + o - first for o in offs]).repeat_interleave(nl)
        value = torch.stack([self.store[l][self.Lc + o] for o in offs for l in self.layers])
        patches = Patches(self.kind, rows, lay, torch.full_like(lay, -1), value, pos=pos)
        return score_patches(
            self.model,
            self.cache.truncate(first),
            self.kt[:, first:],
            torch.zeros(nl, dtype=torch.long),
            patches,
            self.ans,
        )


@torch.inference_mode()
def patch_positions_tokens(
    model: HookedTransformer,
    clean: Sequence[Int[Tensor, " _"]],
    corrupt: Sequence[Int[Tensor, " _"]],
    answers: AnswerSet,
    *,
    kind: str = "resid_pre",
    layers: Sequence[int] | None = None,
    n_positions: int | None = None,
    offsets: Sequence[int] | None = None,
    groups: Sequence[Sequence[Sequence[int]]] | None = None,
    progress: bool = True,
) -> PositionPatchResult:
    """Patch ``kind`` at every (aligned offset, layer) from ``clean[i]`` into ``corrupt[i]``.

    Args:
        clean, corrupt: unpadded 1-D token tensors, so prompt lengths may differ freely.
        layers: blocks to patch (default: all).
        n_positions: the last ``n`` common offsets (default: all common offsets).
        offsets: explicit offsets from the end (negative) instead of ``n_positions``.
        groups: per pair, the same number of offset groups, each patched at once.

    Returns:
        :class:`PositionPatchResult`, per pair ``[n, offset, layer]`` (and ``[n, group, layer]``).
    """
    layers, offsets = _check_positions(model, clean, corrupt, kind, layers, n_positions, offsets, groups)
    n, nl = len(clean), len(layers)
    G = 0 if groups is None else len(groups[0])
    p_truth, logit_diff = torch.empty((n, len(offsets), nl)), torch.empty((n, len(offsets), nl))
    gp, gl = torch.empty((n, G, nl)), torch.empty((n, G, nl))
    clean_logits, corrupt_logits = torch.empty((n, model.cfg.d_vocab)), torch.empty((n, model.cfg.d_vocab))
    bar = tqdm(total=n * (len(offsets) + G), desc=f"patching {kind} by position", disable=not progress, leave=False)
    for i in range(n):
        ans = answer_rows(answers, slice(i, i + 1))
        pair = _PairPatcher(model, clean[i], corrupt[i], kind, layers, ans)
        clean_logits[i], corrupt_logits[i] = pair.clean_logits, pair.corrupt_logits
        for j, o in enumerate(offsets):
            sc = pair.run([o])
            p_truth[i, j], logit_diff[i, j] = sc.p_truth, sc.logit_diff
            bar.update(1)
        for g, offs in enumerate(groups[i] if groups is not None else ()):
            sc = pair.run(offs)
            gp[i, g], gl[i, g] = sc.p_truth, sc.logit_diff
            bar.update(1)
    bar.close()
    return PositionPatchResult(
        kind,
        p_truth,
        logit_diff,
        score_logits(clean_logits, answers),
        score_logits(corrupt_logits, answers),
        tuple(offsets),
        layers,
        gp if groups is not None else None,
        gl if groups is not None else None,
        tuple(tuple(tuple(int(o) for o in g) for g in gs) for gs in groups) if groups is not None else (),
    )


def patch_positions(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    *,
    kind: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: Literal["differing", "last"] = "differing",
    n_positions: int | None = None,
    n_final: int = 4,
    progress: bool = True,
) -> PositionPatchResult:
    """:func:`patch_positions_tokens` on ``pairs`` (honest = clean, lying = corrupt).

    ``positions="differing"`` (default): every offset where any pair's aligned tokens differ, plus
    the last ``n_final`` offsets, and each run of differing tokens patched as a group (when every
    pair has the same number of runs, e.g. one per demonstration). ``"last"``: the last
    ``n_positions`` offsets (all common offsets if None).

    Example:
        >>> res = patch_positions(model, pairs, layers=range(0, 30, 5))
        >>> res.offsets, res.group_effect().shape  # [n_demonstrations, n_layers]
    """
    if not pairs:
        raise PairError("no pairs to patch")
    if positions not in ("differing", "last"):
        raise ValueError(f"positions must be 'differing' or 'last', got {positions!r}")

    def toks(text: str) -> Tensor:
        return tokenize(model, [text]).tokens[0].cpu()

    clean, corrupt = [toks(p.honest) for p in pairs], [toks(p.lying) for p in pairs]
    offsets, groups = None, None
    if positions == "differing":
        m = min(min(len(c), len(k)) for c, k in zip(clean, corrupt))
        diff = {o for c, k in zip(clean, corrupt) for o in differing_offsets(c, k) if o >= -m}
        offsets = sorted(diff | set(range(-min(n_final, m), 0)))
        runs = [differing_groups(c, k) for c, k in zip(clean, corrupt)]
        if len({len(r) for r in runs}) == 1 and runs[0]:
            groups = runs
        else:
            log.warning(
                "pairs differ in their number of differing-token runs (%s); no group patching",
                sorted({len(r) for r in runs}),
            )
        log.info(
            "position patching: %d offsets (%d differing in some pair, the last %d), %d groups",
            len(offsets),
            len(diff),
            n_final,
            0 if groups is None else len(groups[0]),
        )
    return patch_positions_tokens(
        model,
        clean,
        corrupt,
        answer_set(model.tokenizer, pairs),
        kind=kind,
        layers=layers,
        n_positions=n_positions,
        offsets=offsets,
        groups=groups,
        progress=progress,
    )
