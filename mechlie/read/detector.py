"""A lie detector you can keep: a probe, where it reads, which model, and a calibrated threshold.

A :class:`Detector` is a fitted probe (:mod:`mechlie.read.probes`) plus its site (activation kind and
layers, read at the final prompt token or along generated tokens), the name and a fingerprint
of the model it was fitted on, and a threshold calibrated on *control* data (honest prompts and
neutral text, ``mechlie/data/neutral.txt``) so that a chosen share of the controls (the false
positive rate, FPR) scores above it. Apollo's deception probes (Goldowsky-Dill et al. 2025)
report recall at 1% FPR on control chat; :func:`fit_detector` reports the same figure.

Scores point honest -> lying: higher = more likely a lie. ``score(model, prompts or pairs)``
gives a score per prompt (the state at the final prompt token, whose next-token prediction is
the answer) and, with ``generate_tokens > 0``, a score per generated token (the state from
which that token was chosen; see :mod:`mechlie.read.labels`).

The fingerprint is a SHA-256 of the model's shape and of a few weight rows rounded to 4
decimals (robust to float noise, different for different weights), so applying a detector to
another model or width is an error, not a silent garbage score. The file is one safetensors
file: the probe's tensors plus a JSON header with everything else.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.core.activations import collect
from mechlie.core.io import ResultFileError, load_tensors, save_tensors
from mechlie.core.pairs import ContrastPair, PairError
from mechlie.core.stats import Estimate, TensorEstimate
from mechlie.read.labels import generate_with_states
from mechlie.read.probes import AnyProbe, EnsembleProbe, fit_probe, pair_rows, probe_from_tensors

log = logging.getLogger(__name__)


class DetectorError(ValueError):
    """A detector applied where it does not belong, or built from unusable data."""


def model_fingerprint(model: HookedTransformer) -> str:
    """SHA-256 (16 hex) of the model's dimensions and a few rounded weight rows."""
    cfg = model.cfg
    h = hashlib.sha256(json.dumps([cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_vocab]).encode())
    for w in (model.W_E[:4], model.W_U[:, :4].T, model.blocks[0].attn.W_Q[0, :2, :].T):
        h.update(json.dumps(torch.round(w.detach().float().cpu() * 1e4).long().flatten().tolist()).encode())
    return h.hexdigest()[:16]


def neutral_texts() -> list[str]:
    """The built-in neutral sentences (one per line, written for this project)."""
    text = files("mechlie").joinpath("data/neutral.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class DetectorScores:
    prompt: Float[Tensor, " n"]  # at the final prompt token
    tokens: Float[Tensor, "n steps"] | None = None  # per generated token (state that chose it)
    token_mask: Int[Tensor, "n steps"] | None = None  # 1 = a generated token
    texts: list[str] | None = None  # the generated continuations
    framing: Float[Tensor, " n"] | None = None  # for pairs: 0 honest prompt, 1 lying prompt


@dataclass(frozen=True)
class Detector:
    probe: AnyProbe
    kind: str  # activation kind, e.g. "resid_post"
    layers: tuple[int, ...]  # one layer, or several for an ensemble probe
    model_name: str
    model_hash: str
    d_model: int
    threshold: float
    fpr: float  # the control FPR the threshold was calibrated at
    info: dict = field(default_factory=dict)  # calibration numbers, training data description

    # -- applying -------------------------------------------------------------------------------

    def check(self, model: HookedTransformer) -> None:
        """Raise :class:`DetectorError` unless ``model`` is the model this detector was fitted on."""
        if model.cfg.d_model != self.d_model:
            raise DetectorError(
                f"detector was fitted on {self.model_name!r} (d_model {self.d_model}); this model has "
                f"d_model {model.cfg.d_model}"
            )
        if model.cfg.n_layers <= max(self.layers):
            raise DetectorError(f"detector reads layer {max(self.layers)}; the model has {model.cfg.n_layers} layers")
        fp = model_fingerprint(model)
        if fp != self.model_hash:
            raise DetectorError(
                f"detector was fitted on {self.model_name!r} (weights {self.model_hash}); this model "
                f"({model.cfg.model_name!r}) has weights {fp}. Refit the detector for this model."
            )

    def score_features(self, X: Float[Tensor, "n l d"]) -> Float[Tensor, " n"]:
        """Scores from features already read at ``layers`` (``[n, len(layers), d]``)."""
        s = self.probe.score(X)
        return s if isinstance(self.probe, EnsembleProbe) else s[:, 0]

    def score(
        self,
        model: HookedTransformer,
        inputs: Sequence[str] | Sequence[ContrastPair],
        *,
        generate_tokens: int = 0,
        batch_size: int = 16,
    ) -> DetectorScores:
        """Score prompts (or both prompts of each pair: honest first, then lying).

        Args:
            inputs: prompt strings, or :class:`ContrastPair` s (``framing`` says which is which).
            generate_tokens: also generate this many tokens greedily and score each of them.

        Returns:
            :class:`DetectorScores` with a score per prompt and, optionally, per generated token.

        Example:
            >>> det = Detector.load("detector.safetensors")
            >>> det.score(model, ["Q: What is the capital of France?\\nA:"]).prompt
        """
        self.check(model)
        if len(inputs) == 0:
            raise PairError("nothing to score")
        framing = None
        if all(isinstance(x, ContrastPair) for x in inputs):
            prompts = [p.honest for p in inputs] + [p.lying for p in inputs]
            framing = torch.cat([torch.zeros(len(inputs)), torch.ones(len(inputs))])
        elif all(isinstance(x, str) for x in inputs):
            prompts = list(inputs)
        else:
            raise DetectorError("inputs must be all prompt strings or all ContrastPairs")
        if generate_tokens > 0:
            g = generate_with_states(
                model, prompts, kinds=(self.kind,), layers=self.layers, max_new_tokens=generate_tokens
            )
            st = g.states[self.kind]  # [n, steps, l, d]
            n, steps = st.shape[:2]
            tok = self.score_features(st.flatten(0, 1)).view(n, steps)
            tok = tok.masked_fill(g.new_mask == 0, float("nan"))
            return DetectorScores(tok[:, 0], tok, g.new_mask, g.texts, framing)
        X = collect(model, prompts, kinds=(self.kind,), batch_size=batch_size, progress=False)[self.kind]
        return DetectorScores(self.score_features(X[:, list(self.layers)]), framing=framing)

    def flag(self, scores: Tensor) -> Tensor:
        """``scores > threshold``: flagged as a lie."""
        return scores > self.threshold

    # -- saving ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """One safetensors file (written atomically): probe tensors + JSON header."""
        tensors, probe_meta = self.probe.to_tensors()
        header = {k: v for k, v in asdict(self).items() if k != "probe"}
        header["layers"] = list(self.layers)
        return save_tensors(path, {"probe": tensors}, {"mechlie_detector": header, "probe": probe_meta})

    @classmethod
    def load(cls, path: str | Path) -> "Detector":
        try:
            tensors, meta = load_tensors(path)
        except ResultFileError as e:
            raise DetectorError(str(e)) from None
        if not isinstance(meta, dict) or "mechlie_detector" not in meta:
            raise DetectorError(f"{path} is a mechlie result file but not a detector")
        header = dict(meta["mechlie_detector"])
        header["layers"] = tuple(header["layers"])
        return cls(probe=probe_from_tensors(tensors["probe"], meta["probe"]), **header)


# ---------------------------------------------------------------------------------------------
# calibration


def calibrate_threshold(control: Float[Tensor, " n"], fpr: float) -> float:
    """The score above which a share ``fpr`` of the controls lie (their ``1 - fpr`` quantile)."""
    if not 0 < fpr < 1:
        raise DetectorError(f"fpr must be in (0, 1), got {fpr}")
    control = control[torch.isfinite(control)]
    if len(control) < 2:
        raise DetectorError("need at least 2 control scores to calibrate a threshold")
    if fpr * len(control) < 1:
        log.warning("%d controls cannot resolve an FPR of %g: the threshold is their maximum", len(control), fpr)
    return float(torch.quantile(control.double(), 1 - fpr, interpolation="higher"))


def fit_detector(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    controls: Sequence[str],
    *,
    probe: str = "logistic",
    kind: str = "resid_post",
    layers: Sequence[int] = (-1,),
    fpr: float = 0.01,
    batch_size: int = 16,
    **hyperparameters,
) -> Detector:
    """Fit a probe on honest/lying ``pairs`` (framing labels) and calibrate it on ``controls``.

    Args:
        pairs: training pairs (read at the final prompt token).
        controls: prompts that are *not* lies (honest prompts not used for training, neutral
            text: :func:`neutral_texts`); the threshold flags a share ``fpr`` of them.
        probe: a probe kind of :mod:`mechlie.read.probes` (``ensemble`` reads every layer in ``layers``).
        layers: blocks to read (negative = from the end); one, unless ``probe="ensemble"``.

    Returns:
        A calibrated :class:`Detector`; ``info`` has the training recall at the threshold.

    Example:
        >>> det = fit_detector(model, train_pairs, [p.honest for p in held_out] + neutral_texts())
        >>> det.save("detector.safetensors")
    """
    L = model.cfg.n_layers
    layers = tuple(sorted({l % L for l in layers}))
    if probe != "ensemble" and len(layers) != 1:
        raise DetectorError(f"a {probe} detector reads one layer; got {layers} (use probe='ensemble' for several)")
    if len(controls) < 2:
        raise DetectorError("need at least 2 control prompts to calibrate")
    acts = collect(
        model,
        [p.honest for p in pairs] + [p.lying for p in pairs],
        kinds=(kind,),
        batch_size=batch_size,
        progress=False,
    )[kind][:, list(layers)]
    m = len(pairs)
    X, y, idx = pair_rows(acts[:m], acts[m:])
    fitted = fit_probe(probe, X, y, pairs=idx, **hyperparameters)
    det = Detector(fitted, kind, layers, model.cfg.model_name, model_fingerprint(model), model.cfg.d_model, 0.0, fpr)
    ctrl = collect(model, list(controls), kinds=(kind,), batch_size=batch_size, progress=False)[kind][:, list(layers)]
    c = det.score_features(ctrl)
    thr = calibrate_threshold(c, fpr)
    train = det.score_features(X)
    info = {
        "n_train_pairs": m,
        "n_controls": len(controls),
        "train_recall_at_fpr": float((train[y == 1] > thr).float().mean()),
        "control_fpr": float((c > thr).float().mean()),
    }
    return Detector(fitted, kind, layers, model.cfg.model_name, det.model_hash, model.cfg.d_model, thr, fpr, info)


# ---------------------------------------------------------------------------------------------
# generalisation: train on one labelled set, test on another


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


def neutral_windows(min_words: int = 4, step: int = 3) -> tuple[list[str], list[str]]:
    """Control texts: prefixes of every neutral line (:func:`neutral_texts`) cut at word
    boundaries (``min_words``, ``min_words + step``, ..., and the whole line), with the line each
    came from (the independent unit: windows of one line are correlated).

    The state at a window's last token is the state from which the next word is chosen, as a
    generated answer token's is, so every window is a control for prompt- and answer-site probes.
    """
    texts, units = [], []
    for i, line in enumerate(neutral_texts()):
        words = line.split()
        cuts = list(range(min(min_words, len(words)), len(words), step)) + [len(words)]
        for c in sorted(set(cuts)):
            texts.append(" ".join(words[:c]))
            units.append(f"neutral/{i}")
    return texts, units


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
        groups: dict[str, list[int]] = {}
        for i, u in enumerate(units):
            groups.setdefault(u, []).append(i)
        idx = [torch.tensor(g) for g in groups.values()]
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


def calibrated_detector(
    model: HookedTransformer,
    probe: AnyProbe,
    kind: str,
    layers: Sequence[int],
    control: Float[Tensor, "n l d"],
    fpr: float = 0.01,
    info: dict | None = None,
) -> Detector:
    """A :class:`Detector` from an already fitted probe, its threshold calibrated on control
    features read at ``layers`` (``[n, len(layers), d]``)."""
    det = Detector(
        probe, kind, tuple(layers), model.cfg.model_name, model_fingerprint(model), model.cfg.d_model, 0.0, fpr
    )
    c = det.score_features(control)
    thr = calibrate_threshold(c, fpr)
    info = {**(info or {}), "n_controls": len(control), "control_fpr": float((c > thr).float().mean())}
    return Detector(probe, kind, tuple(layers), det.model_name, det.model_hash, det.d_model, thr, fpr, info)


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
