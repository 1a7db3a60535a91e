"""Lie detection that generalises: every probe kind, trained on one dataset, tested on the others.

1. Pairs of every relation (``--relations``, ``--n-pairs`` each, in every format of ``--fmt``); the
   model answers each honest prompt greedily and each lying prompt greedily and ``--k`` times by
   sampling, from one prompt pass (mechlie.read.labels). States are read from the generator: the final
   prompt token and the first generated answer token. Multi-token answers are kept; a generated
   answer is compared with the full truth.
2. Labelled sets (one split by fact for everything, so no test fact is ever trained on):
   *framing* labels (honest vs lying prompt at the final prompt token, known facts only) per
   source (relation, or relation/format) and pooled, with and without the known filter;
   *on-policy* labels (sampled lies vs sampled truths of the same lying prompts, at the answer
   token: no prompt-text difference) per source and pooled.
3. The layer, chosen on validation facts carved out of training, by two rules: on framing labels
   (difference of means; the prompt text is separable from early blocks on, so many layers score
   near AUROC 1) and on on-policy labels (``--layer-rule``, default: on-policy). The on-policy rule uses
   the reported probe (``--detector-probe``, default logistic: the saved and Apollo detectors'
   probe), not difference of means: per layer, its validation AUROC over ``--n-layer-splits`` split
   seeds of the training facts (mean, SD over seeds, and a 95% CI over validation facts pooled over
   seeds), the highest mean chosen, and the layers whose CI overlaps the chosen one's listed
   (``summary["layer_scan"]``; a "noise-level choice" when there are any). The difference-of-means
   layer is stored beside it. If the on-policy validation splits have too few lies or truths, the
   framing layer is used and the summary says so. Every probe kind is trained on every source and
   tested on every set at the chosen layer: AUROC with a 95% CI over test facts, next to a
   label-permutation null (labels permuted across facts) (``--n-null`` refits) and ``--n-random``
   random directions (95th percentiles). The default sources are the pooled sets (framing with and
   without the known filter, on-policy), tested on every set; ``--full-matrix`` also trains on every
   per-source framing and on-policy set. Leave-one-relation-out (LORO) gives each probe's transfer
   to relations it never saw, with framing and with on-policy labels; the key cells (framing vs
   on-policy, with and without the known filter) are repeated at the other rule's layer (difference
   of means and logistic only, for time).
4. Two detectors (``--detector-probe``): one on pooled on-policy labels at the on-policy layer (the
   answer token; saved as detector.safetensors) and one on pooled framing labels at the framing
   layer (the final prompt token; detector_framing.safetensors). Each threshold is calibrated on
   half of the controls (neutral-text windows, honest prompts of test facts and ``--n-control-prompts``
   honest prompts of other facts in every format), split by unit (line or fact); the other half
   gives the realised FPR. Recall at ``--fpr`` and at 5% on test lies, 95% CIs over facts.
   Per-token scores along generated answers are plotted. Each detector stores its position
   (``prompt_final`` or ``answer_first``) and scores there by default.
5. Apollo's protocol (:mod:`mechlie.studies.detection_apollo`): probes trained on framing labels
   (instructed pairs) or on-policy rows, read at the answer (first token, and the mean over the
   answer's tokens), calibrated on in-format controls (the model's own honest answers to other
   questions and its responses to ``--n-benign`` benign requests, in the run's format; neutral text
   as a second control): AUROC and recall at ``--fpr`` with CIs over facts, beside the surprisal
   baseline, and the mixed-facts cell.

Writes RUN/: summary.json, matrix.json, curves.json (per-token scores, LORO ROCs),
detector.safetensors, detector_framing.safetensors, detector_apollo.safetensors,
token_scores_{lying,honest}.{html,json} and figures/.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mechlie.read.probes import PROBES, probe_kinds
from mechlie.studies.base import RunFormatError, Study, StudyResult, register

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from transformer_lens import HookedTransformer

    from mechlie.core.cli import RunDir

log = logging.getLogger("mechlie")

DEFAULT_RELATIONS = ("capitals", "cities", "languages", "opposites", "numbers", "symbols")


@dataclass(frozen=True)
class Config:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "embedded name, .gguf, HF dir or TL name"})
    relations: tuple[str, ...] = field(default=DEFAULT_RELATIONS, metadata={"help": "built-in relations"})
    fmt: tuple[str, ...] = field(
        default=("fewshot",), metadata={"help": "prompt formats (instruct, fewshot, both); several = format sources"}
    )
    n_pairs: int = field(default=16, metadata={"help": "pairs sampled per relation and format"})
    k: int = field(default=3, metadata={"help": "sampled answers per lying prompt (on-policy labels)"})
    temperature: float = 1.0
    max_new_tokens: int = field(default=4, metadata={"help": "raised to the longest truth's token count"})
    probes: tuple[str, ...] = field(default=PROBES, metadata={"help": f"any registered probe kind, e.g. {PROBES}"})
    test_frac: float = 0.4
    layer_rule: str = field(
        default="on-policy", metadata={"help": "on-policy | framing: labels the layer is chosen on"}
    )
    n_layer_splits: int = field(
        default=5, metadata={"help": "split seeds of the training facts averaged to choose a layer (and its CI)"}
    )
    min_val_per_class: int = field(
        default=3, metadata={"help": "a validation split counts with at least this many lies and non-lies"}
    )
    full_matrix: bool = field(
        default=False, metadata={"help": "train on every per-source set too (default: pooled sources only)"}
    )
    n_null: int = field(
        default=200, metadata={"help": "label-permutation refits per cell (labels permuted across facts per relation)"}
    )
    n_random: int = field(default=200, metadata={"help": "random directions per cell"})
    n_boot: int = 500
    fpr: float = field(default=0.01, metadata={"help": "control false-positive rate of the saved detector"})
    n_control_prompts: int = field(
        default=64, metadata={"help": "honest prompts of facts outside the pairs, all formats, as controls"}
    )
    n_benign: int = field(
        default=64, metadata={"help": "benign requests asked in the run's format: in-format controls (Apollo)"}
    )
    detector_probe: str = "logistic"
    known_filter: bool = field(default=True, metadata={"help": "framing sets keep only facts the model knows"})
    grad_features: bool = field(
        default=False, metadata={"help": "also compare per-head z, z x grad(log P(truth)) and both (LORO, logistic)"}
    )
    seed: int = 0
    batch_size: int = field(default=16, metadata={"run": False})
    out_dir: str = "results/detect"
    run_name: str = ""

    def __post_init__(self) -> None:
        from mechlie.core.pairs import EXTRA_RELATIONS, FORMATS, RELATIONS

        relations = RELATIONS + EXTRA_RELATIONS
        kinds = probe_kinds()  # the registry now: a probe registered after import is accepted too
        bad = set(self.probes) - set(kinds)
        if bad or not self.probes:
            raise ValueError(f"unknown probes {sorted(bad)}; probes: {kinds}")
        if self.detector_probe not in kinds:
            raise ValueError(f"--detector-probe must be one of {kinds}")
        bad = set(self.relations) - set(relations)
        if bad or len(set(self.relations)) < 2:
            raise ValueError(f"need at least 2 relations from {relations}; unknown: {sorted(bad)}")
        if not self.fmt or set(self.fmt) - set(FORMATS) or len(set(self.fmt)) < len(self.fmt):
            raise ValueError(f"--fmt must be distinct values from {FORMATS}, got {self.fmt}")
        if self.layer_rule not in ("on-policy", "framing"):
            raise ValueError("--layer-rule must be 'on-policy' or 'framing'")
        if not 0 < self.fpr < 1 or not 0 < self.test_frac < 1:
            raise ValueError("--fpr and --test-frac must be in (0, 1)")
        for name in ("n_pairs", "n_boot", "n_random", "batch_size", "n_layer_splits", "min_val_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.k < 2 or self.max_new_tokens < 2 or self.n_null < 0 or self.n_control_prompts < 0:
            raise ValueError("--k and --max-new-tokens must be >= 2, --n-null and --n-control-prompts >= 0")
        if self.n_benign < 2:
            raise ValueError("--n-benign must be >= 2 (the in-format controls need benign responses)")


# ---------------------------------------------------------------------------------------------
# the computation


class _Laps:
    """Seconds per stage (``summary["time_s"]``)."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.timer: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        self.timer[name] = round(time.time() - self.t0 - sum(self.timer.values()), 1)

    def summary(self) -> dict:
        return {**self.timer, "generation": self.timer["generation"], "total": round(time.time() - self.t0, 1)}


def run(cfg: Config, model: HookedTransformer | None, run_dir: RunDir) -> DetectionResult:
    """Labels, sets and layers; the transfer matrix, LORO and key cells; two calibrated detectors;
    writes the run (see the module docstring)."""
    from mechlie.core.io import atomic_write_json
    from mechlie.read.directions import split_by_fact
    from mechlie.report import figures as figlib
    from mechlie.studies import detection_steps as steps
    from mechlie.studies.detection_apollo import apollo

    lap = _Laps()
    if model is None:
        from mechlie.core.models import load_model

        model = load_model(cfg.model, device="cpu")
    pairs, source, op = _pairs_and_labels(cfg, model, lap)
    split = split_by_fact([p.fact_id for p in pairs], cfg.test_frac, cfg.seed)
    train_facts = {pairs[i].fact_id for i in split.train}
    test_facts = {pairs[i].fact_id for i in split.test}
    sets, op_sets = steps.labelled_sets(op, source, train_facts, test_facts, cfg.known_filter)
    sources = list(dict.fromkeys(source))
    layers = _choose_layers(cfg, sets, sources)
    lap("sets and layer choice")
    t = _transfer(cfg, sets, op_sets, sources, layers, lap)
    ctl = steps.controls(model, cfg, pairs, op, test_facts)
    lap("controls")
    dets = _detectors(cfg, model, sets, ctl, op, test_facts, layers, run_dir)
    lap("detectors")
    apollo_out = apollo(model, cfg, op, train_facts, test_facts, layers["used_layer"], ctl["neutral"], run_dir.path)
    lap("apollo")
    if cfg.grad_features:
        t["grad_features"] = steps.grad_feature_comparison(model, pairs, op, sets, cfg, layers["used_layer"], t["kw"])
        lap("grad features")
    atomic_write_json(run_dir.file("curves.json"), steps.curves(model, pairs, test_facts, dets["main"], t["roc"]))
    lap("figures")
    atomic_write_json(
        run_dir.file("matrix.json"),
        {
            "layer": layers["used_layer"],
            "layers": layers["table"],
            "matrix": t["matrix"],
            "loro": t["loro"]["framing"],
            "loro_on_policy": t["loro"]["on-policy"],
            "key_cells": {str(lk): v for lk, v in t["key"].items()},
            "counts": op.counts(),
        },
    )
    summary = _summary(cfg, pairs, sources, op, sets, op_sets, train_facts, test_facts, layers, t, dets, ctl)
    summary["apollo"] = apollo_out
    summary["time_s"] = lap.summary()
    run_dir.write_json("summary.json", summary)  # the figures are drawn from the saved files
    summary = DetectionResult.load(run_dir.path).summary()
    summary["figures"] = figlib.save_figures(DetectionResult(run_dir.path, summary).figures(), run_dir.path)
    return DetectionResult(run_dir.path, summary)


def _pairs_and_labels(cfg: Config, model, lap: _Laps) -> tuple[list, list[str], object]:
    """Pairs of every relation and format, each with its source; the on-policy answers and states."""
    from mechlie.core.pairs import load_builtin
    from mechlie.read.labels import on_policy

    many_fmts = len(cfg.fmt) > 1
    pairs, source = [], []
    for fmt in cfg.fmt:
        for rel in cfg.relations:
            # Multi-token answers are kept: on-policy labels compare generated text with the full answer.
            got = load_builtin(rel, fmt, tokenizer=model.tokenizer, n=cfg.n_pairs, seed=cfg.seed, multi_token="keep")
            pairs += got
            source += [f"{rel}/{fmt}" if many_fmts else rel] * len(got)
    log.info("%d pairs from %s", len(pairs), ", ".join(dict.fromkeys(source)))
    lap("load")
    op = on_policy(
        model,
        pairs,
        k=cfg.k,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    lap("generation")
    return pairs, source, op


def _choose_layers(cfg: Config, sets: dict, sources: list[str]) -> dict:
    """The framing rule's layer (difference of means, :func:`mechlie.read.transfer.choose_layer`) and
    the on-policy rule's: the layer scan of the reported probe (``cfg.detector_probe``, the saved and
    Apollo detectors' probe) over ``n_layer_splits`` split seeds of the training facts, highest mean
    validation AUROC (:func:`mechlie.studies.detection_steps.layer_scan`, which gives each layer's
    CI); difference of means (its own split seeds ``seed .. seed + n - 1``) is kept beside it for
    comparison. The used layer is ``cfg.layer_rule``'s, the other is the other rule's."""
    import torch

    from mechlie.read.detector import DetectorError, choose_layer
    from mechlie.studies.detection_steps import layer_scan

    framing_layer, framing_val = choose_layer([sets[s][0] for s in sources], seed=cfg.seed, n_splits=cfg.n_layer_splits)
    op_train, mv = sets["on-policy"][0], cfg.min_val_per_class
    try:
        scan = layer_scan(
            op_train,
            cfg.detector_probe,
            n_splits=cfg.n_layer_splits,
            seed=cfg.seed,
            min_val_per_class=mv,
            n_boot=cfg.n_boot,
        )
        scan["diff_of_means_layer"] = choose_layer(
            [op_train], seed=cfg.seed, n_splits=cfg.n_layer_splits, min_val_per_class=mv
        )[0]
        op_layer, op_val = scan["layer"], torch.tensor(scan["mean"])
        op_rule = f"on-policy validation, {scan['fit']} (mean over {scan['n_seeds']} split seeds)"
    except DetectorError as e:
        log.warning("on-policy layer choice impossible (%s); using the framing layer", e)
        op_layer, op_val, op_rule = framing_layer, torch.full_like(framing_val, float("nan")), f"fallback: {e}"
        scan = {"probe": cfg.detector_probe, "layer": None, "fallback": str(e), "framing_layer": framing_layer}
    log.info("layer by framing labels: %d; by on-policy labels: %d (%s)", framing_layer, op_layer, op_rule)
    used = op_layer if cfg.layer_rule == "on-policy" else framing_layer
    return {
        "framing": framing_layer,
        "on-policy": op_layer,
        "used_layer": used,
        "other_layer": framing_layer if cfg.layer_rule == "on-policy" else op_layer,
        "val_auroc_layer": {"framing": float(framing_val[framing_layer]), "on-policy": float(op_val[op_layer])},
        "scan": scan,
        "table": {
            "framing": {"layer": framing_layer, "val_auroc": framing_val.tolist(), "rule": "framing validation"},
            "on-policy": {"layer": op_layer, "val_auroc": op_val.tolist(), "rule": op_rule},
            "used": cfg.layer_rule,
        },
    }


def _transfer(cfg: Config, sets: dict, op_sets: dict, sources: list[str], layers: dict, lap: _Laps) -> dict:
    """The transfer matrix, leave one relation out (framing and on-policy labels), and the key
    cells at both rules' layers."""
    from mechlie.read.detector import transfer_matrix
    from mechlie.studies import detection_steps as steps

    layer, other_layer = layers["used_layer"], layers["other_layer"]
    kw = dict(n_null=cfg.n_null, n_random=cfg.n_random, n_boot=cfg.n_boot, seed=cfg.seed)
    # Default sources: the pooled sets (cost); --full-matrix trains on every per-source set too.
    train_names = ["all", *(["all (no known filter)"] if cfg.known_filter else []), "on-policy"]
    if cfg.full_matrix:
        train_names = [*sources, *train_names, *op_sets]
    all_sets = {**sets, **op_sets}
    trains, tests = [all_sets[n][0] for n in train_names], [all_sets[n][1] for n in all_sets]
    matrix = transfer_matrix(trains, tests, cfg.probes, layer, **kw)
    lap("matrix")
    rel_sources = {r: [s for s in sources if s.split("/")[0] == r] for r in cfg.relations}
    loro, roc = {}, {}
    for label_kind, table, suffix in (("framing", sets, ""), ("on-policy", op_sets, " (on-policy)")):
        loro[label_kind], roc[label_kind] = steps.loro(cfg, table, rel_sources, suffix, layer, kw)
    lap("loro")
    key = {layer: steps.key_cells(matrix, steps.KEY_CELLS)}
    if other_layer != layer:
        srcs = list(dict.fromkeys(a for a, _ in steps.KEY_CELLS if a in sets))
        tsts = list(dict.fromkeys(b for _, b in steps.KEY_CELLS if b in sets))
        cheap = [k for k in cfg.probes if k in ("diff_of_means", "logistic")] or list(cfg.probes[:1])
        m2 = transfer_matrix([sets[a][0] for a in srcs], [sets[b][1] for b in tsts], cheap, other_layer, **kw)
        key[other_layer] = steps.key_cells(m2, steps.KEY_CELLS)
    lap("key cells at the other layer")
    return {"matrix": matrix, "loro": loro, "roc": roc, "key": key, "kw": kw}


def _detectors(cfg: Config, model, sets: dict, ctl: dict, op, test_facts: set, layers: dict, run_dir: RunDir) -> dict:
    """The framing detector (final prompt token) and, when the model told enough lies and truths
    apart, the on-policy one (answer token); both saved, the main one as detector.safetensors."""
    from mechlie.studies import detection_steps as steps

    det_framing = steps.calibrated_detector(
        model,
        cfg,
        sets["all"],
        ctl,
        layers["framing"],
        "prompt",
        {"greedy-lie prompts (test facts)": steps.greedy_lies(op, test_facts, "prompt")},
        "framing labels (honest vs lying prompt), known facts, all relations",
    )
    tr_op = sets["on-policy"][0]
    det_on_policy = None
    if min(int(tr_op.y.sum()), int((1 - tr_op.y).sum())) >= 2 and len(tr_op.pairs()) >= 2:
        det_on_policy = steps.calibrated_detector(
            model,
            cfg,
            sets["on-policy"],
            ctl,
            layers["on-policy"],
            "answer",
            {"greedy lies (test facts)": steps.greedy_lies(op, test_facts, "answer")},
            "on-policy labels (sampled lies vs truths of the same prompts), known facts, all relations",
        )
    else:  # the model told too few lies and truths apart: keep the framing detector, say so
        counts = steps.class_counts(tr_op)
        log.warning("too few on-policy training rows (%s); detector.safetensors is the framing one", counts)
    main_det = det_on_policy or det_framing

    def entry(d: dict, path: Path) -> dict:
        det = d["detector"]
        return {
            "path": str(path),
            "probe": cfg.detector_probe,
            "threshold": det.threshold,
            "fpr": cfg.fpr,
            **det.info,
            "calibration": d["calibration"],
        }

    return {
        "main": main_det["detector"],
        "detector": entry(main_det, main_det["detector"].save(run_dir.path / "detector.safetensors")),
        "detector_framing": entry(
            det_framing, det_framing["detector"].save(run_dir.path / "detector_framing.safetensors")
        ),
    }


def _summary(cfg, pairs, sources, op, sets, op_sets, train_facts, test_facts, layers, t, dets, ctl) -> dict:
    from mechlie.studies.detection_steps import class_counts

    counts = op.counts()
    lay = layers["used_layer"]
    strip = lambda table: {kk: {a: b for a, b in v.items() if a != "per_relation"} for kk, v in table.items()}  # noqa: E731
    summary = {
        "kind": "detection",
        "model": cfg.model,
        "relations": list(cfg.relations),
        "n_pairs": len(pairs),
        "sources": sources,
        "layer": lay,
        "layer_rule": cfg.layer_rule,
        "layers": {
            r: {kk: vv for kk, vv in v.items() if kk != "val_auroc"} if isinstance(v, dict) else v
            for r, v in layers["table"].items()
        },
        "val_auroc_layer": layers["val_auroc_layer"],
        "layer_scan": layers["scan"],
        "label_counts": counts["all"],
        "label_counts_per_relation": {r: v for r, v in counts.items() if r != "all"},
        "on_policy_rows": {
            n: {"train": class_counts(a), "test": class_counts(b)}
            for n, (a, b) in {"on-policy": sets["on-policy"], **op_sets}.items()
        },
        "train_facts": len(train_facts),
        "test_facts": len(test_facts),
        "loro": strip(t["loro"]["framing"]),
        "loro_on_policy": strip(t["loro"]["on-policy"]),
        "key_cells": t["key"][lay],
        "key_cells_other_layer": {
            "layer": layers["other_layer"],
            "cells": t["key"].get(layers["other_layer"], t["key"][lay]),
        },
        "detector": dets["detector"],
        "detector_framing": dets["detector_framing"],
        "n_controls": ctl["n"],
    }
    if "grad_features" in t:
        summary["grad_features"] = t["grad_features"]
    return summary


# ---------------------------------------------------------------------------------------------
# the result


class DetectionResult(StudyResult):
    """A detection run: ``summary.json``, ``matrix.json`` (the transfer matrix) and ``curves.json``."""

    study = "detection"
    required = ("model", "n_pairs", "layer", "loro", "loro_on_policy", "key_cells", "detector")

    @classmethod
    def load(cls, run_dir: str | Path) -> DetectionResult:
        res = super().load(run_dir)
        res.matrix()  # a run without its matrix is refused at load
        return res

    def _json(self, name: str) -> dict:
        import json

        path = self.run_dir / name
        if not path.is_file():
            raise RunFormatError(f"missing results file: {path}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunFormatError(f"{path} is not valid JSON ({e}); rerun the detection study") from e

    def matrix(self) -> dict:
        mx = self._json("matrix.json")
        if "matrix" not in mx:
            raise RunFormatError(f"{self.run_dir / 'matrix.json'} lacks ['matrix']: rerun the detection study")
        return mx

    def where(self) -> str:
        s = self._summary
        rels = s.get("relations") or self.config().get("relations") or "?"
        rels = "+".join(rels) if isinstance(rels, list) else str(rels)
        return f"{s['model']}, {rels}, n={s['n_pairs']} pairs, layer {s['layer']}"

    def title(self) -> str:
        return f"Lie detection: {self.where()}"

    def figures(self) -> dict[str, go.Figure]:
        from mechlie.studies import detection_figures as F

        curves = self._json("curves.json") if (self.run_dir / "curves.json").is_file() else {}
        return F.figures(self._summary, self.matrix(), curves, self.where())

    def captions(self) -> dict[str, str]:
        from mechlie.studies.detection_figures import captions

        return captions(self._summary, self.matrix())

    def headline(self) -> list[str]:
        from mechlie.studies.detection_figures import headline

        return headline(self._summary)

    def report(self) -> str:
        from mechlie.studies.detection_figures import report_text

        return report_text(self._summary, self.matrix())


STUDY = register(Study("detection", Config, run, DetectionResult, load_model=False))
