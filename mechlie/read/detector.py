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

The model's identity is :func:`mechlie.core.models.model_id` (a SHA-256 of all its weights), kept
in the ``model_hash`` field, so applying a detector to another model or width is an error, not a
silent garbage score. Detectors saved before issue 18 hold the older fingerprint (a few rounded
weight rows) in that field: they load, but are refused as fitted on "another model"; refit them.
The file is one safetensors file: the probe's tensors plus a JSON header with everything else.

Whether a probe generalises (train on one labelled set, test on another) is
:mod:`mechlie.read.transfer`; its names are re-exported here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.core.activations import collect
from mechlie.core.io import ResultFileError, load_tensors, save_tensors
from mechlie.core.models import model_id
from mechlie.core.pairs import ContrastPair, PairError, neutral_lines
from mechlie.core.stats import Estimate
from mechlie.read.labels import generate_with_states
from mechlie.read.probes import AnyProbe, EnsembleProbe, fit_probe, pair_rows, probe_from_tensors
from mechlie.read.transfer import (  # noqa: F401  (re-exported: the generalisation half of detection)
    DetectorError,
    LabelledSet,
    TransferCell,
    bootstrap_auroc,
    choose_layer,
    evaluate_transfer,
    transfer_matrix,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectorScores:
    prompt: Float[Tensor, " n"]  # at the final prompt token
    tokens: Float[Tensor, "n steps"] | None = None  # per generated token (state that chose it)
    token_mask: Int[Tensor, "n steps"] | None = None  # 1 = a generated token
    texts: list[str] | None = None  # the generated continuations
    framing: Float[Tensor, " n"] | None = None  # for pairs: 0 honest prompt, 1 lying prompt


@dataclass(frozen=True)
class Detector:
    """A fitted probe, where it reads, the model it belongs to and its calibrated threshold.

    ``model_hash`` holds :func:`mechlie.core.models.model_id` of the fitted model (the field keeps its
    old name so saved files still load). A detector saved with the older fingerprint is refused by
    :meth:`check` as fitted on another model: refit it.
    """

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
        fp = model_id(model)
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
    kind: str = "resid_post",
    layers: Sequence[int] = (-1,),
    probe: str = "logistic",
    fpr: float = 0.01,
    batch_size: int = 16,
    **hyperparameters,
) -> Detector:
    """Fit a probe on honest/lying ``pairs`` (framing labels) and calibrate it on ``controls``.

    Args:
        pairs: training pairs (read at the final prompt token).
        controls: prompts that are *not* lies (honest prompts not used for training, neutral
            text: :func:`mechlie.core.pairs.neutral_lines`); the threshold flags a share ``fpr`` of them.
        layers: blocks to read (negative = from the end); one, unless ``probe="ensemble"``.
        probe: a probe kind of :mod:`mechlie.read.probes` (``ensemble`` reads every layer in ``layers``).

    Returns:
        A calibrated :class:`Detector`; ``info`` has the training recall at the threshold.

    Example:
        >>> det = fit_detector(model, train_pairs, [p.honest for p in held_out] + neutral_lines())
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
    det = Detector(fitted, kind, layers, model.cfg.model_name, model_id(model), model.cfg.d_model, 0.0, fpr)
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
    det = Detector(probe, kind, tuple(layers), model.cfg.model_name, model_id(model), model.cfg.d_model, 0.0, fpr)
    c = det.score_features(control)
    thr = calibrate_threshold(c, fpr)
    info = {**(info or {}), "n_controls": len(control), "control_fpr": float((c > thr).float().mean())}
    return Detector(probe, kind, tuple(layers), det.model_name, det.model_hash, det.d_model, thr, fpr, info)
