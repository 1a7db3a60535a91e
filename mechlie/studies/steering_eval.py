"""Effects of steering on lying, and its side effects, with a train / validation / test split,
controls from many random draws, and 95% CIs.

The data (:mod:`mechlie.studies.steering_data`): pairs split by fact into train / validation / test
(no fact on two sides); directions and learned edits (:mod:`mechlie.control.edits`) fitted on the
training facts. The methods (:mod:`mechlie.studies.steering_methods`): a setting ``(kind, layer,
alpha, param)`` builds an intervention or its random control. Here: every hyperparameter (layer,
alpha, K heads, an edit's penalty) is chosen on the validation facts (:func:`sweep` + :func:`choose`
see only ``data.val``); every reported number is measured on the test facts (:func:`evaluate`). The
neutral text is split by line the same way: a learned edit's KL penalty uses the training lines,
sweeps the validation lines, reports the test lines.

Effects of one setting on an evaluation set (:func:`evaluate`), each with a 95% bootstrap CI:

- ``recovered``: on the *lying* prompts, the share of the honest-lying P(truth) gap closed,
  ``(mean p_steered - mean p_lying) / (mean p_honest - mean p_lying)``; resampled over facts.
- ``lie_rate``: among known facts (top-1 correct when honest), the share whose lying prompt's
  top-1 is not the truth, before and after steering.
- ``induced``: on the *honest* prompts, the same setting with alpha's sign flipped (toward lying).
- ``honest_acc``: top-1 accuracy on honest prompts under the honesty-ward setting.
- ``kl`` and ``delta_ce``: on neutral text (``mechlie/data/neutral.txt``), the token-weighted mean of
  ``KL(p_clean || p_steered)`` per next-token distribution and the change in next-token
  cross-entropy; the CI resamples *lines* (tokens of a line are not independent).
- ``control``: ``n_controls`` random draws of the same size (:func:`controls`), reported as the
  distribution of their effects (mean and 2.5-97.5% quantiles over draws) and the share of draws that
  recover at least as much as the real setting.

The names of the data and methods modules are re-exported here (``se.prepare``, ``se.Setting``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.control.steering import Intervention, random_like
from mechlie.core.metrics import AnswerScores, score_logits
from mechlie.core.pairs import answer_set
from mechlie.core.stats import Estimate, bootstrap, normalized_effect
from mechlie.studies.steering_data import (
    SCORINGS,
    EvalSet,
    NeutralEffects,
    Split3,
    SteeringData,
    attach_causal_heads,
    attach_function_vector,
    batches,
    eval_set,
    gap_fraction,
    last_logits,
    neutral_effects,
    neutral_lines,
    prepare,
    reference_directions,
    score,
    score_prompts,
    split_lines,
    split_three,
    token_logprobs,
)
from mechlie.studies.steering_methods import KINDS, Kind, Method, Setting, intervention, method, register_kind


def spread(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Distribution of a control over its random draws: mean and the central ``level`` quantiles."""
    v = torch.tensor([float(x) for x in values])
    v = v[torch.isfinite(v)]
    if len(v) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    q = (1 - level) / 2
    lo, hi = torch.quantile(v, torch.tensor([q, 1 - q])).tolist()
    return Estimate(float(v.mean()), lo, hi, len(v))


# ---------------------------------------------------------------------------------------------
# sweep on validation, choice, evaluation on test


@dataclass(frozen=True)
class SweepPoint:
    setting: Setting
    split: str  # which evaluation set it was measured on ("val" for choosing)
    p_truth: float  # mean P(truth) on that set's lying prompts, steered
    recovered: float  # share of the honest-lying P(truth) gap closed
    kl: float  # token-weighted mean KL on that set's neutral lines

    @property
    def kind(self) -> str:
        return self.setting.kind

    @property
    def layer(self) -> int:
        return self.setting.layer

    @property
    def alpha(self) -> float:
        return self.setting.alpha


def _recovered(s: AnswerScores, es: EvalSet) -> float:
    return float(normalized_effect(s.p_truth.mean(), es.base_lying.p_truth.mean(), es.base_honest.p_truth.mean()))


def measure(model: HookedTransformer, es: EvalSet, iv: Intervention) -> tuple[AnswerScores, NeutralEffects]:
    """Lying prompts' scores and neutral-text effects of one intervention on one evaluation set."""
    return score(model, es, "lying", [iv]), neutral_effects(model, es.neutral, es.clean_neutral, [iv])


def sweep(
    model: HookedTransformer, data: SteeringData, settings: Sequence[Setting], *, on: str = "val", progress: bool = True
) -> list[SweepPoint]:
    """Score each setting on ``data.val`` (default): the grid hyperparameters are chosen from.

    Only the validation set is read (``on="test"`` exists for figures of the whole grid on test,
    never for choosing).
    """
    es = {"val": data.val, "test": data.test}[on]
    out = []
    for s in tqdm(settings, desc=f"sweep ({on})", disable=not progress):
        scores, ne = measure(model, es, intervention(model, data, s))
        out.append(SweepPoint(s, es.name, float(scores.p_truth.mean()), _recovered(scores, es), ne.kl))
    return out


def pareto(points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """Points not beaten by another with lower (or equal) KL and more recovery."""
    best, out = -float("inf"), []
    for p in sorted(points, key=lambda p: (p.kl, -p.recovered)):
        if p.recovered > best:
            out.append(p)
            best = p.recovered
    return out


def choose(points: Sequence[SweepPoint], kl_budget: float = 0.1) -> SweepPoint:
    """Most recovery within the KL budget; if none fits, the lowest-KL point. Validation points only."""
    if not points:
        raise ValueError("no sweep points to choose from")
    if any(p.split != "val" for p in points):
        raise ValueError("hyperparameters are chosen on validation points only")
    ok = [p for p in points if p.kl <= kl_budget]
    return max(ok, key=lambda p: p.recovered) if ok else min(points, key=lambda p: p.kl)


def controls(
    model: HookedTransformer,
    data: SteeringData,
    setting: Setting,
    es: EvalSet,
    *,
    n_draws: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """``n_draws`` random interventions of the same size: their effects' distribution over draws."""
    rec, kl, lie = [], [], []
    known = es.base_honest.correct
    for j in tqdm(range(n_draws), desc="controls", disable=not progress):
        scores, ne = measure(model, es, intervention(model, data, setting, control_seed=seed + 1000 * j + 1))
        rec.append(_recovered(scores, es))
        kl.append(ne.kl)
        lie.append(float(1 - scores.correct[known].float().mean()) if known.any() else float("nan"))
    return {
        "n_draws": n_draws,
        "recovered": spread(rec),
        "kl": spread(kl),
        "lie_rate": spread(lie),
        "recovered_draws": rec,
        "kl_draws": kl,
    }


def evaluate(
    model: HookedTransformer,
    data: SteeringData,
    setting: Setting,
    *,
    on: str = "test",
    n_controls: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Every effect of one setting on the test facts and test neutral lines, with 95% CIs, and its
    random control from ``n_controls`` draws.

    Args:
        setting: the (validation-chosen) setting; ``alpha < 0`` steers toward honesty.
        on: ``"test"`` (reported numbers) or the name of a transfer set in ``data.extra``.

    Returns:
        dict of :class:`Estimate` (and the control's distribution under ``"control"``).
    """
    es = data.test if on == "test" else data.extra[on]
    iv = intervention(model, data, setting)
    hp, lp = es.base_honest.p_truth, es.base_lying.p_truth
    n = len(hp)
    known = es.base_honest.correct
    lying_s, ne = measure(model, es, iv)
    honest_s = score(model, es, "honest", [iv])
    b = lambda stat, m=n: bootstrap(stat, m, n_boot=n_boot, seed=seed)
    lie = lambda s: lambda i: 1 - s.correct[i][known[i]].float().mean()
    res = {
        "setting": setting,
        "on": es.name,
        "n_facts": n,
        "n_known": int(known.sum()),
        "n_neutral_lines": len(ne.kl_sum),
        "n_neutral_tokens": int(ne.kl_tokens.sum()),
        "p_truth_lying_steered": b(lambda i: lying_s.p_truth[i].mean()),
        "recovered": b(gap_fraction(lying_s.p_truth, lp, hp)),
        "lie_rate_before": b(lie(es.base_lying)),
        "lie_rate_steered": b(lie(lying_s)),
        "honest_acc_before": b(lambda i: es.base_honest.correct[i].float().mean()),
        "honest_acc_steered": b(lambda i: honest_s.correct[i].float().mean()),
        "kl": b(ne.kl_stat(), len(ne.kl_sum)),
        "delta_ce": b(ne.dce_stat(), len(ne.dce_sum)),
    }
    if setting.kind != "ablation":
        induced = score(model, es, "honest", [intervention(model, data, setting.flipped())])
        res["p_truth_honest_induced"] = b(lambda i: induced.p_truth[i].mean())
        res["induced"] = b(gap_fraction(induced.p_truth, lp, hp, toward_hi=False))
        res["lie_rate_induced"] = b(lie(induced))
    if n_controls > 0:
        c = controls(model, data, setting, es, n_draws=n_controls, seed=seed)
        c["share_recovering_at_least_real"] = sum(r >= res["recovered"].mean for r in c["recovered_draws"]) / n_controls
        res["control"] = c
    return res


def baseline_summary(es: EvalSet, n_boot: int = 1000, seed: int = 0) -> dict:
    h, l = es.base_honest, es.base_lying
    n, known = len(h.p_truth), h.correct
    return {
        "set": es.name,
        "n_facts": len({p.fact_id for p in es.pairs}),
        "n_pairs": n,
        "n_known": int(known.sum()),
        "p_truth_honest": bootstrap(lambda i: h.p_truth[i].mean(), n, n_boot=n_boot, seed=seed),
        "p_truth_lying": bootstrap(lambda i: l.p_truth[i].mean(), n, n_boot=n_boot, seed=seed),
        "honest_acc": bootstrap(lambda i: h.correct[i].float().mean(), n, n_boot=n_boot, seed=seed),
        "lie_rate": bootstrap(lambda i: 1 - l.correct[i][known[i]].float().mean(), n, n_boot=n_boot, seed=seed),
    }


def lying_rows(es: EvalSet) -> list[int]:
    """Rows where the model actually lies: top-1 truth when honest, top-1 not the truth when lying."""
    return [i for i in range(len(es.pairs)) if bool(es.base_honest.correct[i]) and not bool(es.base_lying.correct[i])]


__all__ = [
    "EvalSet",
    "Estimate",
    "Kind",
    "KINDS",
    "Method",
    "NeutralEffects",
    "Setting",
    "Split3",
    "SCORINGS",
    "SteeringData",
    "SweepPoint",
    "answer_set",
    "attach_causal_heads",
    "attach_function_vector",
    "baseline_summary",
    "batches",
    "bootstrap",
    "choose",
    "controls",
    "eval_set",
    "evaluate",
    "gap_fraction",
    "intervention",
    "last_logits",
    "lying_rows",
    "measure",
    "method",
    "neutral_effects",
    "neutral_lines",
    "pareto",
    "prepare",
    "random_like",
    "reference_directions",
    "register_kind",
    "score",
    "score_logits",
    "score_prompts",
    "split_lines",
    "split_three",
    "spread",
    "sweep",
    "token_logprobs",
]
