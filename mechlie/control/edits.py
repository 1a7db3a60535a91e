"""Learned minimal edits: steering vectors and low-rank adapters trained by gradient to undo lying
while keeping the model's behaviour on neutral text (an "adapter as probe").

Three edits, each a :class:`mechlie.core.hooks.Intervention` applied with
:func:`mechlie.core.hooks.steer` (defined in :mod:`mechlie.control.learned`; trained by
:mod:`mechlie.control.edit_training`; this module gathers both under one name):

- :class:`LearnedVector`: a vector ``v_l`` per chosen layer, added at ``blocks.l.hook_resid_post``
  as ``x += alpha * v_l`` (all positions).
- :class:`LowRankEdit`: a rank-``r`` affine edit of one component's output ``y`` (``attn_out``,
  ``mlp_out`` or ``resid_post`` of block ``l``): ``y += -alpha * (y @ A + c) @ B``, with
  ``A: [d_model, r]``, ``c: [r]``, ``B: [r, d_model]``. It can only write inside the ``r``-dim row
  space of ``B``; its principal write direction is compared with the difference-of-means direction
  (:func:`alignment`): a learned probe.
- :class:`GatedVector`: a vector added where a learned linear gate fires, at
  ``blocks.l.hook_resid_post``: ``x += alpha * sigmoid(u @ w + b) * v`` with ``u = x / rms(x)``
  (the model's own RMS scale, so the gate reads a direction, not a norm). The edit is conditional:
  trained with the KL penalty, the gate learns to stay shut on neutral text and open on lying
  prompts, which a constant vector cannot do (conditional activation steering, Lee et al. 2024).
  ``w`` is itself a learned lie detector at that layer; ``v`` is the write.

Sign convention (as in :mod:`mechlie.control.steering`): a stored edit points honest -> lying, and
``alpha = -1`` is the edit as trained, toward honesty (``alpha = +1`` pushes toward lying). So a
learned vector's ``v_l`` is the *negated* trained shift, and its cosine with a diff-of-means
direction is positive when they agree.

Training (:func:`train_vector`, :func:`train_lowrank`, :func:`train_gated`), on training facts only: minimise

    L = mean_i -log P(truth_i | lying prompt_i, edit)  +  lam * KL_neutral

where ``P(truth)`` sums the truth's single-token spellings at the final prompt position (the
quantity the evaluation reports), and ``KL_neutral`` is the token-weighted mean of
``KL(p_clean || p_edited)`` over the training neutral lines. With ``kl_budget`` set this becomes a
constrained problem (KL <= budget), solved by dual ascent on ``lam`` (multiplicative updates) and a
final projection: the trained edit is scaled down by bisection until KL on the training neutral
lines is within the budget, so the budget always holds on the training batch.

The seeds for this idea: "use LoRA as a probe", an adapter that changes the internal representation
minimally while keeping coherence (KL on neutral text). Related: Representation Finetuning (Wu et
al. 2024, ReFT: low-rank interventions on hidden states); steering vectors (Turner et al. 2023;
Rimsky et al. 2024); "Refusal is mediated by a single direction" (Arditi et al. 2024).
"""

from __future__ import annotations

from mechlie.control import edit_training, learned
from mechlie.control.edit_training import TrainConfig, gate_opening, train_gated, train_lowrank, train_vector  # noqa: F401
from mechlie.control.learned import (  # noqa: F401  (re-exported: the edits and their saving)
    COMPONENTS,
    Component,
    Edit,
    GatedVector,
    LearnedVector,
    LowRankEdit,
    alignment,
    check_trained_for,
    load_edit,
    row_alignment,
    save_edit,
    soft_gate,
)

__all__ = sorted(learned.__all__ + edit_training.__all__)
