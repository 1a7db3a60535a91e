"""The held-out evaluation of the generalisation study (:mod:`mechlie.studies.generalisation`): rows,
held-out splits, one probe fit scored on held-out units beside its nulls and the surprisal baseline,
pooled over units, and the diversity curves.

Method, for one probe kind on one reading (:class:`Rows`):

- **Held-out units.** A relation (LORO), a setup (LOSO) or a template (LOTO) is held out at a time
  (:func:`held_out_splits`). LORO trains on every row of the other relations and scores *all* rows of
  the held-out relation. A setup or template shares its facts with the others, so LOSO/LOTO also split
  the facts (seeded, ``test_frac``): they train on the other units' rows of training facts and score
  the held-out unit's rows of test facts. No held-out fact is ever a training fact.
- **Layer**, chosen inside the training rows only (:func:`choose_training_layer`): difference of means
  per layer, scored on *validation relations* carved out of the training relations
  (:func:`mechlie.read.transfer.choose_layer` with the relation as its unit) when training has at least 4
  relations, else on validation facts; if neither has both classes, the middle read layer (logged).
- **Probe and nulls.** The probe is fitted on the training rows at that layer
  (:func:`mechlie.read.transfer.transfer_run`, which also gives ``n_random`` random-direction probes
  oriented and biased on the training labels). The permutation null refits the same kind on ``n_null``
  label vectors permuted across the rows of each training relation (:func:`mechlie.read.nulls.label_permutations`).
  For ``logistic`` the refits use :func:`mechlie.read.nulls.logistic_nulls` with ``solver="lbfgs"``
  (batched L-BFGS on scikit-learn's objective): its exact Newton solver costs about 100 s per fit at this
  study's ~2,000 rows x 576 features on one core, against ~3 s; a test checks the two agree.
- **Scores.** AUROC on each held-out unit with a 95% CI over its facts (bootstrap); beside it the
  surprisal baseline (-log P of the generated answer under the prompt: higher = lie, no training, no
  sign flip) on the same rows and resamples, and the *mixed-facts cell*: the held-out rows of prompts
  whose answers hold both a lie and a truth, where the probe is compared with surprisal (paired draws).
- **Pooled over units** (:func:`pool`): the mean AUROC over held-out units, with a CI over facts (the
  per-unit fact bootstraps, drawn independently, averaged draw by draw) and a CI over units (units
  resampled); each null's bar is the 95th percentile of its per-draw mean over units.
"""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

log = logging.getLogger("mechlie")

UNITS: tuple[str, ...] = ("relation", "setup", "template")
MIN_TRAIN_PER_CLASS = 2


@dataclass(frozen=True)
class EvalSettings:
    n_null: int = 200
    n_random: int = 200
    n_boot: int = 500
    test_frac: float = 0.5  # facts held out with a setup or template
    val_frac: float = 0.25  # validation relations (or facts) for the layer choice
    n_val_splits: int = 3
    seed: int = 0


@dataclass(frozen=True)
class Rows:
    """Labelled rows of one model at one reading: features at the read layers, labels (1 = lie) and
    each row's fact, relation, setup, template (``setup/template``) and prompt (fact x template)."""

    X: Float[Tensor, "n L d"]
    y: Float[Tensor, " n"]
    fact: list[str]
    relation: list[str]
    setup: list[str]
    template: list[str]
    prompt: list[str]
    surprisal: Float[Tensor, " n"]  # -log P of the answer; NaN where the reading has no answer

    def __post_init__(self) -> None:
        n = len(self.y)
        lens = {len(self.X), len(self.fact), len(self.relation), len(self.setup), len(self.template)}
        if lens | {len(self.prompt), len(self.surprisal)} != {n}:
            raise ValueError("Rows: every field needs one entry per row")

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: Sequence[int]) -> Rows:
        t = torch.as_tensor(list(idx), dtype=torch.long)
        pick = lambda xs: [xs[i] for i in t.tolist()]  # noqa: E731
        return Rows(
            self.X[t],
            self.y[t],
            pick(self.fact),
            pick(self.relation),
            pick(self.setup),
            pick(self.template),
            pick(self.prompt),
            self.surprisal[t],
        )

    def unit(self, by: str) -> list[str]:
        if by not in UNITS:
            raise ValueError(f"held-out unit must be one of {UNITS}, got {by!r}")
        return getattr(self, by)

    def counts(self) -> dict:
        return {"lie": int(self.y.sum()), "truth": int((1 - self.y).sum()), "facts": len(set(self.fact))}


@dataclass(frozen=True)
class Split:
    """One held-out evaluation: training row indices and, per held-out unit, its test row indices."""

    name: str
    train: list[int]
    tests: dict[str, list[int]]


def fact_split(rows: Rows, test_frac: float, seed: int) -> set[str]:
    """Test facts: ``test_frac`` of each relation's facts (seeded, at least one kept on each side
    where a relation has two)."""
    by: dict[str, list[str]] = {}
    for f, r in zip(rows.fact, rows.relation):
        by.setdefault(r, [])
        if f not in by[r]:
            by[r].append(f)
    out = set()
    for r, facts in sorted(by.items()):
        facts = sorted(facts)
        random.Random(f"{seed}/facts/{r}").shuffle(facts)
        n = min(max(1, round(test_frac * len(facts))), len(facts) - 1) if len(facts) > 1 else 0
        out.update(facts[:n])
    return out


def held_out_splits(rows: Rows, by: str, *, test_frac: float = 0.5, seed: int = 0) -> list[Split]:
    """One :class:`Split` per unit of ``by`` (see the module docstring)."""
    units = list(dict.fromkeys(rows.unit(by)))
    test_facts = fact_split(rows, test_frac, seed) if by != "relation" else None
    out = []
    for u in units:
        if test_facts is None:
            train = [i for i, v in enumerate(rows.relation) if v != u]
            test = [i for i, v in enumerate(rows.relation) if v == u]
        else:
            unit = rows.unit(by)
            train = [i for i, (v, f) in enumerate(zip(unit, rows.fact)) if v != u and f not in test_facts]
            test = [i for i, (v, f) in enumerate(zip(unit, rows.fact)) if v == u and f in test_facts]
        out.append(Split(u, train, {u: test}))
    return out


def _labelled(rows: Rows, name: str, facts: list[str] | None = None):
    from mechlie.read.transfer import LabelledSet

    return LabelledSet(name, rows.X, rows.y, list(facts if facts is not None else rows.fact), list(rows.relation))


def choose_training_layer(train: Rows, ev: EvalSettings) -> tuple[int, str]:
    """The read-layer index chosen on validation relations (or facts) of ``train``; and the rule used."""
    from mechlie.read.transfer import DetectorError, choose_layer

    kw = dict(val_frac=ev.val_frac, seed=ev.seed, n_splits=ev.n_val_splits)
    if len(set(train.relation)) >= 4:
        try:  # the relation is the unit of the validation split: facts = relation names
            return choose_layer([_labelled(train, "val", train.relation)], **kw)[0], "validation relations"
        except DetectorError:
            pass
    try:
        return choose_layer([_labelled(train, "val")], **kw)[0], "validation facts"
    except DetectorError as e:
        mid = train.X.shape[1] // 2
        log.warning("layer choice impossible (%s); using the middle read layer %d", e, mid)
        return mid, "fallback: middle read layer"


def permutation_refits(kind: str, train: Rows, layer: int, ev: EvalSettings):
    """The permutation null's probes: ``kind`` refitted on ``ev.n_null`` label vectors permuted across
    the rows of each training relation (seed ``ev.seed + 1``); ``None`` for a kind without refits."""
    from mechlie.read import nulls

    strata: dict[str, list[int]] = {}
    for i, r in enumerate(train.relation):
        strata.setdefault(r, []).append(i)
    Y = nulls.label_permutations(train.y, list(strata.values()), ev.n_null, ev.seed + 1)
    X = train.X[:, layer]
    if kind == "logistic":
        return nulls.logistic_nulls(X, Y, solver="lbfgs")
    groups: dict[str, list[int]] = {}
    for i, f in enumerate(train.fact):
        groups.setdefault(f, []).append(i)
    probes, _ = nulls.refit_nulls(kind, X, Y, list(groups.values()), seed=ev.seed)
    return probes


@dataclass
class Cell:
    """One held-out unit scored by one fit: AUROC with its fact-bootstrap draws, both nulls' draws,
    and the surprisal baseline and mixed-facts cell on the same rows (``None`` where absent)."""

    unit: str
    auroc: float
    draws: Tensor
    null_perm: Tensor | None
    null_rand: Tensor | None
    layer: int
    counts: dict
    surprisal: float | None = None
    surprisal_draws: Tensor | None = None
    mixed: dict = field(default_factory=dict)  # probe / surprisal AUROC and draws on mixed prompts

    def to_json(self) -> dict:
        q = lambda t: None if t is None else float(torch.nanquantile(t, 0.95))  # noqa: E731
        lo, hi = torch.nanquantile(self.draws, torch.tensor([0.025, 0.975])).tolist()
        out = {"auroc": self.auroc, "lo": lo, "hi": hi, "layer_index": self.layer, **self.counts}
        out.update(null_permutation_q95=q(self.null_perm), null_random_q95=q(self.null_rand), surprisal=self.surprisal)
        if self.mixed:
            out["mixed"] = {k: v for k, v in self.mixed.items() if not isinstance(v, Tensor)}
        return out


def _auroc_with_draws(scores: Tensor, y: Tensor, facts: list[str], ev: EvalSettings) -> tuple[float, Tensor]:
    from mechlie.read.transfer import bootstrap_auroc

    groups: dict[str, list[int]] = {}
    for i, f in enumerate(facts):
        groups.setdefault(f, []).append(i)
    est = bootstrap_auroc(scores, y, list(groups.values()), n_boot=ev.n_boot, seed=ev.seed)
    return float(est.mean), est.draws


def _mixed(test: Rows, scores: Tensor, ev: EvalSettings) -> dict:
    """The mixed-facts cell: rows of prompts with both a lie and a truth among their answers."""
    by: dict[str, set[float]] = {}
    for p, v in zip(test.prompt, test.y.tolist()):
        by.setdefault(p, set()).add(v)
    idx = [i for i, p in enumerate(test.prompt) if len(by[p]) == 2]
    if not idx:
        return {}
    sub, s = test.take(idx), scores[idx]
    out = {"n_rows": len(idx), "n_prompts": sum(len(v) == 2 for v in by.values()), "n_facts": len(set(sub.fact))}
    out["probe"], out["probe_draws"] = _auroc_with_draws(s, sub.y, sub.fact, ev)
    if not torch.isnan(sub.surprisal).any():
        out["surprisal"], out["surprisal_draws"] = _auroc_with_draws(sub.surprisal, sub.y, sub.fact, ev)
    return out


def evaluate(train: Rows, tests: dict[str, Rows], kind: str, ev: EvalSettings) -> tuple[list[Cell], dict]:
    """Fit ``kind`` on ``train`` (layer chosen inside it) and score every test unit (see the module
    docstring). Units lacking a class are skipped; the second value says what was skipped and why."""
    from mechlie.core.stats import auroc
    from mechlie.read.transfer import transfer_run

    skipped = {}
    n1, n0 = int(train.y.sum()), int((1 - train.y).sum())
    if min(n1, n0) < MIN_TRAIN_PER_CLASS:
        return [], {
            u: f"training rows have {n1} lies and {n0} truths (need >= {MIN_TRAIN_PER_CLASS} each)" for u in tests
        }
    usable = {}
    for u, t in tests.items():
        if len(t) == 0 or t.y.min() == t.y.max():
            skipped[u] = f"held-out rows have {int(t.y.sum())} lies and {int((1 - t.y).sum())} truths"
        else:
            usable[u] = t
    if not usable:
        return [], skipped
    layer, _ = choose_training_layer(train, ev)
    tr = _labelled(train, "train")
    tsets = [_labelled(t, u) for u, t in usable.items()]
    run = transfer_run(tr, tsets, kind, layer, n_null=0, n_random=ev.n_random, n_boot=ev.n_boot, seed=ev.seed)
    perm = permutation_refits(kind, train, layer, ev) if ev.n_null else None
    cells = []
    for (u, t), s, draws, rnd in zip(usable.items(), run.scores, run.draws, run.null_random):
        pos, neg = t.y == 1, t.y == 0
        null_perm = None
        if perm is not None and len(perm):
            ns = perm.score(t.X[:, layer])
            null_perm = auroc(ns[pos], ns[neg])
        c = Cell(u, float(auroc(s[pos], s[neg])), draws, null_perm, rnd, layer, t.counts())
        if not torch.isnan(t.surprisal).any():
            c.surprisal, c.surprisal_draws = _auroc_with_draws(t.surprisal, t.y, t.fact, ev)
        c.mixed = _mixed(t, s, ev)
        cells.append(c)
    return cells, skipped


def _q(t: Tensor, qs: Sequence[float]) -> list[float]:
    return torch.nanquantile(t.float(), torch.tensor(list(qs))).tolist()


def _stack_mean(ts: list[Tensor]) -> Tensor:
    """Draw-wise mean over units (draw ``j`` of every unit averaged), truncated to the shortest."""
    m = min(len(t) for t in ts)
    return torch.stack([t[:m].float() for t in ts]).nanmean(0)


def _unit_ci(values: Tensor, ev: EvalSettings) -> tuple[float, float]:
    """Percentile CI of the mean over units, units resampled (``nan`` with one unit)."""
    if len(values) < 2:
        return float("nan"), float("nan")
    g = torch.Generator().manual_seed(ev.seed + 3)
    idx = torch.randint(0, len(values), (ev.n_boot, len(values)), generator=g)
    lo, hi = _q(values[idx].nanmean(1), (0.025, 0.975))
    return lo, hi


def _estimate(values: list[float], draws: list[Tensor], ev: EvalSettings) -> dict:
    v = torch.tensor(values, dtype=torch.float32)
    lo, hi = _q(_stack_mean(draws), (0.025, 0.975))
    ulo, uhi = _unit_ci(v, ev)
    return {"mean": float(v.nanmean()), "lo": lo, "hi": hi, "units_lo": ulo, "units_hi": uhi, "n_units": len(v)}


def pool(cells: Sequence[Cell], ev: EvalSettings) -> dict:
    """The mean over held-out units with both CIs, both nulls' bars (q95 of the per-draw mean over
    units), the surprisal baseline and the mixed-facts cell (probe, surprisal and their difference)."""
    if not cells:
        return {"n_units": 0}
    out = {"n_units": len(cells), "auroc": _estimate([c.auroc for c in cells], [c.draws for c in cells], ev)}
    for name, attr in (("null_permutation", "null_perm"), ("null_random", "null_rand")):
        ds = [getattr(c, attr) for c in cells if getattr(c, attr) is not None]
        if ds:
            per_draw = _stack_mean(ds)
            out[name] = {"mean": float(per_draw.mean()), "q95": _q(per_draw, (0.95,))[0], "n_draws": len(per_draw)}
    sc = [c for c in cells if c.surprisal is not None]
    if sc:
        out["surprisal"] = _estimate([c.surprisal for c in sc], [c.surprisal_draws for c in sc], ev)
    mc = [c for c in cells if "surprisal" in c.mixed]
    if mc:
        m = [c.mixed for c in mc]
        out["mixed"] = {
            "probe": _estimate([x["probe"] for x in m], [x["probe_draws"] for x in m], ev),
            "surprisal": _estimate([x["surprisal"] for x in m], [x["surprisal_draws"] for x in m], ev),
            "probe_minus_surprisal": _estimate(
                [x["probe"] - x["surprisal"] for x in m], [x["probe_draws"] - x["surprisal_draws"] for x in m], ev
            ),
            "n_rows": sum(x["n_rows"] for x in m),
            "n_prompts": sum(x["n_prompts"] for x in m),
        }
    bars = [out[k]["q95"] for k in ("null_permutation", "null_random") if k in out]
    out["above_nulls"] = bool(bars) and out["auroc"]["mean"] > max(bars)
    return out


def held_out(rows: Rows, by: str, kind: str, ev: EvalSettings) -> dict:
    """Hold out every unit of ``by`` in turn; the pooled result and each unit's cell."""
    cells, skipped = [], {}
    for sp in held_out_splits(rows, by, test_frac=ev.test_frac, seed=ev.seed):
        got, why = evaluate(rows.take(sp.train), {u: rows.take(i) for u, i in sp.tests.items()}, kind, ev)
        cells += got
        skipped.update(why)
    for u, why in skipped.items():
        log.info("held-out %s %s (%s) skipped: %s", by, u, kind, why)
    return {**pool(cells, ev), "units": {c.unit: c.to_json() for c in cells}, "skipped": skipped}


def relation_curve(rows: Rows, sizes: Sequence[int], n_draws: int, kind: str, ev: EvalSettings) -> dict:
    """Held-out AUROC against the number of training relations: per draw, seeded held-out relations
    (all relations beyond the largest size) and one seeded order of the rest, the first ``n`` of which
    train (nested: the relations of a smaller size are among those of a larger one)."""
    rels = sorted(set(rows.relation))
    ok = [n for n in sizes if n <= len(rels) - 1]
    if not ok:
        return {"points": [], "dropped_sizes": list(sizes), "why": f"{len(rels)} relations"}
    n_test = len(rels) - max(ok)
    per: dict[int, list[Cell]] = {n: [] for n in ok}
    skipped: dict[str, str] = {}
    for j in range(n_draws):
        order = rels[:]
        random.Random(f"{ev.seed}/curve/{j}").shuffle(order)
        test, rest = order[:n_test], order[n_test:]
        tests = {f"{r} (draw {j})": rows.take([i for i, v in enumerate(rows.relation) if v == r]) for r in test}
        for n in ok:
            train = rows.take([i for i, v in enumerate(rows.relation) if v in set(rest[:n])])
            cells, why = evaluate(train, tests, kind, ev)
            per[n] += cells
            skipped.update({f"{n} relations: {u}": w for u, w in why.items()})
    points = [{"n": n, **pool(per[n], ev)} for n in ok]
    return {
        "points": points,
        "dropped_sizes": [n for n in sizes if n not in ok],
        "n_test_relations": n_test,
        "skipped": skipped,
    }


def setup_curve(rows: Rows, sizes: Sequence[int], n_draws: int, kind: str, ev: EvalSettings) -> dict:
    """Held-out AUROC against the number of training setups: each setup held out in turn (its rows of
    test facts), trained on ``n`` of the others (training facts), at most ``n_draws`` seeded choices each."""
    setups = sorted(set(rows.setup))
    test_facts = fact_split(rows, ev.test_frac, ev.seed)
    ok = [n for n in sizes if n <= len(setups) - 1]
    per: dict[int, list[Cell]] = {n: [] for n in ok}
    skipped: dict[str, str] = {}
    for s in setups:
        test = {s: rows.take([i for i, (v, f) in enumerate(zip(rows.setup, rows.fact)) if v == s and f in test_facts])}
        others = [o for o in setups if o != s]
        for n in ok:
            combos = list(itertools.combinations(others, n))
            combos = random.Random(f"{ev.seed}/setups/{s}/{n}").sample(combos, min(n_draws, len(combos)))
            for combo in combos:
                idx = [i for i, (v, f) in enumerate(zip(rows.setup, rows.fact)) if v in combo and f not in test_facts]
                cells, why = evaluate(rows.take(idx), test, kind, ev)
                per[n] += cells
                skipped.update({f"{n} setups {'+'.join(combo)}: {u}": w for u, w in why.items()})
    points = [{"n": n, **pool(per[n], ev)} for n in ok]
    return {"points": points, "dropped_sizes": [n for n in sizes if n not in ok], "skipped": skipped}
