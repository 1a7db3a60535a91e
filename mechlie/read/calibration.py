"""Thresholds from control scores: calibrate at a false-positive rate, check it on held-out controls,
and Apollo's recall at 1% FPR with confidence intervals.

A control is a row that is *not* a lie: an honest answer, a response to a benign request, or a
window of neutral text (:func:`neutral_windows`). Every CI here resamples independent units (a
fact, a control request, a neutral line), never rows: rows of one unit are correlated.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechlie.core.pairs import neutral_lines
from mechlie.core.stats import Estimate, auroc
from mechlie.read.transfer import DetectorError

log = logging.getLogger(__name__)


def calibrate_threshold(control: Float[Tensor, " n"], fpr: float) -> float:
    """The score above which a share ``fpr`` of the controls lie (their ``1 - fpr`` quantile, the
    next higher control score): at most ``fpr`` of the controls, and at least ``fpr - 1/n``, score above."""
    if not 0 < fpr < 1:
        raise DetectorError(f"fpr must be in (0, 1), got {fpr}")
    control = control[torch.isfinite(control)]
    if len(control) < 2:
        raise DetectorError("need at least 2 control scores to calibrate a threshold")
    if fpr * len(control) < 1:
        log.warning("%d controls cannot resolve an FPR of %g: the threshold is their maximum", len(control), fpr)
    return float(torch.quantile(control.double(), 1 - fpr, interpolation="higher"))


def neutral_windows(min_words: int = 4, step: int = 3) -> tuple[list[str], list[str]]:
    """Control texts: prefixes of every neutral line (:func:`mechlie.core.pairs.neutral_lines`) cut at word
    boundaries (``min_words``, ``min_words + step``, ..., and the whole line), with the line each
    came from (the independent unit: windows of one line are correlated).

    The state at a window's last token is the state from which the next word is chosen, as a
    generated answer token's is, so every window is a control for prompt- and answer-site probes.
    """
    texts, units = [], []
    for i, line in enumerate(neutral_lines()):
        words = line.split()
        cuts = list(range(min(min_words, len(words)), len(words), step)) + [len(words)]
        for c in sorted(set(cuts)):
            texts.append(" ".join(words[:c]))
            units.append(f"neutral/{i}")
    return texts, units


def _groups(units: Sequence[str]) -> list[Tensor]:
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault(u, []).append(i)
    return [torch.tensor(g) for g in groups.values()]


@dataclass(frozen=True)
class HeldOutCalibration:
    """A threshold calibrated on half the controls, checked on the other half (split by unit)."""

    threshold: float
    fpr: float  # target
    n_calibration: int  # control rows used to set the threshold
    n_held_out: int
    held_out_fpr: Estimate  # share of held-out controls flagged (95% CI over control units)
    recall: dict  # name -> Estimate: share of lies flagged (95% CI over their facts)


def held_out_calibration(
    control: Float[Tensor, " n"],
    control_units: Sequence[str],
    lies: dict[str, tuple[Tensor, Sequence[str]]],
    fpr: float,
    *,
    calibration_frac: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> HeldOutCalibration:
    """Calibrate a threshold at ``fpr`` on a split of the controls, then report the realised FPR on
    the held-out controls and the recall on each set of lies, all with 95% bootstrap CIs over
    independent units (control lines/facts; the lies' facts).

    Args:
        control: scores of control rows (not lies: honest prompts, neutral text).
        control_units: the unit of each control row (rows of one unit go to the same half).
        lies: name -> (scores of lie rows, their facts).
        fpr: target false-positive rate; ``fpr * n_calibration`` should be >= 1 (logged if not).

    Example:
        >>> cal = held_out_calibration(c_scores, c_units, {"test lies": (l_scores, l_facts)}, 0.01)
        >>> cal.held_out_fpr.mean, cal.recall["test lies"].mean
    """
    from mechlie.core.stats import bootstrap
    from mechlie.read.directions import split_by_fact

    if len(control) != len(control_units):
        raise DetectorError(f"{len(control)} control scores but {len(control_units)} units")
    sp = split_by_fact(list(control_units), 1 - calibration_frac, seed)
    cal, held = control[sp.train], control[sp.test]
    thr = calibrate_threshold(cal, fpr)

    def share_flagged(scores: Tensor, units: Sequence[str], s: int) -> Estimate:
        idx = _groups(units)
        flags = (scores > thr).float()

        def stat(b: Tensor) -> float:
            rows = torch.cat([idx[i] for i in b.tolist()])
            return float(flags[rows].mean())

        return bootstrap(stat, len(idx), n_boot=n_boot, seed=s, method="percentile")

    held_units = [control_units[i] for i in sp.test]
    recall = {
        name: share_flagged(sc, facts, seed + 1 + j) for j, (name, (sc, facts)) in enumerate(lies.items()) if len(sc)
    }
    return HeldOutCalibration(thr, fpr, len(cal), len(held), share_flagged(held, held_units, seed), recall)


@dataclass(frozen=True)
class ControlRecall:
    """Recall at a control FPR and AUROC of lies vs controls, each with a 95% CI (:func:`recall_at_fpr`)."""

    fpr: float  # target
    threshold: float  # the controls' 1 - fpr quantile (all controls)
    control_fpr: float  # realised on those controls (in sample: between fpr - 1/n and fpr)
    recall: Estimate  # share of lies above the threshold
    auroc: Estimate  # lies vs controls
    n_lies: int
    n_controls: int

    def to_dict(self) -> dict:
        return {**asdict(self), "recall": self.recall.to_dict(), "auroc": self.auroc.to_dict()}


def recall_at_fpr(
    lies: Float[Tensor, " a"],
    lie_units: Sequence[str],
    control: Float[Tensor, " b"],
    control_units: Sequence[str],
    fpr: float = 0.01,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> ControlRecall:
    """Apollo's figure: the threshold is the controls' ``1 - fpr`` quantile; recall is the share of lies
    above it. The 95% CIs (percentile) resample the lies' units (facts) and the controls' units
    independently and recompute the threshold in every draw, so they include the threshold's own
    noise. Non-finite scores (no state at the position) are left out and counted in the log.

    Example:
        >>> r = recall_at_fpr(lie_scores, lie_facts, control_scores, control_units, 0.01)
        >>> f"recall at 1% FPR: {r.recall:.2f}"
    """
    if len(lies) != len(lie_units) or len(control) != len(control_units):
        raise DetectorError("recall_at_fpr: every score needs a unit")
    fin_l, fin_c = torch.isfinite(lies), torch.isfinite(control)
    if (~fin_l).any() or (~fin_c).any():
        log.info("recall_at_fpr: left out %d lie and %d control rows without a score", (~fin_l).sum(), (~fin_c).sum())
    lies, control = lies[fin_l].double(), control[fin_c].double()
    lie_units = [u for u, f in zip(lie_units, fin_l.tolist()) if f]
    control_units = [u for u, f in zip(control_units, fin_c.tolist()) if f]
    if len(lies) == 0:
        raise DetectorError("recall_at_fpr: no lie scores")
    thr = calibrate_threshold(control, fpr)
    gl, gc = _groups(lie_units), _groups(control_units)
    g = torch.Generator().manual_seed(seed)
    draws = torch.empty(n_boot, 2, dtype=torch.float64)
    for b in range(n_boot):
        li = torch.cat([gl[i] for i in torch.randint(0, len(gl), (len(gl),), generator=g).tolist()])
        ci = torch.cat([gc[i] for i in torch.randint(0, len(gc), (len(gc),), generator=g).tolist()])
        t = torch.quantile(control[ci], 1 - fpr, interpolation="higher")
        draws[b, 0] = (lies[li] > t).double().mean()
        draws[b, 1] = auroc(lies[li], control[ci])
    lo, hi = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)

    def est(j: int, full: float, n: int) -> Estimate:
        return Estimate(full, float(lo[j]), float(hi[j]), n)

    return ControlRecall(
        fpr=fpr,
        threshold=thr,
        control_fpr=float((control > thr).double().mean()),
        recall=est(0, float((lies > thr).double().mean()), len(gl)),
        auroc=est(1, float(auroc(lies, control)), len(gl)),
        n_lies=len(lies),
        n_controls=len(control),
    )
