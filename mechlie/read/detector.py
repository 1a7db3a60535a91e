"""A lie detector you can keep: a probe, where it reads, which model, and a calibrated threshold.

A :class:`Detector` is a fitted probe (:mod:`mechlie.read.probes`) plus its site (activation kind and
layers) and the **position** it was fitted and calibrated at, the name and a fingerprint of the
model it was fitted on, and a threshold calibrated on *control* data so that a chosen share of the
controls (the false positive rate, FPR) scores above it. Apollo's deception probes (Goldowsky-Dill
et al. 2025) report recall at 1% FPR on control chat; :func:`fit_detector` reports the same figure.

Positions (:data:`POSITIONS`), all read from the states of :func:`mechlie.read.labels.generate_with_states`
(``states[:, s]`` is the state of the position that chose generated token ``s``):

- ``prompt_final``: the final prompt token (``states[:, 0]``; read with one forward pass), whose
  next-token prediction is the answer. No generation.
- ``answer_first``: the first generated answer token (``states[:, 1]``), the notes' "generated token
  itself". The answer is generated greedily.
- ``answer_mean``: the mean of the states over the generated answer tokens (Apollo's reading, which
  averages over the response): ``states[:, 1:]`` where a token was generated. The generator computes a
  state for every generated token but the last one, which is the stop (a newline, :data:`ANSWER_STOP`,
  or EOS) when the answer ended, so the mean covers exactly the answer's tokens; an answer cut at
  ``max_new_tokens`` leaves its last token out.

A row whose answer stopped before the position (no generated token there) scores NaN. The
detector stores the position and ``max_new_tokens`` it was calibrated with, and :meth:`Detector.score`
reads there by default, so a saved detector reproduces its calibration scores (test:
``tests/test_apollo.py``); a ``position=`` override is allowed and logged. Files saved before the
position was stored load as ``prompt_final`` (logged): that is where those detectors scored.

Scores point honest -> lying: higher = more likely a lie. :meth:`Detector.score_tokens` scores one
prompt and its generation (greedy, or given) token by token (teacher-forced, one forward pass);
:func:`mechlie.report.views.write_token_scores` saves the numbers and a circuitsvis colored-tokens view.

The model's identity is :func:`mechlie.core.models.model_id` (a SHA-256 of all its weights), kept
in the ``model_hash`` field, so applying a detector to another model or width is an error, not a
silent garbage score. Detectors saved before issue 18 hold the older fingerprint (a few rounded
weight rows) in that field: they load, but are refused as fitted on "another model"; refit them.
The file is one safetensors file: the probe's tensors (and the calibration scores) plus a JSON
header with everything else.

Whether a probe generalises (train on one labelled set, test on another) is
:mod:`mechlie.read.transfer`; its names are re-exported here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.core.activations import collect
from mechlie.core.generation import generate
from mechlie.core.hooks import hook_name
from mechlie.core.io import ResultFileError, load_tensors, save_tensors
from mechlie.core.models import model_id
from mechlie.core.pairs import ContrastPair, PairError, tokenize
from mechlie.read.calibration import (  # noqa: F401  (re-exported: detectors are calibrated with these)
    ControlRecall,
    HeldOutCalibration,
    calibrate_threshold,
    held_out_calibration,
    neutral_windows,
    recall_at_fpr,
)
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

POSITIONS: tuple[str, ...] = ("prompt_final", "answer_first", "answer_mean")
ANSWER_STOP: tuple[str, ...] = ("\n",)  # an answer ends at a newline (as mechlie.read.labels.on_policy's)


def check_position(position: str) -> str:
    if position not in POSITIONS:
        raise DetectorError(f"position must be one of {POSITIONS}, got {position!r}")
    return position


def position_features(
    states: Float[Tensor, "n steps l d"], new_mask: Int[Tensor, "n steps"], position: str
) -> tuple[Float[Tensor, "n l d"], Bool[Tensor, " n"]]:
    """Features at ``position`` from generator states (see the module docstring), and which rows
    have a state there (the others are NaN)."""
    check_position(position)
    n = states.shape[0]
    if position == "prompt_final":
        return states[:, 0], torch.ones(n, dtype=torch.bool)
    if states.shape[1] < 2:  # every answer stopped after one token: no answer-token state
        return torch.full_like(states[:, 0], float("nan")), torch.zeros(n, dtype=torch.bool)
    if position == "answer_first":
        ok = new_mask[:, 1].bool()
        return states[:, 1].masked_fill(~ok.view(n, 1, 1), float("nan")), ok
    m = new_mask[:, 1:].bool()
    count = m.sum(1)
    total = states[:, 1:].masked_fill(~m.view(*m.shape, 1, 1), 0.0).sum(1)
    ok = count > 0
    X = total / count.clamp_min(1).view(n, 1, 1).to(total.dtype)
    return X.masked_fill(~ok.view(n, 1, 1), float("nan")), ok


@dataclass(frozen=True)
class Readout:
    """Features of some prompts at one position; ``texts``: their greedy answers (answer positions)."""

    X: Float[Tensor, "n l d"]
    ok: Bool[Tensor, " n"]  # False: no state at the position (NaN features)
    position: str
    texts: list[str] | None = None


@torch.no_grad()
def read_at(
    model: HookedTransformer,
    prompts: Sequence[str],
    position: str,
    *,
    kind: str = "resid_post",
    layers: Sequence[int],
    max_new_tokens: int = 8,
    batch_size: int = 16,
) -> Readout:
    """Read ``kind`` at ``layers`` (block indices, ``>= 0``) at ``position`` of each prompt, generating
    the answer greedily (stopping at :data:`ANSWER_STOP`) when the position needs answer tokens.
    The one reading path of :meth:`Detector.score` and :func:`fit_detector`."""
    check_position(position)
    if len(prompts) == 0:
        raise PairError("nothing to read")
    layers = list(layers)
    if position == "prompt_final":
        X = collect(model, list(prompts), kinds=(kind,), batch_size=batch_size, progress=False)[kind][:, layers]
        return Readout(X, torch.ones(len(X), dtype=torch.bool), position)
    g = generate_with_states(
        model,
        list(prompts),
        kinds=(kind,),
        layers=layers,
        max_new_tokens=max_new_tokens,
        stop_strings=ANSWER_STOP,
        batch_size=batch_size,
    )
    X, ok = position_features(g.states[kind], g.new_mask, position)
    return Readout(X, ok, position, g.texts)


@dataclass(frozen=True)
class DetectorScores:
    scores: Float[Tensor, " n"]  # at ``position`` (NaN where a row has no state there)
    position: str
    texts: list[str] | None = None  # the greedy answers (answer positions)
    framing: Float[Tensor, " n"] | None = None  # for pairs: 0 honest prompt, 1 lying prompt


@dataclass(frozen=True)
class TokenScores:
    """One prompt and its answer scored token by token (:meth:`Detector.score_tokens`)."""

    tokens: list[str]  # decoded tokens: the prompt's, then the answer's
    scores: Float[Tensor, " t"]  # the detector's score of the state at each token
    n_prompt: int  # the first ``n_prompt`` tokens are the prompt
    answer: str
    position: str  # the detector's position
    position_score: float  # the score at that position (what :meth:`Detector.score` gives)
    threshold: float
    model_name: str

    @property
    def flagged(self) -> bool:
        return self.position_score > self.threshold

    def to_json(self) -> dict:
        return {
            "model": self.model_name,
            "tokens": self.tokens,
            "scores": [None if s != s else s for s in self.scores.tolist()],
            "n_prompt": self.n_prompt,
            "answer": self.answer,
            "position": self.position,
            "position_score": self.position_score,
            "threshold": self.threshold,
            "flagged": self.flagged,
        }


@dataclass(frozen=True)
class Detector:
    """A fitted probe, where it reads (kind, layers, position), the model it belongs to and its
    calibrated threshold.

    ``model_hash`` holds :func:`mechlie.core.models.model_id` of the fitted model (the field keeps its
    old name so saved files still load). A detector saved with the older fingerprint is refused by
    :meth:`check` as fitted on another model: refit it. ``control_scores`` are the scores the
    threshold was calibrated on (saved with the file); :meth:`score` on the same control prompts
    gives them back.
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
    position: str = "prompt_final"  # where it was fitted and calibrated (POSITIONS)
    max_new_tokens: int = 8  # answer length generated for the answer positions
    control_scores: Float[Tensor, " c"] | None = None  # the calibration scores

    def __post_init__(self) -> None:
        check_position(self.position)
        if self.max_new_tokens < 2:
            raise DetectorError("max_new_tokens must be >= 2 (an answer-token state needs two generated tokens)")

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
        position: str | None = None,
        batch_size: int = 16,
    ) -> DetectorScores:
        """Score prompts (or both prompts of each pair: honest first, then lying) at the detector's
        position, generating the answer greedily when the position needs answer tokens.

        Args:
            inputs: prompt strings, or :class:`ContrastPair` s (``framing`` says which is which).
            position: read elsewhere than where the detector was fitted (logged: the threshold was
                calibrated at its own position, so it means little elsewhere).

        Returns:
            :class:`DetectorScores`: a score per prompt (NaN where the answer stopped before the
            position) and, at answer positions, the generated answers.

        Example:
            >>> det = Detector.load("detector.safetensors")
            >>> det.score(model, ["Q: What is the capital of France?\\nA:"]).scores
        """
        self.check(model)
        if len(inputs) == 0:
            raise PairError("nothing to score")
        position = check_position(position or self.position)
        if position != self.position:
            log.info("scoring at %s, not at %s where this detector was fitted and calibrated", position, self.position)
        framing = None
        if all(isinstance(x, ContrastPair) for x in inputs):
            prompts = [p.honest for p in inputs] + [p.lying for p in inputs]
            framing = torch.cat([torch.zeros(len(inputs)), torch.ones(len(inputs))])
        elif all(isinstance(x, str) for x in inputs):
            prompts = list(inputs)
        else:
            raise DetectorError("inputs must be all prompt strings or all ContrastPairs")
        r = read_at(
            model,
            prompts,
            position,
            kind=self.kind,
            layers=self.layers,
            max_new_tokens=self.max_new_tokens,
            batch_size=batch_size,
        )
        return DetectorScores(self.score_features(r.X), position, r.texts, framing)

    @torch.no_grad()
    def score_tokens(self, model: HookedTransformer, prompt: str, generation: str | None = None) -> TokenScores:
        """Score every token of ``prompt`` and of its answer: ``generation`` if given, else the greedy
        answer (``max_new_tokens``, stopping at a newline), in one teacher-forced forward pass.

        ``position_score`` is the score at the detector's position, over the same tokens as
        :meth:`score`: a generated answer's tokens but the last (the stop, or a token cut at
        ``max_new_tokens``: the generator computes no state for it); a given ``generation``'s tokens,
        all of them (it has no stop token).

        Example:
            >>> ts = det.score_tokens(model, "Q: What is the capital of France?\\nA:")
            >>> write_token_scores(ts, "out/")  # mechlie.report.views: JSON + circuitsvis HTML
        """
        self.check(model)
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise DetectorError("score_tokens needs a model with a tokenizer")
        p = tokenize(model, [prompt]).tokens[0].cpu()
        if generation is None:
            g = generate(model, [prompt], max_new_tokens=self.max_new_tokens, stop_strings=ANSWER_STOP)
            ids = g.tokens[0][g.new_mask[0].bool()]
            answer, n_answer = g.texts[0], max(len(ids) - 1, 0)
        else:
            ids = torch.tensor(tok.encode(generation, add_special_tokens=False), dtype=torch.long)
            answer, n_answer = generation, len(ids)
        full = torch.cat([p, ids])
        if len(full) > model.cfg.n_ctx:
            raise PairError(f"prompt + answer ({len(full)} tokens) exceed the model context ({model.cfg.n_ctx})")
        kept: dict[int, Tensor] = {}
        hooks = [
            (hook_name(self.kind, l), lambda a, hook, l=l: kept.__setitem__(l, a[0].float().cpu())) for l in self.layers
        ]
        with model.hooks(fwd_hooks=hooks):
            model(full[None].to(model.cfg.device))
        st = torch.stack([kept[l] for l in self.layers], 1)  # [t, l, d]
        P = len(p)
        if self.position == "prompt_final":
            feat = st[P - 1]
        elif n_answer == 0:
            feat = torch.full_like(st[0], float("nan"))
        else:
            feat = st[P] if self.position == "answer_first" else st[P : P + n_answer].mean(0)
        return TokenScores(
            tokens=[tok.decode([i]) for i in full.tolist()],
            scores=self.score_features(st),
            n_prompt=P,
            answer=answer,
            position=self.position,
            position_score=float(self.score_features(feat[None])[0]),
            threshold=self.threshold,
            model_name=self.model_name,
        )

    def flag(self, scores: Tensor) -> Tensor:
        """``scores > threshold``: flagged as a lie (NaN is never flagged)."""
        return scores > self.threshold

    # -- saving ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """One safetensors file (written atomically): probe tensors, calibration scores + JSON header."""
        tensors, probe_meta = self.probe.to_tensors()
        header = {k: v for k, v in asdict(self).items() if k not in ("probe", "control_scores")}
        header["layers"] = list(self.layers)
        saved = {"probe": tensors}
        if self.control_scores is not None:
            saved["control_scores"] = self.control_scores.float().contiguous()
        return save_tensors(path, saved, {"mechlie_detector": header, "probe": probe_meta})

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
        if "position" not in header:
            # Saved before the position was stored: those detectors always scored the final prompt token.
            log.info("%s stores no position (saved before it was stored): it scores at prompt_final", path)
            header["position"] = "prompt_final"
        return cls(
            probe=probe_from_tensors(tensors["probe"], meta["probe"]),
            control_scores=tensors.get("control_scores"),
            **header,
        )


# ---------------------------------------------------------------------------------------------
# fitting


def fit_detector(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    controls: Sequence[str],
    *,
    kind: str = "resid_post",
    layers: Sequence[int] = (-1,),
    probe: str = "logistic",
    fpr: float = 0.01,
    position: str = "prompt_final",
    max_new_tokens: int = 8,
    batch_size: int = 16,
    **hyperparameters,
) -> Detector:
    """Fit a probe on honest/lying ``pairs`` (framing labels) at ``position`` and calibrate it on
    ``controls`` at the same position.

    Args:
        pairs: training pairs. At an answer position each prompt's greedy answer is generated and
            read (Apollo's instructed pairs: the honest and the lying prompt's own answers); a pair
            where either answer stopped before the position is left out (logged).
        controls: prompts that are *not* lies (honest prompts not used for training, benign requests,
            neutral text: :func:`mechlie.core.pairs.neutral_lines`); the threshold flags a share ``fpr``
            of them. Their scores are kept in ``control_scores``.
        layers: blocks to read (negative = from the end); one, unless ``probe="ensemble"``.
        probe: a probe kind of :mod:`mechlie.read.probes` (``ensemble`` reads every layer in ``layers``).
        position: one of :data:`POSITIONS`; ``max_new_tokens`` bounds the generated answer.

    Returns:
        A calibrated :class:`Detector`; ``info`` has the training recall at the threshold.

    Example:
        >>> det = fit_detector(model, train_pairs, [p.honest for p in held_out] + neutral_lines(),
        ...                    position="answer_mean")
        >>> det.save("detector.safetensors")
    """
    check_position(position)
    L = model.cfg.n_layers
    layers = tuple(sorted({l % L for l in layers}))
    if probe != "ensemble" and len(layers) != 1:
        raise DetectorError(f"a {probe} detector reads one layer; got {layers} (use probe='ensemble' for several)")
    if len(controls) < 2:
        raise DetectorError("need at least 2 control prompts to calibrate")

    def read(prompts: list[str]) -> Readout:
        kw = dict(kind=kind, layers=layers, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return read_at(model, prompts, position, **kw)

    r = read([p.honest for p in pairs] + [p.lying for p in pairs])
    m = len(pairs)
    keep = (r.ok[:m] & r.ok[m:]).nonzero().flatten()
    if len(keep) < m:
        log.warning("fit_detector: left out %d of %d pairs whose answer stopped before %s", m - len(keep), m, position)
    if len(keep) < 2:
        raise DetectorError(f"fewer than 2 pairs have a state at {position}: nothing to fit")
    X, y, idx = pair_rows(r.X[:m][keep], r.X[m:][keep])
    fitted = fit_probe(probe, X, y, pairs=idx, **hyperparameters)
    det = Detector(
        fitted, kind, layers, model.cfg.model_name, model_id(model), model.cfg.d_model, 0.0, fpr, {}, position
    )
    det = replace(det, max_new_tokens=max_new_tokens)
    c = det.score_features(read(list(controls)).X)
    thr = calibrate_threshold(c, fpr)
    train = det.score_features(X)
    info = {
        "n_train_pairs": len(keep),
        "n_controls": int(torch.isfinite(c).sum()),
        "n_controls_without_state": int((~torch.isfinite(c)).sum()),
        "train_recall_at_fpr": float((train[y == 1] > thr).float().mean()),
        "control_fpr": float((c[torch.isfinite(c)] > thr).float().mean()),
    }
    return replace(det, threshold=thr, info=info, control_scores=c)


def calibrated_detector(
    model: HookedTransformer,
    probe: AnyProbe,
    kind: str,
    layers: Sequence[int],
    control: Float[Tensor, "n l d"],
    fpr: float = 0.01,
    info: dict | None = None,
    *,
    position: str = "prompt_final",
    max_new_tokens: int = 8,
) -> Detector:
    """A :class:`Detector` from an already fitted probe, its threshold calibrated on control
    features read at ``layers`` (``[n, len(layers), d]``) and ``position`` (rows of NaN features,
    without a state there, are left out of the threshold)."""
    det = Detector(
        probe, kind, tuple(layers), model.cfg.model_name, model_id(model), model.cfg.d_model, 0.0, fpr, {}, position
    )
    det = replace(det, max_new_tokens=max_new_tokens)
    c = det.score_features(control)
    thr = calibrate_threshold(c, fpr)
    fin = torch.isfinite(c)
    info = {**(info or {}), "n_controls": int(fin.sum()), "control_fpr": float((c[fin] > thr).float().mean())}
    return replace(det, threshold=thr, info=info, control_scores=c)
