"""Does a probe generalise? Train it on one labelled set, test it on another, with controls.

A :class:`LabelledSet` holds features at every layer, labels (1 = lie), the fact of each row and,
optionally, its relation; :func:`transfer_run` (and its tuple form :func:`evaluate_transfer`)
trains a probe kind on one set and scores it on others: held-out AUROC with a CI over facts, beside
two nulls from :mod:`mechlie.read.nulls` (the probe refitted on labels permuted across the facts of
each relation, and random-direction probes fitted the same way; 200 draws each by default), with
every null draw's AUROC kept so that a caller can combine sets (the leave-one-relation-out bar is
the 95th percentile of the per-draw mean over held-out relations). :func:`transfer_matrix` does it
for every kind and pair of sets, and :func:`choose_layer` picks the layer on training facts only.
:mod:`mechlie.read.detector` re-exports every name here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechlie.core.stats import TensorEstimate
from mechlie.read import nulls
from mechlie.read.probes import AnyProbe, fit_probe

log = logging.getLogger(__name__)


class DetectorError(ValueError):
    """A detector applied where it does not belong, or built from unusable data."""


@dataclass(frozen=True)
class LabelledSet:
    """Labelled rows for probing: features at every layer, labels (1 = lie), the fact of each row,
    and optionally the relation of each row (``relations``; ``None`` = one relation for all rows).

    Rows sharing a fact (a pair's two prompts, or the samples of one prompt) are one unit: CIs
    resample facts and splits never cut a fact. The permutation null permutes labels across the
    rows of each relation (:meth:`strata`), so labels move between facts.
    """

    name: str
    X: Float[Tensor, "n L d"]
    y: Float[Tensor, " n"]
    facts: list[str]
    relations: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if not (len(self.X) == len(self.y) == len(self.facts)):
            raise DetectorError(f"{self.name}: X, y and facts differ in length")
        if self.relations is not None and len(self.relations) != len(self.facts):
            raise DetectorError(f"{self.name}: {len(self.relations)} relations for {len(self.facts)} rows")

    def subset(self, keep_facts: set[str], name: str | None = None) -> "LabelledSet":
        idx = [i for i, f in enumerate(self.facts) if f in keep_facts]
        rel = None if self.relations is None else [self.relations[i] for i in idx]
        return LabelledSet(name or self.name, self.X[idx], self.y[idx], [self.facts[i] for i in idx], rel)

    def with_relation(self, relation: str) -> "LabelledSet":
        """The same rows, all of ``relation``."""
        return replace(self, relations=[relation] * len(self.facts))

    @staticmethod
    def concat(sets: Sequence["LabelledSet"], name: str) -> "LabelledSet":
        """Rows of every set; relations are kept if every set has them, dropped if none has, and
        a mix is an error (the permutation null would otherwise pool relations silently)."""
        has = [s.relations is not None for s in sets]
        if any(has) and not all(has):
            missing = [s.name for s, h in zip(sets, has) if not h]
            raise DetectorError(f"{name}: sets {missing} lack relations while others have them")
        rel = [r for s in sets for r in s.relations] if all(has) and sets else None
        return LabelledSet(
            name,
            torch.cat([s.X for s in sets]),
            torch.cat([s.y for s in sets]),
            [f for s in sets for f in s.facts],
            rel,
        )

    def groups(self) -> list[list[int]]:
        by: dict[str, list[int]] = {}
        for i, f in enumerate(self.facts):
            by.setdefault(f, []).append(i)
        return list(by.values())

    def strata(self) -> list[list[int]]:
        """Rows per relation (all rows in one stratum when ``relations`` is ``None``)."""
        if self.relations is None:
            return [list(range(len(self.facts)))]
        by: dict[str, list[int]] = {}
        for i, r in enumerate(self.relations):
            by.setdefault(r, []).append(i)
        return list(by.values())

    def pairs(self, y: Tensor | None = None) -> Tensor:
        """``[m, 2]`` (label 0 row, label 1 row) pairs matched within each fact."""
        lab = (self.y if y is None else y).tolist()
        out = []
        for g in self.groups():
            out += list(zip([i for i in g if lab[i] == 0], [i for i in g if lab[i] == 1]))
        return torch.tensor(out, dtype=torch.long).view(-1, 2)


@dataclass(frozen=True)
class TransferCell:
    auroc: float
    lo: float  # 95% CI over the target's facts
    hi: float
    null_shuffled_mean: float  # refits on labels permuted across facts of each relation (nan for ccs)
    null_shuffled_q95: float
    null_random_mean: float  # random unit directions, oriented and biased on the source labels
    null_random_q95: float
    n_target_facts: int
    n_null: int = 0  # permutation draws kept
    n_random: int = 0


@dataclass(frozen=True)
class TransferRun:
    """Everything :func:`transfer_run` computes, one entry per test set: the cells, the scores,
    the fact-bootstrap draws of the AUROC, and every null draw's AUROC (``None`` where the test
    set lacks a class or the kind has no such null)."""

    probe: AnyProbe
    cells: list[TransferCell]
    scores: list[Tensor]
    draws: list[Tensor | None]
    null_shuffled: list[Tensor | None]
    null_random: list[Tensor | None]


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


def _features(X: Tensor, kind: str, layer: int) -> Tensor:
    return X if kind == "ensemble" else X[:, layer : layer + 1]


def _score(probe: AnyProbe, X: Tensor, kind: str, layer: int) -> Tensor:
    s = probe.score(_features(X, kind, layer))
    return s if kind == "ensemble" else s[:, 0]


def _fit(kind: str, train: LabelledSet, layer: int, y: Tensor | None = None, seed: int = 0, **hp) -> AnyProbe:
    y = train.y if y is None else y
    return fit_probe(kind, _features(train.X, kind, layer), y, pairs=train.pairs(y), seed=seed, **hp)


def _null_features(X: Tensor, kind: str, layer: int) -> Tensor:
    return X if kind == "ensemble" else X[:, layer]


def _null_summary(a: Tensor | None) -> tuple[float, float]:
    if a is None or not len(a):
        return float("nan"), float("nan")
    return float(a.mean()), float(torch.quantile(a, 0.95))


def transfer_run(
    train: LabelledSet,
    tests: Sequence[LabelledSet],
    kind: str,
    layer: int,
    *,
    n_null: int = 200,
    n_random: int = 200,
    n_boot: int = 500,
    seed: int = 0,
    **hp,
) -> TransferRun:
    """Fit ``kind`` on ``train`` at ``layer`` (``ensemble``: all layers) and score every test set.

    Each test set gets its AUROC with a 95% CI over its facts and two nulls
    (:mod:`mechlie.read.nulls`): the probe refitted on ``n_null`` label vectors permuted across the
    rows of each relation of ``train`` (seed ``seed + 1``; none for ``ccs``), and ``n_random``
    random unit directions oriented and biased on the training labels (seed ``seed + 2``; the same
    directions for every call with the same seed and width). Their mean and 95th percentile are in
    the cell, every draw's AUROC in the result.
    """
    from mechlie.core.stats import auroc

    probe = _fit(kind, train, layer, seed=seed, **hp)
    Xn = _null_features(train.X, kind, layer)
    shuffled = None
    if n_null > 0:
        Y = nulls.label_permutations(train.y, train.strata(), n_null, seed + 1)
        shuffled, kept = nulls.refit_nulls(kind, Xn, Y, train.groups(), seed=seed, **hp)
        if shuffled is not None and len(kept) < n_null:
            log.info("%s on %s: %d of %d permutation draws usable", kind, train.name, len(kept), n_null)
    rand = nulls.random_nulls(Xn, train.y, n_random, seed + 2, ensemble=kind == "ensemble") if n_random else None
    out = TransferRun(probe, [], [], [], [], [])
    for test in tests:
        s = _score(probe, test.X, kind, layer)
        out.scores.append(s)
        pos, neg = test.y == 1, test.y == 0
        if not pos.any() or not neg.any():
            nan = float("nan")
            out.cells.append(TransferCell(nan, nan, nan, nan, nan, nan, nan, len(test.groups())))
            for lst in (out.draws, out.null_shuffled, out.null_random):
                lst.append(None)
            continue
        groups = test.groups()
        est = bootstrap_auroc(s, test.y, groups, n_boot=n_boot, seed=seed)
        Xt = _null_features(test.X, kind, layer)
        nul = None if shuffled is None or not len(shuffled) else _null_auroc(shuffled, Xt, pos, neg, auroc)
        rnd = None if rand is None else _null_auroc(rand, Xt, pos, neg, auroc)
        out.draws.append(est.draws)
        out.null_shuffled.append(nul)
        out.null_random.append(rnd)
        out.cells.append(
            TransferCell(
                float(est.mean),
                float(est.lo),
                float(est.hi),
                *_null_summary(nul),
                *_null_summary(rnd),
                len(groups),
                0 if nul is None else len(nul),
                0 if rnd is None else len(rnd),
            )
        )
    return out


def _null_auroc(probes: nulls.NullProbes, X: Tensor, pos: Tensor, neg: Tensor, auroc) -> Tensor:
    ns = probes.score(X)  # [m, D]
    return auroc(ns[pos], ns[neg])


def evaluate_transfer(
    train: LabelledSet,
    tests: Sequence[LabelledSet],
    kind: str,
    layer: int,
    *,
    n_null: int = 200,
    n_random: int = 200,
    n_boot: int = 500,
    seed: int = 0,
    **hp,
) -> tuple[AnyProbe, list[TransferCell], list[Tensor], list[Tensor | None]]:
    """:func:`transfer_run` as a tuple: the probe, one :class:`TransferCell` per test set, the test
    scores, and the fact-bootstrap draws of each test AUROC (to combine sets into a mean's CI)."""
    r = transfer_run(train, tests, kind, layer, n_null=n_null, n_random=n_random, n_boot=n_boot, seed=seed, **hp)
    return r.probe, r.cells, r.scores, r.draws


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
    n_null: int = 200,
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
