"""Lie detection that generalises: every probe kind, trained on one dataset, tested on the others.

    python analyses/detect.py                                   # default: under 5 minutes on 2 CPU cores
    python analyses/detect.py --probes logistic lat --relations capitals opposites numbers
    python analyses/detect.py --fmt fewshot instruct --full-matrix   # relation x format x label kind
    python analyses/detect.py --model gemma-3-270m --fpr 0.05

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
3. The layer, chosen on validation facts carved out of training (difference of means), by two
   rules: on framing labels (which picks layer 0: the prompt text is separable from the first
   block) and on on-policy labels (``--layer-rule``, default: on-policy; if the on-policy
   validation splits have too few lies or truths, the framing layer is used and the summary says
   so). Every probe kind is trained on every source and tested on every set at the chosen layer:
   AUROC with a 95% CI over test facts, next to a within-fact label-permutation null
   (``--n-null`` refits) and ``--n-random`` random directions (95th percentiles). The default
   sources are the pooled sets (framing with and without the known filter, on-policy), tested on
   every set; ``--full-matrix`` also trains on every per-source framing and on-policy set.
   Leave-one-relation-out (LORO) gives each probe's transfer to relations it never saw, with
   framing and with on-policy labels; the key cells (framing vs on-policy, with and without the
   known filter) are repeated at the other rule's layer (difference of means and logistic only,
   for time).
4. Two detectors (``--detector-probe``): one on pooled on-policy labels at the on-policy layer (the
   answer token; saved as detector.safetensors) and one on pooled framing labels at the framing
   layer (the final prompt token; detector_framing.safetensors). Each threshold is calibrated on
   half of the controls (neutral-text windows, honest prompts of test facts and ``--n-control-prompts``
   honest prompts of other facts in every format), split by unit (line or fact); the other half
   gives the realised FPR. Recall at ``--fpr`` and at 5% on test lies, 95% CIs over facts.
   Per-token scores along generated answers are plotted.

Writes results/detect/<run>/: summary.json, matrix.json, detector.safetensors,
detector_framing.safetensors, figures (matrix, roc, token_scores).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from mechlie.core.cli import RunDir, run_script

log = logging.getLogger("mechlie")

PROBE_KINDS = ("diff_of_means", "mass_mean", "logistic", "lat", "ccs", "ensemble")
DEFAULT_RELATIONS = ("capitals", "cities", "languages", "opposites", "numbers", "symbols")
CONTROL_FORMATS = ("instruct", "fewshot", "both")


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
    probes: tuple[str, ...] = field(default=PROBE_KINDS, metadata={"help": f"any of {PROBE_KINDS}"})
    test_frac: float = 0.4
    layer_rule: str = field(
        default="on-policy", metadata={"help": "on-policy | framing: labels the layer is chosen on"}
    )
    n_layer_splits: int = field(default=5, metadata={"help": "validation splits averaged to choose a layer"})
    min_val_per_class: int = field(
        default=3, metadata={"help": "a validation split counts with at least this many lies and non-lies"}
    )
    full_matrix: bool = field(
        default=False, metadata={"help": "train on every per-source set too (default: pooled sources only)"}
    )
    n_null: int = field(default=20, metadata={"help": "label-permutation refits per cell"})
    n_random: int = field(default=200, metadata={"help": "random directions per cell"})
    n_boot: int = 500
    fpr: float = field(default=0.01, metadata={"help": "control false-positive rate of the saved detector"})
    n_control_prompts: int = field(
        default=64, metadata={"help": "honest prompts of facts outside the pairs, all formats, as controls"}
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

        RELATIONS = RELATIONS + EXTRA_RELATIONS  # noqa: N806

        bad = set(self.probes) - set(PROBE_KINDS)
        if bad or not self.probes:
            raise ValueError(f"unknown probes {sorted(bad)}; probes: {PROBE_KINDS}")
        if self.detector_probe not in PROBE_KINDS:
            raise ValueError(f"--detector-probe must be one of {PROBE_KINDS}")
        bad = set(self.relations) - set(RELATIONS)
        if bad or len(set(self.relations)) < 2:
            raise ValueError(f"need at least 2 relations from {RELATIONS}; unknown: {sorted(bad)}")
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


def main(cfg: Config, run: RunDir) -> dict:
    import torch

    from mechlie.core.io import atomic_write_json
    from mechlie.core.models import load_model
    from mechlie.core.pairs import load_builtin
    from mechlie.read.detector import DetectorError, LabelledSet, choose_layer, transfer_matrix
    from mechlie.read.directions import split_by_fact
    from mechlie.read.labels import on_policy

    t0 = time.time()
    timer: dict[str, float] = {}

    def lap(name: str) -> None:
        timer[name] = round(time.time() - t0 - sum(timer.values()), 1)

    model = load_model(cfg.model, device="cpu")
    many_fmts = len(cfg.fmt) > 1
    pairs, source = [], []
    for fmt in cfg.fmt:
        for rel in cfg.relations:
            # Multi-token answers are kept: on-policy labels compare generated text with the full answer.
            got = load_builtin(rel, fmt, tokenizer=model.tokenizer, n=cfg.n_pairs, seed=cfg.seed, multi_token="keep")
            pairs += got
            source += [f"{rel}/{fmt}" if many_fmts else rel] * len(got)
    sources = list(dict.fromkeys(source))
    log.info("%d pairs from %s", len(pairs), ", ".join(sources))
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
    counts = op.counts()
    lap("generation")

    split = split_by_fact([p.fact_id for p in pairs], cfg.test_frac, cfg.seed)
    train_facts = {pairs[i].fact_id for i in split.train}
    test_facts = {pairs[i].fact_id for i in split.test}
    # Every set is built from the same OnPolicy rows; a pair belongs to one source.
    src_of_pair = source

    def both(s: LabelledSet) -> tuple[LabelledSet, LabelledSet]:
        return s.subset(train_facts), s.subset(test_facts)

    def framing_set(name: str, keep, known_only: bool) -> LabelledSet:
        mask = [keep(i) for i in range(len(pairs))]
        return LabelledSet(name, *op.framing_rows(known_only=known_only, pair_mask=mask))

    def on_policy_set(name: str, keep) -> LabelledSet:
        mask = [keep(i) for i in range(len(pairs))]
        return LabelledSet(name, *op.rows("within_prompt", site="answer", pair_mask=mask))

    kf = cfg.known_filter
    sets: dict[str, tuple[LabelledSet, LabelledSet]] = {}
    for s in sources:
        sets[s] = both(framing_set(s, lambda i, s=s: src_of_pair[i] == s, kf))
    sets["all"] = both(framing_set("all", lambda i: True, kf))
    if kf:
        sets["all (no known filter)"] = both(framing_set("all (no known filter)", lambda i: True, False))
    sets["on-policy"] = both(on_policy_set("on-policy", lambda i: True))
    op_sets = {}
    for s in sources:
        name = f"{s} (on-policy)"
        op_sets[name] = both(on_policy_set(name, lambda i, s=s: src_of_pair[i] == s))

    # -- layer choice: framing rule vs on-policy rule (validation facts of the training split) ---
    framing_layer, framing_val = choose_layer([sets[s][0] for s in sources], seed=cfg.seed, n_splits=cfg.n_layer_splits)
    try:
        op_layer, op_val = choose_layer(
            [sets["on-policy"][0]],
            seed=cfg.seed,
            n_splits=cfg.n_layer_splits,
            min_val_per_class=cfg.min_val_per_class,
        )
        op_rule = "on-policy validation"
    except DetectorError as e:
        log.warning("on-policy layer choice impossible (%s); using the framing layer", e)
        op_layer, op_val, op_rule = framing_layer, torch.full_like(framing_val, float("nan")), f"fallback: {e}"
    layer = op_layer if cfg.layer_rule == "on-policy" else framing_layer
    other_layer = framing_layer if cfg.layer_rule == "on-policy" else op_layer
    layers = {
        "framing": {"layer": framing_layer, "val_auroc": framing_val.tolist(), "rule": "framing validation"},
        "on-policy": {"layer": op_layer, "val_auroc": op_val.tolist(), "rule": op_rule},
        "used": cfg.layer_rule,
    }
    log.info("layer by framing labels: %d; by on-policy labels: %d (%s)", framing_layer, op_layer, op_rule)
    lap("sets and layer choice")

    # -- the matrix ------------------------------------------------------------------------------
    kw = dict(n_null=cfg.n_null, n_random=cfg.n_random, n_boot=cfg.n_boot, seed=cfg.seed)
    # Default sources: the pooled sets (cost); --full-matrix trains on every per-source set too.
    train_names = ["all", *(["all (no known filter)"] if kf else []), "on-policy"]
    if cfg.full_matrix:
        train_names = [*sources, *train_names, *op_sets]
    all_sets = {**sets, **op_sets}
    test_names = list(all_sets)
    matrix = transfer_matrix(
        [all_sets[n][0] for n in train_names], [all_sets[n][1] for n in test_names], cfg.probes, layer, **kw
    )
    lap("matrix")

    # -- leave one relation out, framing and on-policy labels -------------------------------------
    rel_sources = {r: [s for s in sources if s.split("/")[0] == r] for r in cfg.relations}
    loro, roc_scores = {}, {}
    for label_kind, table, suffix in (("framing", sets, ""), ("on-policy", op_sets, " (on-policy)")):
        loro[label_kind], roc_scores[label_kind] = _loro(cfg, table, rel_sources, suffix, layer, kw)
    lap("loro")

    # -- the key cells again at the other rule's layer ---------------------------------------------
    key_cells = [
        ("all", "all"),
        ("all", "on-policy"),
        ("on-policy", "on-policy"),
        ("on-policy", "all"),
        ("all (no known filter)", "all"),
        ("all (no known filter)", "on-policy"),
    ]
    key = {layer: _key_cells(matrix, key_cells)}
    if other_layer != layer:
        srcs = list(dict.fromkeys(a for a, _ in key_cells if a in sets))
        tests = list(dict.fromkeys(b for _, b in key_cells if b in sets))
        cheap = [k for k in cfg.probes if k in ("diff_of_means", "logistic")] or list(cfg.probes[:1])
        m2 = transfer_matrix([sets[a][0] for a in srcs], [sets[b][1] for b in tests], cheap, other_layer, **kw)
        key[other_layer] = _key_cells(m2, key_cells)
    lap("key cells at the other layer")

    # -- detectors: on-policy (answer token) and framing (final prompt token) ---------------------
    controls = _controls(model, cfg, pairs, op, test_facts)
    lap("controls")
    det_framing = _detector(
        model,
        cfg,
        sets["all"],
        controls,
        framing_layer,
        "prompt",
        {"greedy-lie prompts (test facts)": _greedy_lies(op, test_facts, "prompt")},
        "framing labels (honest vs lying prompt), known facts, all relations",
    )
    tr_op = sets["on-policy"][0]
    if min(int(tr_op.y.sum()), int((1 - tr_op.y).sum())) >= 2 and len(tr_op.pairs()) >= 2:
        det_on_policy = _detector(
            model,
            cfg,
            sets["on-policy"],
            controls,
            op_layer,
            "answer",
            {"greedy lies (test facts)": _greedy_lies(op, test_facts, "answer")},
            "on-policy labels (sampled lies vs truths of the same prompts), known facts, all relations",
        )
    else:  # the model told too few lies and truths apart: keep the framing detector, say so
        log.warning(
            "too few on-policy training rows (%s); detector.safetensors is the framing one", _class_counts(tr_op)
        )
        det_on_policy = None
    main_det = det_on_policy or det_framing
    det_path = main_det["detector"].save(run.path / "detector.safetensors")
    det_framing_path = det_framing["detector"].save(run.path / "detector_framing.safetensors")
    lap("detectors")

    summary_grad = None
    if cfg.grad_features:
        summary_grad = _grad_feature_comparison(model, pairs, op, sets, cfg, layer, kw)
        lap("grad features")

    fig_paths = _figures(
        model, cfg, run, pairs, test_facts, main_det["detector"], matrix, (train_names, test_names), roc_scores, layer
    )
    lap("figures")

    atomic_write_json(
        run.path / "matrix.json",
        {
            "layer": layer,
            "layers": layers,
            "matrix": matrix,
            "loro": loro["framing"],
            "loro_on_policy": loro["on-policy"],
            "key_cells": {str(lk): v for lk, v in key.items()},
            "counts": counts,
        },
    )

    def det_summary(d: dict, path) -> dict:
        det = d["detector"]
        return {
            "path": str(path),
            "probe": cfg.detector_probe,
            "threshold": det.threshold,
            "fpr": cfg.fpr,
            **det.info,
            "calibration": d["calibration"],
        }

    summary = {
        "model": cfg.model,
        "n_pairs": len(pairs),
        "sources": sources,
        "layer": layer,
        "layer_rule": cfg.layer_rule,
        "layers": {
            r: {kk: vv for kk, vv in v.items() if kk != "val_auroc"} if isinstance(v, dict) else v
            for r, v in layers.items()
        },
        "val_auroc_layer": {"framing": float(framing_val[framing_layer]), "on-policy": float(op_val[op_layer])},
        "label_counts": counts["all"],
        "label_counts_per_relation": {r: v for r, v in counts.items() if r != "all"},
        "on_policy_rows": {
            n: {"train": _class_counts(a), "test": _class_counts(b)}
            for n, (a, b) in {"on-policy": sets["on-policy"], **op_sets}.items()
        },
        "train_facts": len(train_facts),
        "test_facts": len(test_facts),
        "loro": {kk: {a: b for a, b in v.items() if a != "per_relation"} for kk, v in loro["framing"].items()},
        "loro_on_policy": {
            kk: {a: b for a, b in v.items() if a != "per_relation"} for kk, v in loro["on-policy"].items()
        },
        "key_cells": key[layer],
        "key_cells_other_layer": {"layer": other_layer, "cells": key.get(other_layer, key[layer])},
        "detector": det_summary(main_det, det_path),
        "detector_framing": det_summary(det_framing, det_framing_path),
        "n_controls": controls["n"],
        "time_s": {**timer, "generation": timer["generation"], "total": round(time.time() - t0, 1)},
        "figures": fig_paths,
    }
    if summary_grad is not None:
        summary["grad_features"] = summary_grad
    _print_table(matrix, loro, counts, summary, train_names, test_names)
    return summary


def _class_counts(s) -> dict:
    return {"lie": int(s.y.sum()), "not_lie": int((1 - s.y).sum()), "facts": len(set(s.facts))}


def _key_cells(matrix: dict, cells: list[tuple[str, str]]) -> dict:
    return {
        kind: {f"{a} -> {b}": rows[a][b] for a, b in cells if a in rows and b in rows[a]}
        for kind, rows in matrix.items()
    }


def _loro(cfg: Config, table: dict, rel_sources: dict, suffix: str, layer: int, kw: dict) -> tuple[dict, dict]:
    """Leave one relation out: train on the other relations' training facts, test on the held-out
    relation's test facts. Mean AUROC over held-out relations, its CI from the bootstrap draws."""
    import torch

    from mechlie.read.detector import LabelledSet, evaluate_transfer
    from mechlie.read.probes import ProbeError

    out, roc = {}, {}
    for kind in cfg.probes:
        cells, draws, pos, neg = {}, [], [], []
        for r in cfg.relations:
            train = [table[s + suffix][0] for o in cfg.relations if o != r for s in rel_sources[o]]
            test = [table[s + suffix][1] for s in rel_sources[r]]
            src = LabelledSet.concat(train, f"not {r}")
            tst = LabelledSet.concat(test, r)
            if min(int(src.y.sum()), int((1 - src.y).sum())) < 2 or len(src.pairs()) < 2:
                log.warning("LORO %s%s: too few training rows of one class without %s; skipped", kind, suffix, r)
                continue
            try:
                _, (cell,), (sc,), (dr,) = evaluate_transfer(src, [tst], kind, layer, **kw)
            except ProbeError as e:
                log.warning("LORO %s%s without %s: %s; skipped", kind, suffix, r, e)
                continue
            cells[r] = cell
            if dr is not None:
                draws.append(dr)
                y = tst.y
                # z-score per held-out relation so one ROC can pool them (relations sit at offsets)
                if (y == 0).sum() >= 2:  # a z-score needs two negative rows; else left out of the ROC
                    z = (sc - sc[y == 0].mean()) / sc[y == 0].std().clamp_min(1e-8)
                    pos.append(z[y == 1])
                    neg.append(z[y == 0])
        if not draws:
            continue
        mean_draws = torch.stack(draws).nanmean(0)
        lo, hi = torch.nanquantile(mean_draws, torch.tensor([0.025, 0.975])).tolist()
        aurocs = torch.tensor([c.auroc for c in cells.values()])
        out[kind] = {
            "mean_auroc": float(aurocs.nanmean()),
            "lo": lo,
            "hi": hi,
            "n_relations": int((~aurocs.isnan()).sum()),
            "null_shuffled_q95": float(torch.tensor([c.null_shuffled_q95 for c in cells.values()]).nanmean()),
            "null_random_q95": float(torch.tensor([c.null_random_q95 for c in cells.values()]).nanmean()),
            "per_relation": cells,
        }
        if pos:
            roc[kind] = (torch.cat(pos), torch.cat(neg))
    return out, roc


def _controls(model, cfg: Config, pairs, op, test_facts: set) -> dict:
    """Control rows (not lies) at both sites, with their independent unit: neutral-text windows
    (unit: the line), honest prompts of test facts (from the on-policy run) and
    ``n_control_prompts`` honest prompts of facts outside the pairs, cycling through every format
    (unit: the fact). The answer site is the first generated token's state (rows whose answer
    stopped after one token have none)."""
    import random

    import torch

    from mechlie.core.activations import collect
    from mechlie.core.pairs import load_builtin
    from mechlie.read.detector import neutral_windows
    from mechlie.read.labels import generate_with_states

    texts, units = neutral_windows()
    neutral = collect(model, texts, kinds=("resid_post",), progress=False, batch_size=4 * cfg.batch_size)["resid_post"]
    used = {p.fact_id for p in pairs}
    pool = []
    for rel in cfg.relations:
        for fmt in CONTROL_FORMATS:
            pool += [
                p
                for p in load_builtin(rel, fmt, tokenizer=model.tokenizer, seed=cfg.seed, multi_token="keep")
                if p.fact_id not in used
            ]
    rng = random.Random(f"{cfg.seed}/controls")
    extra = rng.sample(pool, min(cfg.n_control_prompts, len(pool)))
    idx = [i for i, p in enumerate(pairs) if p.fact_id in test_facts]
    hs = op.honest.states["resid_post"]
    prompt_X, answer_X = [hs[idx, 0]], [hs[idx, 1]] if hs.shape[1] > 1 else []
    prompt_u = [pairs[i].fact_id for i in idx]
    answer_ok = [op.honest.new_mask[idx, 1].bool()] if hs.shape[1] > 1 else []
    if extra:
        g = generate_with_states(
            model, [p.honest for p in extra], max_new_tokens=2, stop_strings=("\n",), batch_size=cfg.batch_size
        )
        st = g.states["resid_post"]
        prompt_X.append(st[:, 0])
        prompt_u += [f"control/{p.fact_id}" for p in extra]
        if st.shape[1] > 1:
            answer_X.append(st[:, 1])
            answer_ok.append(g.new_mask[:, 1].bool())
    honest_answer_units = prompt_u[: len(idx)] + [f"control/{p.fact_id}" for p in extra]
    ok = torch.cat(answer_ok) if answer_ok else torch.zeros(0, dtype=torch.bool)
    A = torch.cat(answer_X)[ok] if answer_X else neutral[:0]
    au = [u for u, o in zip(honest_answer_units, ok.tolist()) if o]
    out = {
        "prompt": (torch.cat([neutral, torch.cat(prompt_X)]), units + prompt_u),
        "answer": (torch.cat([neutral, A]), units + au),
    }
    out["n"] = {
        "neutral_windows": len(texts),
        "neutral_lines": len(set(units)),
        "honest_prompts_test_facts": len(idx),
        "honest_prompts_other_facts": len(extra),
        "prompt_site_total": len(out["prompt"][1]),
        "answer_site_total": len(out["answer"][1]),
    }
    log.info("controls: %s", out["n"])
    return out


def _greedy_lies(op, test_facts: set, site: str):
    X, y, facts = op.rows("vs_honest", site=site)
    sel = [i for i, (yy, f) in enumerate(zip(y.tolist(), facts)) if yy == 1 and f in test_facts]
    return X[sel], [facts[i] for i in sel]


def _detector(model, cfg: Config, train_test, controls: dict, layer: int, site: str, extra: dict, what: str) -> dict:
    """Fit ``cfg.detector_probe`` on the training rows; calibrate its threshold on half the
    controls at ``site``; report held-out FPR and recall (at ``cfg.fpr`` and 5%) with CIs."""
    from dataclasses import asdict, replace

    from mechlie.read.detector import Detector, held_out_calibration, model_fingerprint
    from mechlie.read.probes import fit_probe

    train, test = train_test
    L = model.cfg.n_layers
    layers = tuple(range(L)) if cfg.detector_probe == "ensemble" else (layer,)
    probe = fit_probe(cfg.detector_probe, train.X[:, list(layers)], train.y, pairs=train.pairs(), seed=cfg.seed)
    det = Detector(
        probe, "resid_post", layers, model.cfg.model_name, model_fingerprint(model), model.cfg.d_model, 0.0, cfg.fpr
    )
    CX, cu = controls[site]
    c = det.score_features(CX[:, list(layers)])
    pos = test.y == 1
    lies = {
        f"{test.name} lies (test facts)": (
            det.score_features(test.X[pos][:, list(layers)]),
            [f for f, p in zip(test.facts, pos.tolist()) if p],
        )
    }
    for name, (X, facts) in extra.items():
        lies[name] = (det.score_features(X[:, list(layers)]) if len(X) else X.new_zeros(0), facts)
    cal = {}
    honest = [i for i, u in enumerate(cu) if not u.startswith("neutral/")]
    for fpr, subset in [(f, None) for f in dict.fromkeys((cfg.fpr, 0.05))] + [(0.05, honest)]:
        # The last row calibrates on honest prompts only: do the neutral windows set the threshold?
        cc, uu = (c, cu) if subset is None else (c[subset], [cu[i] for i in subset])
        name = f"{fpr:g}" if subset is None else f"{fpr:g} (honest-prompt controls only)"
        h = held_out_calibration(cc, uu, lies, fpr, n_boot=cfg.n_boot, seed=cfg.seed)
        cal[name] = {
            "threshold": h.threshold,
            "n_calibration": h.n_calibration,
            "n_held_out": h.n_held_out,
            "held_out_fpr": asdict(h.held_out_fpr),
            "recall": {k: asdict(v) for k, v in h.recall.items()},
        }
    info = {
        "trained_on": what,
        "layer": layer,
        "site": site,
        "n_controls": len(cu),
        "n_train_rows": len(train.y),
        "held_out_fpr": cal[f"{cfg.fpr:g}"]["held_out_fpr"]["mean"],
    }
    return {"detector": replace(det, threshold=cal[f"{cfg.fpr:g}"]["threshold"], info=info), "calibration": cal}


def _grad_feature_comparison(model, pairs, op, sets, cfg, layer, kw) -> dict:
    """LORO logistic AUROC at ``layer`` from per-head features: ``z``, ``z x grad`` and both."""
    import torch

    from mechlie.core.activations import collect
    from mechlie.core.pairs import answer_set, tokenize
    from mechlie.read.detector import LabelledSet, evaluate_transfer
    from mechlie.read.probes import grad_features

    known = op.known.tolist()
    idx = [i for i, _ in enumerate(pairs) if known[i] or not cfg.known_filter]
    sel = [pairs[i] for i in idx]
    prompts = [p.honest for p in sel] + [p.lying for p in sel]
    ans = answer_set(model.tokenizer, sel, multi_token="first").truth
    ans = torch.cat([ans, ans])
    z = collect(model, prompts, kinds=("z",), progress=False, batch_size=cfg.batch_size)["z"][:, layer]
    zg = []
    for i in range(0, len(prompts), cfg.batch_size):
        b = tokenize(model, prompts[i : i + cfg.batch_size])
        g = grad_features(model, b.tokens, b.attention_mask, ans[i : i + cfg.batch_size], kinds=("z",))
        zg.append(g["z"][:, layer])
    zg = torch.cat(zg)
    y = torch.cat([torch.zeros(len(sel)), torch.ones(len(sel))])
    facts = [p.fact_id for p in sel] * 2
    rels = [p.relation for p in sel] * 2
    feats = {"z": z.flatten(1), "z x grad": zg.flatten(1), "z + z x grad": torch.cat([z.flatten(1), zg.flatten(1)], 1)}
    train_facts = set(sets["all"][0].facts) | set(
        sets["all (no known filter)"][0].facts if "all (no known filter)" in sets else []
    )
    out = {}
    for name, F in feats.items():
        F = (F / F.std(0).clamp_min(1e-8))[:, None]  # [n, 1, features]
        res = []
        for r in cfg.relations:
            tr = [i for i, f in enumerate(facts) if rels[i] != r and f in train_facts]
            te = [i for i, f in enumerate(facts) if rels[i] == r and f not in train_facts]
            src = LabelledSet("src", F[tr], y[tr], [facts[i] for i in tr])
            tst = LabelledSet(r, F[te], y[te], [facts[i] for i in te])
            _, (cell,), _, _ = evaluate_transfer(src, [tst], "logistic", 0, **{**kw, "n_null": min(kw["n_null"], 10)})
            res.append(cell)
        aur = torch.tensor([c.auroc for c in res])
        out[name] = {"loro_mean_auroc": float(aur.nanmean()), "per_relation": dict(zip(cfg.relations, res))}
        print(f"grad features, {name}: LORO mean AUROC {float(aur.nanmean()):.3f}")
    return out


def _roc_figure(roc: dict):
    import plotly.graph_objects as go

    fig = go.Figure([go.Scatter(x=f, y=t, mode="lines", name=k) for k, (f, t) in roc.items()])
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dash"}, name="chance"))
    fig.update_layout(
        title="ROC on held-out relations (LORO, scores z-scored per relation)",
        xaxis_title="false-positive rate",
        yaxis_title="true-positive rate",
        width=700,
        height=600,
    )
    return fig


def _figures(model, cfg: Config, run: RunDir, pairs, test_facts, det, matrix, names, roc_scores, layer) -> dict:
    """Per-token detector scores, the matrix heatmaps (``names`` = (train sets, test sets)), LORO ROCs."""
    import torch
    from sklearn.metrics import roc_curve

    from mechlie.report import plotting

    figs = {}
    # Per-token scores along generated answers to a few test lying prompts (the on-policy detector).
    test_pairs = [p for p in pairs if p.fact_id in test_facts][:4]
    tok = det.score(model, [p.lying for p in test_pairs], generate_tokens=8)
    traces = {}
    for i, p in enumerate(test_pairs):
        m = tok.token_mask[i].bool()
        traces[f"{p.truth} | {tok.texts[i]!r}"] = tok.tokens[i][m].tolist()
    width = max(len(v) for v in traces.values())
    traces = {k: v + [float("nan")] * (width - len(v)) for k, v in traces.items()}
    figs["token_scores"] = plotting.lines(
        range(width),
        traces,
        f"Detector score per generated token (lying prompts; {det.info['site']} site, threshold {det.threshold:.2f})",
        x_label="generated token (0 = chosen at the final prompt token)",
        y_label="score",
    )
    kinds = [k for k in cfg.probes if k in matrix]
    heat = [
        plotting.heatmap(
            torch.tensor(
                [[matrix[k][a][b].auroc if a in matrix[k] else float("nan") for b in names[1]] for a in names[0]]
            ),
            k,
            x_label="test set",
            y_label="train set",
            zmid=0.5,
            x_ticks=names[1],
            y_ticks=names[0],
        )
        for k in kinds
    ]
    figs["matrix"] = plotting.side_by_side(heat, kinds, f"Transfer AUROC, layer {layer}")
    roc = {}
    for label_kind, per_kind in roc_scores.items():
        for k, (pos, neg) in per_kind.items():
            fpr_, tpr_, _ = roc_curve([1] * len(pos) + [0] * len(neg), torch.cat([pos, neg]).numpy())
            roc[f"{k} ({label_kind})"] = (fpr_.tolist(), tpr_.tolist())
    figs["roc"] = _roc_figure(roc)
    return {name: plotting.save_figure(f, run.path / name) for name, f in figs.items()}


def _print_table(matrix, loro, counts, summary, train_names, test_names) -> None:
    ly = summary["layers"]
    print(f"\nlayer used: {summary['layer']} ({summary['layer_rule']} rule)")
    print(
        f"  framing rule: layer {ly['framing']['layer']} (validation AUROC {summary['val_auroc_layer']['framing']:.3f})"
    )
    print(
        f"  on-policy rule: layer {ly['on-policy']['layer']} (validation AUROC "
        f"{summary['val_auroc_layer']['on-policy']:.3f}; {ly['on-policy']['rule']})"
    )
    print("label counts (all relations):", counts["all"])
    for r, c in summary["label_counts_per_relation"].items():
        print(f"  {r}: {c}")
    for label_kind, table in loro.items():
        print(
            f"\nLeave-one-relation-out transfer, {label_kind} labels (mean over held-out relations, 95% CI over facts):"
        )
        print(f"{'probe':<14} {'AUROC':>22} {'shuffled q95':>13} {'random q95':>11} {'relations':>10}")
        for k, v in table.items():
            ci = f"{v['mean_auroc']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
            print(
                f"{k:<14} {ci:>22} {v['null_shuffled_q95']:>13.3f} {v['null_random_q95']:>11.3f} {v['n_relations']:>10}"
            )
    for k, rows in matrix.items():
        print(f"\n{k}: AUROC, rows = train set, columns = test set")
        print(" " * 22 + " ".join(f"{c[:9]:>9}" for c in test_names))
        for a in train_names:
            if a in rows:
                print(f"{a[:21]:<22}" + " ".join(f"{rows[a][c].auroc:>9.2f}" for c in test_names))
    for title, cells in (
        (f"layer {summary['layer']}", summary["key_cells"]),
        (f"layer {summary['key_cells_other_layer']['layer']}", summary["key_cells_other_layer"]["cells"]),
    ):
        print(f"\nframing vs on-policy labels, known filter, {title} (AUROC [95% CI]; shuffled / random null q95):")
        for k, kc in cells.items():
            for name, c in kc.items():
                ci = f"{c.auroc:.3f} [{c.lo:.3f}, {c.hi:.3f}]"
                nulls = f"{c.null_shuffled_q95:.3f} / {c.null_random_q95:.3f}"
                print(f"  {k:<14} {name:<36} {ci}  {nulls}  (n facts {c.n_target_facts})")
    for key in ("detector", "detector_framing"):
        d = summary[key]
        print(f"\n{key} ({d['probe']}, layer {d['layer']}, {d['site']} site, {d['n_controls']} controls):")
        for fpr, cal in d["calibration"].items():
            h = cal["held_out_fpr"]
            print(
                f"  target FPR {fpr}: threshold {cal['threshold']:.3f} on {cal['n_calibration']} controls; "
                f"held-out FPR {h['mean']:.3f} [{h['lo']:.3f}, {h['hi']:.3f}] on {cal['n_held_out']}"
            )
            for name, r in cal["recall"].items():
                print(f"    recall, {name}: {r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] (n facts {r['n']})")
    print(f"time: {summary['time_s']}")


if __name__ == "__main__":
    sys.exit(run_script(Config, main, doc=__doc__))
