"""The steps of the detection study (:mod:`mechlie.studies.detection`): labelled sets, leave one
relation out, the control rows, the calibrated detectors, the per-head gradient features, and
the curves its figures are drawn from; the layer scan (the reported probe's validation AUROC per layer over
split seeds, with CIs) that chooses the on-policy read layer."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from mechlie.read.detector import LabelledSet

log = logging.getLogger("mechlie")

CONTROL_FORMATS = ("instruct", "fewshot", "both")

KEY_CELLS = [
    ("all", "all"),
    ("all", "on-policy"),
    ("on-policy", "on-policy"),
    ("on-policy", "all"),
    ("all (no known filter)", "all"),
    ("all (no known filter)", "on-policy"),
]


def class_counts(s: LabelledSet) -> dict:
    return {"lie": int(s.y.sum()), "not_lie": int((1 - s.y).sum()), "facts": len(set(s.facts))}


def key_cells(matrix: dict, cells: list[tuple[str, str]]) -> dict:
    return {
        kind: {f"{a} -> {b}": rows[a][b] for a, b in cells if a in rows and b in rows[a]}
        for kind, rows in matrix.items()
    }


def labelled_sets(op, source: list[str], train_facts: set, test_facts: set, known_filter: bool) -> tuple[dict, dict]:
    """Every labelled set as (train, test) by fact: framing per source and pooled (with and without
    the known filter), on-policy pooled; and the per-source on-policy sets. All are built from
    the same OnPolicy rows; a pair belongs to one source."""
    from mechlie.read.detector import LabelledSet

    n = len(source)
    # The permutation null shuffles labels across the facts of one relation, so every set carries
    # the relation of each row (a pooled set would otherwise be shuffled as one group).
    rel_of = {p.fact_id: p.relation for p in op.pairs}

    def labelled(name: str, rows: tuple) -> LabelledSet:
        X, y, facts = rows
        return LabelledSet(name, X, y, facts, [rel_of[f] for f in facts])

    def both(s: LabelledSet) -> tuple[LabelledSet, LabelledSet]:
        return s.subset(train_facts), s.subset(test_facts)

    def framing_set(name: str, keep: Callable[[int], bool], known_only: bool) -> LabelledSet:
        return labelled(name, op.framing_rows(known_only=known_only, pair_mask=[keep(i) for i in range(n)]))

    def on_policy_set(name: str, keep: Callable[[int], bool]) -> LabelledSet:
        mask = [keep(i) for i in range(n)]
        return labelled(name, op.rows("within_prompt", site="answer", pair_mask=mask, allow_empty=True))

    sources = list(dict.fromkeys(source))
    sets: dict[str, tuple[LabelledSet, LabelledSet]] = {}
    for s in sources:
        sets[s] = both(framing_set(s, lambda i, s=s: source[i] == s, known_filter))
    sets["all"] = both(framing_set("all", lambda i: True, known_filter))
    if known_filter:
        sets["all (no known filter)"] = both(framing_set("all (no known filter)", lambda i: True, False))
    sets["on-policy"] = both(on_policy_set("on-policy", lambda i: True))
    op_sets = {}
    for s in sources:
        name = f"{s} (on-policy)"
        op_sets[name] = both(on_policy_set(name, lambda i, s=s: source[i] == s))
    return sets, op_sets


def loro(cfg: Any, table: dict, rel_sources: dict, suffix: str, layer: int, kw: dict) -> tuple[dict, dict]:
    """Leave one relation out, per probe kind: for each held-out relation, train on *all* facts
    (both splits) of every other relation and score *all* facts of the held-out one (none of them
    is trained on, so every one is usable). The layer is the caller's: it was chosen on validation
    facts of the training split of every relation, the held-out one's included (one integer, by
    difference of means; its test-split facts were never seen).

    Nulls (:func:`mechlie.read.transfer.transfer_run`, ``kw``): each fold's probe refitted on labels
    permuted across the facts of each training relation, and random directions oriented on the
    fold's training labels (the same directions in every fold, by seed, so a draw's mean over
    relations is one random direction's held-out mean: a wider, more cautious null than independent
    directions per fold); the bar is the 95th percentile of the per-draw mean over held-out
    relations (:func:`_loro_summary`). Also returns per probe the z-scored held-out scores (lies,
    not lies) for one pooled ROC."""
    import torch

    from mechlie.read.detector import LabelledSet
    from mechlie.read.probes import ProbeError
    from mechlie.read.transfer import transfer_run

    def relation_set(r: str) -> LabelledSet:
        parts = [part.with_relation(r) for s in rel_sources[r] for part in table[s + suffix]]
        return LabelledSet.concat(parts, r)

    sets = {r: relation_set(r) for r in cfg.relations if rel_sources.get(r)}
    out, roc = {}, {}
    for kind in cfg.probes:
        folds, pos, neg = {}, [], []
        for r, tst in sets.items():
            src = LabelledSet.concat([sets[o] for o in sets if o != r], f"not {r}")
            if min(int(src.y.sum()), int((1 - src.y).sum())) < 2 or len(src.pairs()) < 2:
                log.warning("LORO %s%s: too few training rows of one class without %s; skipped", kind, suffix, r)
                continue
            try:
                run = transfer_run(src, [tst], kind, layer, **kw)
            except ProbeError as e:
                log.warning("LORO %s%s without %s: %s; skipped", kind, suffix, r, e)
                continue
            folds[r] = (run.cells[0], run.draws[0], run.null_shuffled[0], run.null_random[0])
            sc, y = run.scores[0], tst.y
            # z-score per held-out relation so one ROC can pool them (relations sit at offsets)
            if run.draws[0] is not None and (y == 0).sum() >= 2:  # a z-score needs two negative rows
                z = (sc - sc[y == 0].mean()) / sc[y == 0].std().clamp_min(1e-8)
                pos.append(z[y == 1])
                neg.append(z[y == 0])
        if not any(f[1] is not None for f in folds.values()):
            continue
        out[kind] = _loro_summary(folds, n_boot=kw.get("n_boot", 500), seed=kw.get("seed", 0))
        if pos:
            roc[kind] = (torch.cat(pos), torch.cat(neg))
    return out, roc


def _loro_summary(folds: dict, *, n_boot: int = 500, seed: int = 0) -> dict:
    """One probe's LORO summary from ``folds[relation] = (cell, fact-bootstrap draws, permutation-null
    AUROCs, random-direction AUROCs)``; relations whose held-out rows lack a class are left out.

    - ``mean_auroc``: the mean held-out AUROC over relations; ``lo``/``hi``: its 95% CI over
      relations (percentile bootstrap, ``n_boot`` resamples of the relations); ``lo_facts``/
      ``hi_facts``: its 95% CI over facts (each relation's fact bootstrap, averaged per draw).
    - ``null_*_q95``/``null_*_mean``: the 95th percentile and mean, over null draws, of the
      per-draw mean over held-out relations (draw ``j`` of every relation averaged; relations
      with fewer draws cut every relation to the smallest count, ``n_*_draws``). NaN when a
      relation has no such null (``ccs`` has no permutation null).
    - ``per_relation``: each relation's cell (AUROC with a CI over its facts, its own nulls).
    """
    import torch

    ok = {r: f for r, f in folds.items() if f[1] is not None}
    aurocs = torch.tensor([f[0].auroc for f in ok.values()])
    g = torch.Generator().manual_seed(seed)
    boot = aurocs[torch.randint(0, len(aurocs), (n_boot, len(aurocs)), generator=g)].mean(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975])).tolist()
    lo_f, hi_f = torch.nanquantile(torch.stack([f[1] for f in ok.values()]).nanmean(0), torch.tensor([0.025, 0.975]))
    out = {
        "mean_auroc": float(aurocs.mean()),
        "lo": lo,
        "hi": hi,
        "ci_over": "relations",
        "lo_facts": float(lo_f),
        "hi_facts": float(hi_f),
        "n_relations": len(ok),
    }
    for name, i in (("shuffled", 2), ("random", 3)):
        draws = [f[i] for f in ok.values()]
        if any(d is None or not len(d) for d in draws):
            out |= {f"null_{name}_q95": float("nan"), f"null_{name}_mean": float("nan"), f"n_{name}_draws": 0}
            continue
        m = min(len(d) for d in draws)
        per_draw = torch.stack([d[:m] for d in draws]).mean(0)
        out |= {
            f"null_{name}_q95": float(torch.quantile(per_draw, 0.95)),
            f"null_{name}_mean": float(per_draw.mean()),
            f"n_{name}_draws": m,
        }
    out["per_relation"] = {r: f[0] for r, f in folds.items()}
    return out


def controls(model, cfg: Any, pairs, op, test_facts: set) -> dict:
    """Control rows (not lies) at both sites, with their independent unit: neutral-text windows
    (unit: the line), honest prompts of test facts (from the on-policy run) and
    ``n_control_prompts`` honest prompts of facts outside the pairs, cycling through every format
    (unit: the fact). The answer site is the first generated token's state (rows whose answer
    stopped after one token have none)."""
    import torch

    from mechlie.core.activations import collect
    from mechlie.read.detector import neutral_windows

    texts, units = neutral_windows()
    neutral = collect(model, texts, kinds=("resid_post",), progress=False, batch_size=4 * cfg.batch_size)["resid_post"]
    extra = _other_facts(model, cfg, pairs)
    idx = [i for i, p in enumerate(pairs) if p.fact_id in test_facts]
    hs = op.honest.states["resid_post"]
    prompt_X, answer_X = [hs[idx, 0]], [hs[idx, 1]] if hs.shape[1] > 1 else []
    prompt_u = [pairs[i].fact_id for i in idx]
    answer_ok = [op.honest.new_mask[idx, 1].bool()] if hs.shape[1] > 1 else []
    if extra:
        from mechlie.read.labels import generate_with_states

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
        "neutral": (neutral, units),  # Apollo's second control (mechlie.studies.detection_apollo)
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


def _other_facts(model, cfg: Any, pairs) -> list:
    """``n_control_prompts`` pairs (seeded) of facts outside ``pairs``, in every control format."""
    import random

    from mechlie.core.pairs import load_builtin

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
    return rng.sample(pool, min(cfg.n_control_prompts, len(pool)))


def greedy_lies(op, test_facts: set, site: str):
    X, y, facts = op.rows("vs_honest", site=site, allow_empty=True)
    sel = [i for i, (yy, f) in enumerate(zip(y.tolist(), facts)) if yy == 1 and f in test_facts]
    return X[sel], [facts[i] for i in sel]


def calibrated_detector(
    model, cfg: Any, train_test, controls: dict, layer: int, site: str, extra: dict, what: str
) -> dict:
    """Fit ``cfg.detector_probe`` on the training rows; calibrate its threshold on half the
    controls at ``site``; report held-out FPR and recall (at ``cfg.fpr`` and 5%) with CIs."""
    from dataclasses import asdict, replace

    from mechlie.core.models import model_id
    from mechlie.read.detector import Detector, held_out_calibration
    from mechlie.read.probes import fit_probe

    train, test = train_test
    layers = tuple(range(model.cfg.n_layers)) if cfg.detector_probe == "ensemble" else (layer,)
    probe = fit_probe(cfg.detector_probe, train.X[:, list(layers)], train.y, pairs=train.pairs(), seed=cfg.seed)
    # The site's position: "prompt" is the final prompt token, "answer" the first generated answer token.
    position = {"prompt": "prompt_final", "answer": "answer_first"}[site]
    det = Detector(
        probe,
        "resid_post",
        layers,
        model.cfg.model_name,
        model_id(model),
        model.cfg.d_model,
        0.0,
        cfg.fpr,
        {},
        position,
    )
    det = replace(det, max_new_tokens=cfg.max_new_tokens)  # answer_first reads token 0: any length >= 2 gives it
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


def grad_feature_comparison(model, pairs, op, sets, cfg: Any, layer: int, kw: dict) -> dict:
    """LORO logistic AUROC at ``layer`` from per-head features: ``z``, ``z x grad`` and both."""
    import torch

    from mechlie.core.activations import collect
    from mechlie.core.pairs import answer_set, tokenize
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
    return {name: _grad_loro(F, y, facts, rels, train_facts, cfg.relations, kw) for name, F in feats.items()}


def _grad_loro(F, y, facts: list, rels: list, train_facts: set, relations, kw: dict) -> dict:
    import torch

    from mechlie.read.detector import LabelledSet, evaluate_transfer

    F = (F / F.std(0).clamp_min(1e-8))[:, None]  # [n, 1, features]
    res = []
    for r in relations:
        tr = [i for i, f in enumerate(facts) if rels[i] != r and f in train_facts]
        te = [i for i, f in enumerate(facts) if rels[i] == r and f not in train_facts]
        src = LabelledSet("src", F[tr], y[tr], [facts[i] for i in tr])
        tst = LabelledSet(r, F[te], y[te], [facts[i] for i in te])
        _, (cell,), _, _ = evaluate_transfer(src, [tst], "logistic", 0, **{**kw, "n_null": min(kw["n_null"], 10)})
        res.append(cell)
    aur = torch.tensor([c.auroc for c in res])
    return {"loro_mean_auroc": float(aur.nanmean()), "per_relation": dict(zip(relations, res))}


def curves(model, pairs, test_facts: set, det, roc_scores: dict) -> dict:
    """What the detection figures need beyond the summary, saved as ``curves.json``: the main
    detector's score per generated token on a few test lying prompts, and the pooled LORO ROCs."""
    import torch
    from sklearn.metrics import roc_curve

    test_pairs = [p for p in pairs if p.fact_id in test_facts][:4]
    traces = {}
    for p in test_pairs:
        ts = det.score_tokens(model, p.lying)
        # The state that chose each generated token: the final prompt token's, then each answer token's.
        traces[f"{p.truth} | {ts.answer!r}"] = ts.scores[ts.n_prompt - 1 : len(ts.tokens) - 1].tolist()
    roc = {}
    for label_kind, per_kind in roc_scores.items():
        for k, (pos, neg) in per_kind.items():
            fpr_, tpr_, _ = roc_curve([1] * len(pos) + [0] * len(neg), torch.cat([pos, neg]).numpy())
            roc[f"{k} ({label_kind})"] = {"fpr": fpr_.tolist(), "tpr": tpr_.tolist()}
    return {
        "token_scores": {"traces": traces, "site": det.info["site"], "threshold": det.threshold},
        "roc": roc,
    }


def layer_scan(
    train: LabelledSet,
    kind: str,
    *,
    n_splits: int = 5,
    seed: int = 0,
    val_frac: float = 0.3,
    min_val_per_class: int = 1,
    n_boot: int = 500,
    level: float = 0.95,
) -> dict:
    """Validation AUROC per layer of the probe ``kind`` (the one the study reports), over split seeds
    of the *training* facts, with a CI; the chosen layer and the layers it cannot be told from.

    1. Splits: seeds ``seed, seed + 1, ...`` split ``train`` by fact (``val_frac`` of the facts to
       validation); a split counts when its fit part has >= 2 rows of each label and its validation
       part >= ``min_val_per_class`` of each; seeds are drawn until ``n_splits`` count (at most
       ``4 n_splits`` tried; skipped seeds are logged and counted). Per counted seed, ``kind`` is
       fitted at every layer on the fit facts and scored on the validation facts.
    2. Per layer: ``mean`` and ``sd`` (sample SD, ``n - 1``) of the validation AUROC over seeds.
    3. CI (``lo``/``hi``): 95% percentile bootstrap over *validation facts, pooled over seeds*: each
       draw resamples the facts validated in at least one counted seed (with replacement) and gives
       every fact the same multiplicity in every seed and layer, so overlapping validation sets are
       not counted as independent and layers share their draws (paired). The statistic is the mean
       over seeds of the weighted validation AUROC; the fitted probes are held fixed (the refit
       variance is ``sd``).
    4. The chosen layer is the highest mean (ties to the earliest); ``overlapping`` lists the other
       layers whose CI overlaps the chosen one's, and ``noise_level`` is true when there is any:
       the data cannot tell the chosen layer from them. ``p_best`` is the share of bootstrap draws
       in which the chosen layer has the highest mean.

    ``ensemble`` reads every layer at once, so its per-layer scan uses its base fit, difference of
    means (``probe`` in the result says which fit was scanned). Raises :class:`DetectorError` when
    no seed counts.
    """
    import torch

    from mechlie.core.stats import auroc, bootstrap_tensor

    fit_kind = "diff_of_means" if kind == "ensemble" else kind
    seeds, val, skipped = _scan_splits(train, fit_kind, n_splits, seed, val_frac, max(1, min_val_per_class))
    per_seed = torch.stack([auroc(sc[y == 1], sc[y == 0]) for sc, y, _ in val])  # [S, L]
    units = sorted({f for _, _, facts in val for f in facts})
    unit_of = {f: i for i, f in enumerate(units)}
    rows = [torch.tensor([unit_of[f] for f in facts]) for _, _, facts in val]

    def mean_over_seeds(idx: torch.Tensor) -> torch.Tensor:
        w = torch.bincount(idx, minlength=len(units))
        out = []
        for (sc, y, _), u in zip(val, rows):
            r = torch.repeat_interleave(torch.arange(len(u)), w[u])
            yr = y[r]
            ok = 0 < int(yr.sum()) < len(yr)
            out.append(auroc(sc[r][yr == 1], sc[r][yr == 0]) if ok else torch.full(sc.shape[1:], float("nan")))
        return torch.stack(out).nanmean(0)

    est = bootstrap_tensor(mean_over_seeds, len(units), n_boot=n_boot, level=level, seed=seed)
    return _scan_result(kind, fit_kind, seeds, skipped, per_seed, est, len(units), val_frac)


def _scan_splits(train: LabelledSet, fit_kind: str, n_splits: int, seed: int, val_frac: float, need: int):
    """:func:`layer_scan` step 1: the counted seeds, each one's validation (scores ``[n_val, L]``,
    labels, row facts), and the number of seeds skipped."""
    from mechlie.read.detector import DetectorError
    from mechlie.read.directions import split_by_fact
    from mechlie.read.probes import ProbeError, fit_probe

    if len(set(train.facts)) < 4:
        raise DetectorError(f"{train.name}: {len(set(train.facts))} facts, too few to carve out validation splits")
    seeds, val, skipped = [], [], 0
    for s in range(seed, seed + 4 * n_splits):
        if len(seeds) == n_splits:
            break
        sp = split_by_fact(train.facts, val_frac, s)
        tr = train.subset({train.facts[i] for i in sp.train})
        va = train.subset({train.facts[i] for i in sp.test})
        if min(int(tr.y.sum()), int((1 - tr.y).sum())) < 2 or min(int(va.y.sum()), int((1 - va.y).sum())) < need:
            skipped += 1
            continue
        try:
            probe = fit_probe(fit_kind, tr.X, tr.y, pairs=tr.pairs(), seed=s)
        except ProbeError as e:
            log.warning("layer scan, %s, split seed %d: %s; skipped", fit_kind, s, e)
            skipped += 1
            continue
        seeds.append(s)
        val.append((probe.score(va.X).float(), va.y, va.facts))
    if not seeds:
        raise DetectorError(
            f"{train.name}: no split seed has >= 2 rows of each label to fit and >= {need} of each to validate"
        )
    if skipped:
        log.info("layer scan (%s): %d split seeds skipped (too few rows of one label, or no fit)", fit_kind, skipped)
    return seeds, val, skipped


def _scan_result(kind, fit_kind, seeds, skipped, per_seed, est, n_units, val_frac) -> dict:
    """:func:`layer_scan`'s result as JSON-ready numbers (step 4 there)."""
    import torch

    from mechlie.core.stats import rank_stability

    mean = per_seed.mean(0)
    sd = per_seed.std(0) if len(per_seed) > 1 else torch.full_like(mean, float("nan"))
    score = mean.nan_to_num(nan=-float("inf"))
    chosen = int((score >= score.max() - 1e-9).nonzero()[0])
    lo, hi = est.lo, est.hi
    overlapping = [
        layer
        for layer in range(len(mean))
        if layer != chosen and bool(lo[layer] <= hi[chosen]) and bool(hi[layer] >= lo[chosen])
    ]
    p_best = float(rank_stability(est.draws, k=1)[0][chosen])
    return {
        "probe": kind,
        "fit": fit_kind,
        "layer": chosen,
        "rule": f"highest mean validation AUROC of {fit_kind} over {len(seeds)} split seeds",
        "mean": mean.tolist(),
        "sd": sd.tolist(),
        "lo": lo.tolist(),
        "hi": hi.tolist(),
        "per_seed": per_seed.tolist(),
        "seeds": seeds,
        "n_seeds": len(seeds),
        "n_skipped_seeds": skipped,
        "val_frac": val_frac,
        "n_val_facts": n_units,
        "ci_over": "validation facts, pooled over seeds (one fact bootstrap shared by seeds and layers; fits fixed)",
        "level": est.level,
        "overlapping": overlapping,
        "noise_level": bool(overlapping),
        "p_best": p_best,
    }
