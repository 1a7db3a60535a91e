"""Does a probe generalise? Train it on one labelled set, test it on another, with controls.

A :class:`LabelledSet` holds features at every layer, labels (1 = lie) and the fact of each row;
:func:`evaluate_transfer` trains a probe kind on one set and scores it on others (held-out AUROC
with a CI over facts, a within-fact label-permutation null and random directions),
:func:`transfer_matrix` does it for every kind and pair of sets, and :func:`choose_layer` picks the
layer on training facts only. :mod:`mechlie.read.detector` re-exports every name here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechlie.core.stats import TensorEstimate
from mechlie.read.probes import AnyProbe, fit_probe

log = logging.getLogger(__name__)


class DetectorError(ValueError):
    """A detector applied where it does not belong, or built from unusable data."""


@dataclass(frozen=True)
class LabelledSet:
    """Labelled rows for probing: features at every layer, labels (1 = lie), the fact of each row.

    Rows sharing a fact (a pair's two prompts, or the samples of one prompt) are one unit: the
    null permutes labels within a fact, CIs resample facts, and splits never cut a fact.
    """

    name: str
    X: Float[Tensor, "n L d"]
    y: Float[Tensor, " n"]
    facts: list[str]

    def __post_init__(self) -> None:
        if not (len(self.X) == len(self.y) == len(self.facts)):
            raise DetectorError(f"{self.name}: X, y and facts differ in length")

    def subset(self, keep_facts: set[str], name: str | None = None) -> "LabelledSet":
        idx = [i for i, f in enumerate(self.facts) if f in keep_facts]
        return LabelledSet(name or self.name, self.X[idx], self.y[idx], [self.facts[i] for i in idx])

    @staticmethod
    def concat(sets: Sequence["LabelledSet"], name: str) -> "LabelledSet":
        return LabelledSet(
            name, torch.cat([s.X for s in sets]), torch.cat([s.y for s in sets]), [f for s in sets for f in s.facts]
        )

    def groups(self) -> list[list[int]]:
        by: dict[str, list[int]] = {}
        for i, f in enumerate(self.facts):
            by.setdefault(f, []).append(i)
        return list(by.values())

    def pairs(self, y: Tensor | None = None) -> Tensor:
        """``[m, 2]`` (label 0 row, label 1 row) pairs matched within each fact."""
        y = self.y if y is None else y
        out = []
        for g in self.groups():
            neg = [i for i in g if y[i] == 0]
            pos = [i for i in g if y[i] == 1]
            out += list(zip(neg, pos))
        return torch.tensor(out, dtype=torch.long).view(-1, 2)


def _within_fact_permutations(groups: list[list[int]], y: Tensor, n_draws: int, seed: int) -> Tensor:
    """``[draws, n]`` label vectors, each a permutation of ``y`` within every fact."""
    g = torch.Generator().manual_seed(seed)
    out = y.repeat(n_draws, 1)
    for idx in groups:
        if len(idx) < 2:
            continue
        t = torch.tensor(idx)
        perm = torch.rand(n_draws, len(idx), generator=g).argsort(1)
        out[:, t] = y[t][perm]
    return out


def _features(X: Tensor, kind: str, layer: int) -> Tensor:
    return X if kind == "ensemble" else X[:, layer : layer + 1]


def _score(probe: AnyProbe, X: Tensor, kind: str, layer: int) -> Tensor:
    s = probe.score(_features(X, kind, layer))
    return s if kind == "ensemble" else s[:, 0]


def _fit(kind: str, train: LabelledSet, layer: int, y: Tensor | None = None, seed: int = 0, **hp) -> AnyProbe:
    y = train.y if y is None else y
    return fit_probe(kind, _features(train.X, kind, layer), y, pairs=train.pairs(y), seed=seed, **hp)


@dataclass(frozen=True)
class TransferCell:
    auroc: float
    lo: float  # 95% CI over the target's facts
    hi: float
    null_shuffled_mean: float  # probe refit on within-fact label permutations (nan for ccs)
    null_shuffled_q95: float
    null_random_mean: float  # random Gaussian directions at the same layer, oriented on the source
    null_random_q95: float
    n_target_facts: int


def bootstrap_auroc(
    scores: Float[Tensor, " n"],
    y: Float[Tensor, " n"],
    groups: Sequence[Sequence[int]],
    *,
    n_boot: int = 500,
    level: float = 0.95,
    seed: int = 0,
) -> TensorEstimate:
    """AUROC of ``scores`` for labels ``y`` with a percentile bootstrap CI over ``groups`` (facts).

    The same resamples as ``stats.bootstrap_tensor(stat, len(groups))`` with a stat that
    concatenates the drawn groups' rows, computed at once: a resample is a multiplicity per group,
    so its AUROC is ``sum_ij w_i w_j [s_i > s_j] / (sum_i w_i sum_j w_j)`` over positives ``i`` and
    negatives ``j`` (ties count half). A resample without both classes is NaN and ignored.
    """
    from mechlie.core.stats import TensorEstimate, auroc

    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        raise DetectorError("AUROC needs both classes")
    row_group = torch.empty(len(y), dtype=torch.long)
    for gi, rows in enumerate(groups):
        row_group[list(rows)] = gi
    G = len(groups)
    draw = torch.randint(0, G, (n_boot, G), generator=torch.Generator().manual_seed(seed))
    mult = torch.zeros(n_boot, G).scatter_add_(1, draw, torch.ones(n_boot, G))[:, row_group]  # [B, n]
    sp, sn = scores[pos].double(), scores[neg].double()
    C = (sp[:, None] > sn[None, :]).double() + 0.5 * (sp[:, None] == sn[None, :]).double()
    wp, wn = mult[:, pos].double(), mult[:, neg].double()
    den = wp.sum(1) * wn.sum(1)
    draws = (((wp @ C) * wn).sum(1) / den).float()
    draws[den == 0] = float("nan")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2])
    lo, hi = torch.nanquantile(draws, q)
    return TensorEstimate(auroc(scores[pos], scores[neg]).float(), lo, hi, G, draws, level)


def evaluate_transfer(
    train: LabelledSet,
    tests: Sequence[LabelledSet],
    kind: str,
    layer: int,
    *,
    n_null: int = 50,
    n_random: int = 200,
    n_boot: int = 500,
    seed: int = 0,
    **hp,
) -> tuple[AnyProbe, list[TransferCell], list[Tensor], list[Tensor | None]]:
    """Fit ``kind`` on ``train`` at ``layer`` (``ensemble``: all layers) and score every test set.

    Returns the probe, one :class:`TransferCell` per test set (AUROC with a 95% CI over facts,
    the label-permutation null refit ``n_null`` times, ``n_random`` random directions), the
    test scores, and the bootstrap draws of each test AUROC (to combine sets into a mean's CI).
    """
    from mechlie.core.stats import auroc

    probe = _fit(kind, train, layer, seed=seed, **hp)
    # Nulls: refits on labels permuted within each fact (CCS never sees labels: no such null).
    null_probes = []
    if kind != "ccs" and n_null > 0:
        for yy in _within_fact_permutations(train.groups(), train.y, n_null, seed + 1):
            if len(train.pairs(yy)) >= 2 and 0 < yy.sum() < len(yy):
                try:
                    null_probes.append(_fit(kind, train, layer, yy, seed=seed, **hp))
                except ValueError:  # a permutation left too few of a class: skip that draw
                    pass
    g = torch.Generator().manual_seed(seed + 2)
    d = train.X.shape[-1]
    rand = torch.randn(n_random, d, generator=g)
    tr = train.X[:, layer].float() @ rand.T  # [n, draws]
    flip = torch.where(auroc(tr[train.y == 1], tr[train.y == 0]) < 0.5, -1.0, 1.0)
    rand = rand * flip[:, None]
    cells, all_scores, all_draws = [], [], []
    for test in tests:
        s = _score(probe, test.X, kind, layer)
        all_scores.append(s)
        pos, neg = test.y == 1, test.y == 0
        if not pos.any() or not neg.any():
            nan = float("nan")
            cells.append(TransferCell(nan, nan, nan, nan, nan, nan, nan, len(test.groups())))
            all_draws.append(None)
            continue
        groups = test.groups()
        est = bootstrap_auroc(s, test.y, groups, n_boot=n_boot, seed=seed)
        all_draws.append(est.draws)
        if null_probes:
            ns = torch.stack([_score(p, test.X, kind, layer) for p in null_probes], 1)
            nul = auroc(ns[pos], ns[neg])
            n_mean, n_q = float(nul.mean()), float(torch.quantile(nul, 0.95))
        else:
            n_mean = n_q = float("nan")
        rs = test.X[:, layer].float() @ rand.T
        rnd = auroc(rs[pos], rs[neg])
        cells.append(
            TransferCell(
                float(est.mean),
                float(est.lo),
                float(est.hi),
                n_mean,
                n_q,
                float(rnd.mean()),
                float(torch.quantile(rnd, 0.95)),
                len(groups),
            )
        )
    return probe, cells, all_scores, all_draws


def choose_layer(
    train: Sequence[LabelledSet],
    *,
    val_frac: float = 0.3,
    seed: int = 0,
    n_splits: int = 1,
    min_val_per_class: int = 1,
) -> tuple[int, Tensor]:
    """The layer whose difference-of-means direction best separates held-out *training* facts.

    Rule (validation only: no test fact is seen):

    1. For each set in ``train`` and each of ``n_splits`` seeded splits by fact (seeds ``seed``,
       ``seed + 1``, ...), a difference-of-means direction is fitted per layer on the fit part
       and scored by AUROC on the validation part (``val_frac`` of the facts).
    2. A split *counts* only if its fit part has at least 2 rows of each label and its
       validation part at least ``min_val_per_class`` of each (too few examples: skipped).
    3. The layer with the highest mean validation AUROC over all counted splits wins; ties
       (equal to 1e-9) go to the earliest layer.
    4. No counted split raises :class:`DetectorError`; the caller chooses a fallback.

    With *framing* labels (honest vs lying prompt) every layer from 0 on reads the prompt text,
    so this rule picks layer 0 at AUROC 1; with on-policy labels (sampled lies vs truths of the
    same prompt, :mod:`mechlie.read.labels`) it picks where the model's own lie is readable.

    Returns:
        The layer and the per-layer mean validation AUROC (``[L]``).
    """
    from mechlie.core.stats import auroc
    from mechlie.read.directions import split_by_fact

    per_split = []
    for s in train:
        if len(set(s.facts)) < 4:  # too few facts to carve out a validation split
            continue
        for j in range(n_splits):
            sp = split_by_fact(s.facts, val_frac, seed + j)
            tr, va = s.subset({s.facts[i] for i in sp.train}), s.subset({s.facts[i] for i in sp.test})
            if min(int(tr.y.sum()), int((1 - tr.y).sum())) < 2:
                continue
            if min(int(va.y.sum()), int((1 - va.y).sum())) < max(1, min_val_per_class):
                continue
            p = fit_probe("diff_of_means", tr.X, tr.y)
            sc = p.score(va.X)
            per_split.append(auroc(sc[va.y == 1], sc[va.y == 0]))
    if not per_split:
        raise DetectorError(
            "too few labelled examples to choose a layer: no training set has both labels in its fit and "
            f"validation facts (need >= 2 of each to fit, >= {max(1, min_val_per_class)} of each to validate)"
        )
    mean = torch.stack(per_split).mean(0)
    best = float(mean.max())
    return int((mean >= best - 1e-9).nonzero()[0]), mean


def transfer_matrix(
    train: Sequence[LabelledSet],
    test: Sequence[LabelledSet],
    kinds: Sequence[str],
    layer: int,
    *,
    n_null: int = 50,
    n_random: int = 200,
    n_boot: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, dict[str, TransferCell]]]:
    """``out[kind][train set][test set]``: every probe kind trained on every set, tested on every
    set (the diagonal is held-out facts of the same set). Sets whose training rows lack a class
    are skipped (logged)."""
    from tqdm.auto import tqdm

    out: dict[str, dict[str, dict[str, TransferCell]]] = {}
    jobs = [(k, s) for k in kinds for s in train]
    for kind, src in tqdm(jobs, desc="transfer", disable=not progress):
        if min(int(src.y.sum()), int((1 - src.y).sum())) < 2 or len(src.pairs()) < 2:
            log.warning(
                "%s: too few labelled rows of one class to fit (%d lie, %d not); skipped",
                src.name,
                int(src.y.sum()),
                int((1 - src.y).sum()),
            )
            continue
        _, cells, _, _ = evaluate_transfer(
            src, test, kind, layer, n_null=n_null, n_random=n_random, n_boot=n_boot, seed=seed
        )
        out.setdefault(kind, {})[src.name] = {t.name: c for t, c in zip(test, cells)}
    return out
