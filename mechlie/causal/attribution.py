"""Attribution patching: a first-order estimate of every activation patch from 2 forwards + 1 backward.

For an activation ``a`` (clean = honest run, corrupt = lying run, as in :mod:`mechlie.causal.patching`),
the effect of patching ``a_clean`` into the corrupt run on a metric ``M`` is estimated by

    ``M(patched) - M(corrupt)  ~=  (a_clean - a_corrupt) . dM/da |_corrupt``

(Nanda 2023, "Attribution patching"). One clean forward pass (no gradient), one corrupt forward
pass and one backward pass give the estimate for every head's ``hook_z`` at every position and for
the residual stream (``resid_pre`` by default) at every layer and position at once.

``M`` is the per-pair metric at the final position (``logit_diff`` by default, or ``p_truth``);
the backward pass takes the gradient of its sum over the batch, which is each pair's own gradient
because pairs do not interact. Estimates are averaged over pairs, as in
:meth:`mechlie.causal.patching.PatchResult.effect` before normalization.

Positions are aligned **from the end**: honest and lying prompts are tokenized together into one
left-padded batch, so column ``j`` is the same offset ``j - width`` from the final token in both.
Where either prompt has padding at a column, the estimate is 0 and ``valid`` is False. (For the
built-in few-shot format, honest and lying prompts have the same length, so nothing is lost.)

The estimate is exact when ``M`` is linear in the patched activation, e.g. ``hook_z`` of the last
layer in a model without a final layer norm (see tests); elsewhere its quality is measured by the
rank correlation with exact patching (:func:`mechlie.core.stats.spearman`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from mechlie.core.hooks import hook_name
from mechlie.core.metrics import gather_logprob
from mechlie.core.pairs import AnswerSet, Batch, ContrastPair, PairError, answer_set, tokenize
from mechlie.core.stats import spearman  # noqa: F401  (re-exported: rank correlation with exact patching)

RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")


def answer_metric(logits: Float[Tensor, "n vocab"], answers: AnswerSet, metric: str) -> Float[Tensor, " n"]:
    """Differentiable per-prompt metric from final-position logits (as in ``score_logits``)."""
    lp = logits.float().log_softmax(-1)
    lt = gather_logprob(lp, answers.truth.to(lp.device))
    if metric == "p_truth":
        return lt.exp()
    if metric == "logit_diff":
        return lt - gather_logprob(lp, answers.lie.to(lp.device))
    raise ValueError(f"unknown metric {metric!r}; use 'logit_diff' or 'p_truth'")


@dataclass(frozen=True)
class Attribution:
    """Estimated change of ``metric`` (patched - corrupt), per pair, for every patch."""

    z: Float[Tensor, "n pos layer head"]  # hook_z of one head at one position
    resid: Float[Tensor, "n pos layer"]  # the residual (``resid_kind``) at one position
    valid: Bool[Tensor, "n pos"]  # both prompts have a real token at this column
    clean_metric: Float[Tensor, " n"]
    corrupt_metric: Float[Tensor, " n"]
    metric: str
    resid_kind: str

    @property
    def z_final(self) -> Float[Tensor, "layer head"]:
        """Mean over pairs at the final position: the estimate of ``patch_final_position(z)``."""
        return self.z[:, -1].mean(0)

    def normalized(self, x: Tensor) -> Tensor:
        """In units of the honest-lying gap (0 = lying, 1 = honest), like ``PatchResult.effect``."""
        return x / (self.clean_metric.mean() - self.corrupt_metric.mean())


def _capture(model, kinds: Sequence[str], store: dict, *, grad: bool) -> list:
    def saver(kind: str, layer: int):
        def hook(act, hook):
            store[(kind, layer)] = act if grad else act.detach()

        return hook

    return [(hook_name(k, l), saver(k, l)) for k in kinds for l in range(model.cfg.n_layers)]


def attribution_patching(
    model,
    clean: Batch,
    corrupt: Batch,
    answers: AnswerSet,
    *,
    metric: Literal["logit_diff", "p_truth"] = "logit_diff",
    resid_kind: str = "resid_pre",
) -> Attribution:
    """Estimates for one batch whose clean and corrupt rows are aligned column by column."""
    if clean.tokens.shape != corrupt.tokens.shape:
        raise PairError(
            f"clean {tuple(clean.tokens.shape)} and corrupt {tuple(corrupt.tokens.shape)} batches must be "
            "tokenized together so that columns align from the end"
        )
    if resid_kind not in RESID_KINDS:
        raise ValueError(f"resid_kind must be one of {RESID_KINDS}")
    kinds = ("z", resid_kind)
    L = model.cfg.n_layers
    cl: dict = {}
    with torch.no_grad(), model.hooks(fwd_hooks=_capture(model, kinds, cl, grad=False)):
        clean_logits = model(clean.tokens, attention_mask=clean.attention_mask)[:, -1]
    co: dict = {}
    with torch.enable_grad(), model.hooks(fwd_hooks=_capture(model, kinds, co, grad=True)):
        corrupt_logits = model(corrupt.tokens, attention_mask=corrupt.attention_mask)[:, -1]
        m = answer_metric(corrupt_logits, answers, metric)
        keys = [(k, l) for k in kinds for l in range(L)]
        # Gradients only for the captured activations, not for the weights.
        grads = torch.autograd.grad(m.sum(), [co[key] for key in keys], allow_unused=True)
    g = {key: (gr if gr is not None else torch.zeros_like(co[key])) for key, gr in zip(keys, grads)}
    valid = (clean.attention_mask > 0) & (corrupt.attention_mask > 0)

    def est(kind: str, layer: int) -> Tensor:
        key = (kind, layer)
        return ((cl[key] - co[key].detach()) * g[key]).sum(-1).float().cpu()

    z = torch.stack([est("z", l) for l in range(L)], dim=2)  # [n, pos, L, H]
    resid = torch.stack([est(resid_kind, l) for l in range(L)], dim=2)  # [n, pos, L]
    vmask = valid.cpu()
    z = z * vmask[:, :, None, None]
    resid = resid * vmask[:, :, None]
    with torch.no_grad():
        clean_m = answer_metric(clean_logits, answers, metric).cpu()
    return Attribution(z, resid, vmask, clean_m, m.detach().cpu(), metric, resid_kind)


def attribute_pairs(
    model,
    pairs: Sequence[ContrastPair],
    *,
    metric: Literal["logit_diff", "p_truth"] = "logit_diff",
    resid_kind: str = "resid_pre",
    batch_size: int = 8,
    progress: bool = True,
) -> Attribution:
    """:func:`attribution_patching` over ``pairs`` (honest = clean, lying = corrupt), in batches.

    All prompts are tokenized together so every batch has the same width and the position axis
    (offsets from the end) lines up across batches.
    """
    if not pairs:
        raise PairError("no pairs to attribute")
    n = len(pairs)
    b = tokenize(model, [p.honest for p in pairs] + [p.lying for p in pairs])
    answers = answer_set(model.tokenizer, pairs)
    parts = []
    for s in tqdm(range(0, n, batch_size), desc="attribution", disable=not progress, leave=False):
        idx = slice(s, min(n, s + batch_size))
        cidx = slice(n + s, n + min(n, s + batch_size))
        sub = AnswerSet(answers.truth[idx], answers.lie[idx], answers.choices[idx])
        parts.append(
            attribution_patching(
                model,
                Batch(b.tokens[idx], b.attention_mask[idx]),
                Batch(b.tokens[cidx], b.attention_mask[cidx]),
                sub,
                metric=metric,
                resid_kind=resid_kind,
            )
        )
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return Attribution(
        cat("z"), cat("resid"), cat("valid"), cat("clean_metric"), cat("corrupt_metric"), metric, resid_kind
    )
