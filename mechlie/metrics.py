"""Behaviour at the answer position: P(truth), logit difference, lie rate and the summary metrics.

Definitions (per prompt, from the next-token distribution after the final prompt token):

- ``p_truth``: probability summed over the truth's single-token spellings (" Paris", "Paris").
- ``logit_diff``: ``log P(truth) - log P(lie)`` with both summed over spellings; with one
  spelling each this is exactly ``logit(truth) - logit(lie)``.
- ``correct``: the top-1 token is a spelling of the truth.
- ``choice_cov``: probability mass on any answer of the pair's relation (does it answer at all?).

Summary over pairs (the research notes' metrics):

- ``balance``: share of honest prompts among all prompts scored (0.5 for pairs).
- ``acc``: top-1 accuracy under the honest framing; ``lie_acc``: under the lying framing.
- ``known``: facts answered correctly when honest. ``known_lie_acc`` is ``lie_acc`` on those,
  and ``lie_rate = 1 - known_lie_acc``: the share of known facts the model does not state
  truthfully when told to lie (a lie needs knowledge; see RESEARCH_NOTES).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechlie.pairs import AnswerSet, ContrastPair, answer_set, tokenize


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


@torch.no_grad()
def final_logits(
    model, prompts: Sequence[str], *, batch_size: int = 16, progress: bool = False, desc: str = "forward"
) -> Float[Tensor, "n vocab"]:
    """Next-token logits after each prompt's last token (batched, left-padded)."""
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        b = tokenize(model, prompts[i : i + batch_size])
        out.append(model(b.tokens, attention_mask=b.attention_mask)[:, -1].float().cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class Behaviour:
    honest: AnswerScores
    lying: AnswerScores

    def subset(self, idx: Tensor) -> "Behaviour":
        def pick(s: AnswerScores) -> AnswerScores:
            return AnswerScores(s.p_truth[idx], s.logit_diff[idx], s.correct[idx], s.choice_cov[idx])

        return Behaviour(pick(self.honest), pick(self.lying))

    @property
    def known(self) -> Bool[Tensor, " n"]:
        return self.honest.correct

    def summary(self) -> dict[str, float]:
        h, li, k = self.honest, self.lying, self.known
        n = len(h.p_truth)
        known_lie_acc = li.correct[k].float().mean().item() if k.any() else float("nan")
        return {
            "n": n,
            "n_known": int(k.sum()),
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
        }


def behaviour(
    model, pairs: Sequence[ContrastPair], *, batch_size: int = 16, progress: bool = True
) -> Behaviour:
    """Score honest and lying prompts of ``pairs`` (two batched forward passes per batch)."""
    answers = answer_set(model.tokenizer, pairs)
    h = final_logits(model, [p.honest for p in pairs], batch_size=batch_size, progress=progress, desc="honest")
    li = final_logits(model, [p.lying for p in pairs], batch_size=batch_size, progress=progress, desc="lying")
    return Behaviour(score_logits(h, answers), score_logits(li, answers))

