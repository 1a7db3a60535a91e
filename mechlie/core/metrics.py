"""Behaviour at the answer position: P(truth), logit difference, lie rate and the summary metrics.

Definitions (per prompt, from the next-token distribution after the final prompt token):

- ``p_truth``: probability summed over the truth's single-token spellings (" Paris", "Paris").
- ``logit_diff``: ``log P(truth) - log P(lie)`` with both summed over spellings; with one
  spelling each this is exactly ``logit(truth) - logit(lie)``.
- ``correct``: the top-1 token is a spelling of the truth.
- ``choice_cov``: probability mass on any answer of the pair's relation (does it answer at all?).

Multi-token answers: the first-token metrics above use the first token of each spelling (so a
multi-token answer is scored, never dropped). :func:`answer_logprob` gives the teacher-forced
log-probability of the *full* answer: ``log sum_spellings prod_j P(t_j | prompt, t_<j)``;
``behaviour(..., full_answer=True)`` adds it (``logp_truth_seq``, ``logp_lie_seq``) and the
full-answer logit difference ``logit_diff_seq = logp_truth_seq - logp_lie_seq``.

Final-position logits have one path: :func:`final_logits` (strings or left-padded batches, under
any hooks), built from :func:`final_resid_hook` (keep the last block's output) and
:func:`logits_from_resid` (``ln_final``, unembedding, and the model's output soft-cap,
:func:`soft_cap`, as Gemma-2 has). The KV runner, the activation collectors, steering and the
learned edits read their logits through the same two helpers, so every number shares the cap.

Summary over pairs (the research notes' metrics):

- ``balance``: share of honest prompts among all prompts scored (0.5 for pairs).
- ``acc``: top-1 accuracy under the honest framing; ``lie_acc``: under the lying framing.
- ``known`` (``n_known``, also named ``n_known_first_token``): facts whose honest prompt's top-1 next
  token is a spelling of the truth (its first token, for a multi-token truth). This is the
  *first-token* definition; :attr:`mechlie.read.labels.OnPolicy.known` is the *greedy-text* one
  (the greedy honest answer starts with the truth), and the two can disagree on a few facts
  (:func:`mechlie.read.labels.known_side_by_side` counts both). ``known_lie_acc`` is ``lie_acc`` on those,
  and ``lie_rate = 1 - known_lie_acc``: the share of known facts the model does not state
  truthfully when told to lie (a lie needs knowledge; see RESEARCH_NOTES).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.utilities.activation_functions import apply_softcap

from mechlie.core.hooks import Hook, hook_name
from mechlie.core.pairs import (
    AnswerSet,
    Batch,
    ContrastPair,
    PairError,
    answer_sequences,
    answer_set,
    prompt_format,
    shared_first_token,
    tokenize,
)

log = logging.getLogger(__name__)

KNOWN_WARN_BELOW = 0.2  # behaviour() warns when a format's known share is under this


def gather_logprob(logprobs: Float[Tensor, "n vocab"], ids: Int[Tensor, "n k"]) -> Float[Tensor, " n"]:
    """log of the probability summed over ``ids`` (``-1`` = padding)."""
    picked = logprobs.gather(-1, ids.clamp(min=0))
    picked = picked.masked_fill(ids < 0, float("-inf"))
    return picked.logsumexp(-1)


@dataclass(frozen=True)
class AnswerScores:
    p_truth: Float[Tensor, " n"]
    logit_diff: Float[Tensor, " n"]
    correct: Bool[Tensor, " n"]
    choice_cov: Float[Tensor, " n"]
    logp_truth_seq: Float[Tensor, " n"] | None = None  # full answer, teacher-forced
    logp_lie_seq: Float[Tensor, " n"] | None = None

    @property
    def logit_diff_seq(self) -> Float[Tensor, " n"] | None:
        if self.logp_truth_seq is None or self.logp_lie_seq is None:
            return None
        return self.logp_truth_seq - self.logp_lie_seq


def score_logits(logits: Float[Tensor, "n vocab"], answers: AnswerSet) -> AnswerScores:
    logits = logits.float()
    lp = logits.log_softmax(-1)
    truth = answers.truth.to(lp.device)
    lt = gather_logprob(lp, truth)
    ll = gather_logprob(lp, answers.lie.to(lp.device))
    top = logits.argmax(-1, keepdim=True)
    return AnswerScores(
        p_truth=lt.exp(),
        logit_diff=lt - ll,
        correct=(truth == top).any(-1),
        choice_cov=gather_logprob(lp, answers.choices.to(lp.device)).exp(),
    )


def soft_cap(model: HookedTransformer, logits: Tensor) -> Tensor:
    """The model's output soft-cap, ``cap * tanh(logits / cap)`` when ``cfg.output_logits_soft_cap > 0``
    (Gemma-2 style), else ``logits`` unchanged: the one place mechlie applies it."""
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def logits_from_resid(model: HookedTransformer, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """What the model does after its last block: ``ln_final`` (if any), the unembedding and the
    soft-cap (:func:`soft_cap`). ``resid`` is ``blocks.{L-1}.hook_resid_post`` (any leading shape)."""
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    return soft_cap(model, unembed(model, resid))


def unembed(model: HookedTransformer, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """``model.unembed(resid)``, the same operation (``F.linear`` on the transposed weight), without its
    per-call copy: equal to it up to a BLAS's rounding (bit-equal on the machines measured).

    TransformerLens's ``Unembed`` runs ``F.linear(resid, W_U.T.contiguous(), b_U)``: it copies the whole
    unembedding on every call (671 MB on Gemma 3's 262k-token vocabulary, 113 MB on SmolLM2), which
    dominated final-position passes (43% of the edge-circuit stage on Gemma). Here the transposed copy is
    made once per weight version and kept on the module. Hooks on ``unembed`` (mechlie places none)
    take TransformerLens's own path. The kept copy is detached: no gradient reaches ``W_U`` through it
    (mechlie never trains model weights; gradients to the residual are unchanged)."""
    u = model.unembed
    if u.hook_in.fwd_hooks or u.hook_out.fwd_hooks:
        return u(resid)
    w = u.W_U
    key = (w._version, w.data_ptr(), w.device, w.dtype)
    kept = u.__dict__.get("_mechlie_w_u_t")
    if kept is None or kept[0] != key:
        with torch.inference_mode(False):  # a normal tensor: later passes may run under autograd
            kept = (key, w.detach().T.contiguous())
        u.__dict__["_mechlie_w_u_t"] = kept
    return F.linear(resid, kept[1], u.b_U)


def final_resid_hook(model: HookedTransformer, kept: list[Tensor], *, every_position: bool = True) -> Hook:
    """A hook on the last block's output that appends it to ``kept`` (every position, or only the
    final one as ``[b, 1, d_model]``); pass what it keeps to :func:`logits_from_resid`. Add it after
    any steering hook on the same point, so that it sees the steered residual. (Hooks on
    ``ln_final`` / ``unembed`` points then run twice per pass: mechlie places none there.)"""

    def keep(act: Tensor, hook) -> None:
        kept.append(act.clone() if every_position else act[:, -1:].clone())

    return (hook_name("resid_post", model.cfg.n_layers - 1), keep)


def _batches(model, prompts: Sequence[str] | Batch | Sequence[Batch], batch_size: int) -> Iterator[Batch]:
    if isinstance(prompts, Batch):
        for i in range(0, prompts.tokens.shape[0], batch_size):
            yield Batch(prompts.tokens[i : i + batch_size], prompts.attention_mask[i : i + batch_size])
    elif len(prompts) and isinstance(prompts[0], Batch):
        yield from prompts  # type: ignore[misc]
    else:
        for i in range(0, len(prompts), batch_size):
            yield tokenize(model, list(prompts[i : i + batch_size]))  # type: ignore[arg-type]


@torch.no_grad()
def final_logits(
    model: HookedTransformer,
    prompts: Sequence[str] | Batch | Sequence[Batch],
    *,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "forward",
    fwd_hooks: Sequence[Hook] = (),
    every_position: bool = True,
) -> Float[Tensor, "n vocab"]:
    """Next-token logits after each prompt's last token, soft-capped like the model's own output:
    the one final-position logits path of mechlie (batched, left-padded).

    Args:
        prompts: strings (tokenized in slices of ``batch_size``), a left-padded :class:`Batch`
            (sliced the same way), or a sequence of Batches (each run as it is).
        fwd_hooks: TransformerLens hooks active during the passes (e.g. a patch); hooks opened
            around this call (``steer()``) apply too.
        every_position: unembed every position, as ``model(tokens)`` does, so that the numbers equal
            ``model(tokens)[:, -1]`` bit for bit; ``False`` unembeds only the final position (cheaper;
            equal up to float rounding).

    Returns:
        float32 logits ``[n, d_vocab]`` on the CPU.
    """
    out = []
    for b in tqdm(_batches(model, prompts, batch_size), desc=desc, disable=not progress, leave=False):
        kept: list[Tensor] = []
        with model.hooks(fwd_hooks=[*fwd_hooks, final_resid_hook(model, kept, every_position=every_position)]):
            model(b.tokens, attention_mask=b.attention_mask, return_type=None)
        out.append(logits_from_resid(model, kept[-1])[:, -1].float().cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class Behaviour:
    honest: AnswerScores
    lying: AnswerScores
    # Indices (into the pairs given to behaviour()) of the scored pairs, when some were left out.
    kept: tuple[int, ...] | None = None

    def subset(self, idx: Tensor) -> "Behaviour":
        def pick(s: AnswerScores) -> AnswerScores:
            seq = [None if t is None else t[idx] for t in (s.logp_truth_seq, s.logp_lie_seq)]
            return AnswerScores(s.p_truth[idx], s.logit_diff[idx], s.correct[idx], s.choice_cov[idx], *seq)

        kept = None if self.kept is None else tuple(torch.tensor(self.kept)[idx].tolist())
        return Behaviour(pick(self.honest), pick(self.lying), kept)

    @property
    def known(self) -> Bool[Tensor, " n"]:
        """Known by the *first-token* definition: the honest prompt's top-1 next token is a spelling
        of the truth (or its first token). Not :attr:`mechlie.read.labels.OnPolicy.known` (greedy text)."""
        return self.honest.correct

    def summary(self) -> dict[str, float | int]:
        h, li, k = self.honest, self.lying, self.known
        n = len(h.p_truth)
        known_lie_acc = li.correct[k].float().mean().item() if k.any() else float("nan")
        return {
            "n": n,
            "n_known": int(k.sum()),
            "n_known_first_token": int(k.sum()),  # the same count, named by its definition
            "p_truth_honest": h.p_truth.mean().item(),
            "p_truth_lying": li.p_truth.mean().item(),
            "logit_diff_honest": h.logit_diff.mean().item(),
            "logit_diff_lying": li.logit_diff.mean().item(),
            "p_truth_honest_known": h.p_truth[k].mean().item() if k.any() else float("nan"),
            "p_truth_lying_known": li.p_truth[k].mean().item() if k.any() else float("nan"),
            "balance": 0.5,
            "acc": h.correct.float().mean().item(),
            "lie_acc": li.correct.float().mean().item(),
            "known_lie_acc": known_lie_acc,
            "lie_rate": 1.0 - known_lie_acc,
            "choice_cov_honest": h.choice_cov.mean().item(),
            "choice_cov_lying": li.choice_cov.mean().item(),
            **(
                {
                    "logit_diff_seq_honest": h.logit_diff_seq.mean().item(),
                    "logit_diff_seq_lying": li.logit_diff_seq.mean().item(),
                }
                if h.logit_diff_seq is not None and li.logit_diff_seq is not None
                else {}
            ),
        }


def behaviour(
    model,
    pairs: Sequence[ContrastPair],
    *,
    batch_size: int = 16,
    progress: bool = True,
    full_answer: bool = False,
    on_shared_first_token: Literal["error", "drop"] = "error",
    warn_known_below: float = KNOWN_WARN_BELOW,
) -> Behaviour:
    """Score honest and lying prompts of ``pairs`` (two batched forward passes per batch).

    Multi-token answers are scored by their first token; with ``full_answer`` also by the
    teacher-forced log-probability of the whole answer (:func:`answer_logprob`, more passes).

    Args:
        on_shared_first_token: a pair whose truth and lie share a first token cannot be scored by
            first tokens: ``"error"`` (default) raises :class:`PairError`; ``"drop"`` leaves such
            pairs out (logged with their fact ids) and the result's ``kept`` lists the scored pairs.
        warn_known_below: log a warning for each prompt format (:func:`mechlie.core.pairs.prompt_format`)
            whose share of known pairs (first-token definition, :attr:`Behaviour.known`) is under it.
    """
    kept = None
    if on_shared_first_token == "drop":
        shared = set(shared_first_token(model.tokenizer, pairs))
        if shared:
            kept = tuple(i for i in range(len(pairs)) if i not in shared)
            log.warning(
                "behaviour: left out %d of %d pairs whose truth and lie share a first token (%s)",
                len(shared),
                len(pairs),
                ", ".join(repr(pairs[i].fact_id) for i in sorted(shared)[:5]) + (", ..." if len(shared) > 5 else ""),
            )
            pairs = [pairs[i] for i in kept]
    elif on_shared_first_token != "error":
        raise PairError(f"on_shared_first_token must be 'error' or 'drop', got {on_shared_first_token!r}")
    answers = answer_set(model.tokenizer, pairs, multi_token="first")
    h = final_logits(model, [p.honest for p in pairs], batch_size=batch_size, progress=progress, desc="honest")
    li = final_logits(model, [p.lying for p in pairs], batch_size=batch_size, progress=progress, desc="lying")
    hs, ls = score_logits(h, answers), score_logits(li, answers)
    if full_answer:
        if any(p.lie is None for p in pairs):
            raise PairError("full-answer scores need a lie answer for every pair")
        seq = {}
        for side in ("honest", "lying"):
            prompts = [getattr(p, side) for p in pairs]
            seq[side] = (
                answer_logprob(model, prompts, [p.truth for p in pairs], batch_size=batch_size),
                answer_logprob(model, prompts, [p.lie for p in pairs], batch_size=batch_size),
            )
        hs = AnswerScores(hs.p_truth, hs.logit_diff, hs.correct, hs.choice_cov, *seq["honest"])
        ls = AnswerScores(ls.p_truth, ls.logit_diff, ls.correct, ls.choice_cov, *seq["lying"])
    warn_few_known(pairs, hs.correct, warn_known_below)
    return Behaviour(hs, ls, kept)


def warn_few_known(pairs: Sequence[ContrastPair], known: Bool[Tensor, " n"], below: float = KNOWN_WARN_BELOW) -> None:
    """Log a warning for each prompt format whose share of known pairs is under ``below``: its
    known-only metrics (``lie_rate``, ``p_truth_*_known``) then rest on few facts."""
    by_fmt: dict[str, list[bool]] = {}
    for p, k in zip(pairs, known.tolist()):
        by_fmt.setdefault(prompt_format(p), []).append(bool(k))
    for fmt, ks in by_fmt.items():
        share = sum(ks) / len(ks)
        if share < below:
            log.warning(
                "format %r: %d of %d pairs known (share %.3f, under %.2f; known = the honest prompt's top-1 "
                "first token is the truth): its known-only metrics rest on few facts",
                fmt,
                sum(ks),
                len(ks),
                share,
                below,
            )


@torch.no_grad()
def answer_logprob(
    model: HookedTransformer, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 16
) -> Float[Tensor, " n"]:
    """Teacher-forced ``log P(answer | prompt)`` of the full answer, summed over its spellings.

    Each spelling (``" X"`` and ``"X"``, :func:`mechlie.core.pairs.answer_sequences`) is appended to
    the prompt's tokens; its log-probability is the sum over its tokens of the log-probability
    of that token given the prompt and the answer's earlier tokens. Spellings are combined with
    ``logsumexp`` (the probability of saying the answer either way).

    Example:
        >>> answer_logprob(model, ["Q: What is the capital of the USA?\nA:"], ["Washington"])
    """
    if len(prompts) != len(answers):
        raise PairError(f"{len(prompts)} prompts but {len(answers)} answers")
    rows: list[tuple[int, list[int], int]] = []  # (prompt index, token ids, answer length)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        b = tokenize(model, [p])
        prompt_ids = b.tokens[0].tolist()
        for seq in answer_sequences(model.tokenizer, a):
            rows.append((i, prompt_ids + seq, len(seq)))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    logps = torch.full((len(rows),), float("nan"))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r[1]) for r in chunk)
        if width > model.cfg.n_ctx:
            raise PairError(f"prompt + answer ({width} tokens) exceeds the model context ({model.cfg.n_ctx})")
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for j, (_, ids, _) in enumerate(chunk):
            tokens[j, width - len(ids) :] = torch.tensor(ids)
            mask[j, width - len(ids) :] = 1
        batch = Batch(tokens.to(model.cfg.device), mask.to(model.cfg.device))
        lp = model(batch.tokens, attention_mask=batch.attention_mask).float().log_softmax(-1).cpu()
        for j, (_, _ids, k) in enumerate(chunk):
            # Position width-1-k+t predicts answer token t, which sits at width-k+t.
            pos = torch.arange(width - 1 - k, width - 1)
            logps[start + j] = lp[j, pos, tokens[j, pos + 1]].sum()
    out = torch.full((len(prompts),), float("-inf"))
    for i in range(len(prompts)):
        mine = torch.tensor([logps[r] for r, row in enumerate(rows) if row[0] == i])
        out[i] = mine.logsumexp(0)
    return out
