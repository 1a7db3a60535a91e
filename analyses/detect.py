"""Lie detection that generalises: every probe kind, trained on one dataset, tested on the others.

    python analyses/detect.py                                   # default: a few minutes on a CPU
    python analyses/detect.py --probes logistic lat --relations capitals opposites numbers
    python analyses/detect.py --model gemma-3-270m --fmt fewshot --fpr 0.05

1. Pairs of every relation (``--relations``, ``--n-pairs`` each, ``--fmt``); the model answers each
   honest and lying prompt greedily and ``--k`` times by sampling (mechlie.labels). States are
   read from the generator: the final prompt token and the first generated answer token.
2. Labelled sets: per relation, *framing* labels (honest vs lying prompt, known facts only);
   pooled framing labels with and without the known filter; pooled *on-policy* labels (sampled
   lies vs sampled truths of the same lying prompts, at the answer token: no prompt-text
   difference). One split by fact for everything, so no test fact is ever trained on.
3. The layer is chosen on validation facts carved out of training (difference of means). Every
   probe kind is trained on every set and tested on every set: AUROC with a 95% CI over test
   facts, next to a label-permutation null (within-fact, ``--n-null`` refits) and
   ``--n-random`` random directions (95th percentiles). Leave-one-relation-out (LORO) gives each
   probe's transfer to relations it never saw.
4. A detector (``--detector-probe``, trained on the pooled framing set) is calibrated at
   ``--fpr`` on controls (honest prompts of test facts + neutral text) and saved; its recall at
   that FPR is reported on test lies of both label kinds. Per-token scores along generated
   answers are plotted.

Writes results/detect/<run>/: summary.json, matrix.json, detector.safetensors, figures.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from mechlie.cli import RunDir, run_script

log = logging.getLogger("mechlie")

PROBE_KINDS = ("diff_of_means", "mass_mean", "logistic", "lat", "ccs", "ensemble")
DEFAULT_RELATIONS = ("capitals", "cities", "languages", "opposites", "numbers", "symbols")


@dataclass(frozen=True)
class Config:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "embedded name, .gguf, HF dir or TL name"})
    relations: tuple[str, ...] = field(default=DEFAULT_RELATIONS, metadata={"help": "built-in relations"})
    fmt: str = field(default="fewshot", metadata={"help": "instruct | fewshot | both"})
    n_pairs: int = field(default=16, metadata={"help": "pairs sampled per relation"})
    k: int = field(default=3, metadata={"help": "sampled answers per lying prompt (on-policy labels)"})
    temperature: float = 1.0
    max_new_tokens: int = 4
    probes: tuple[str, ...] = field(default=PROBE_KINDS, metadata={"help": f"any of {PROBE_KINDS}"})
    test_frac: float = 0.4
    n_null: int = field(default=30, metadata={"help": "label-permutation refits per cell"})
    n_random: int = field(default=200, metadata={"help": "random directions per cell"})
    n_boot: int = 500
    fpr: float = field(default=0.01, metadata={"help": "control false-positive rate of the saved detector"})
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
        from mechlie.pairs import EXTRA_RELATIONS, FORMATS, RELATIONS

        RELATIONS = RELATIONS + EXTRA_RELATIONS  # noqa: N806

        bad = set(self.probes) - set(PROBE_KINDS)
        if bad or not self.probes:
            raise ValueError(f"unknown probes {sorted(bad)}; probes: {PROBE_KINDS}")
        if self.detector_probe not in PROBE_KINDS:
            raise ValueError(f"--detector-probe must be one of {PROBE_KINDS}")
        bad = set(self.relations) - set(RELATIONS)
        if bad or len(self.relations) < 2:
            raise ValueError(f"need at least 2 relations from {RELATIONS}; unknown: {sorted(bad)}")
        if self.fmt not in FORMATS:
            raise ValueError(f"--fmt must be one of {FORMATS}")
        if not 0 < self.fpr < 1 or not 0 < self.test_frac < 1:
            raise ValueError("--fpr and --test-frac must be in (0, 1)")
        for name in ("n_pairs", "n_boot", "n_random", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.k < 2 or self.max_new_tokens < 2 or self.n_null < 0:
            raise ValueError("--k and --max-new-tokens must be >= 2, --n-null >= 0")


def main(cfg: Config, run: RunDir) -> dict:
    import torch

    from mechlie import plotting
    from mechlie.activations import collect
    from mechlie.detector import (
        LabelledSet,
        calibrated_detector,
        choose_layer,
        evaluate_transfer,
        neutral_texts,
        transfer_matrix,
    )
    from mechlie.directions import split_by_fact
    from mechlie.io import atomic_write_json
    from mechlie.labels import on_policy
    from mechlie.models import load_model
    from mechlie.pairs import load_builtin

    t0 = time.time()
    model = load_model(cfg.model, device="cpu")
    pairs = []
    for rel in cfg.relations:
        # Multi-token answers are kept: on-policy labels compare generated text with the answer.
        pairs += load_builtin(rel, cfg.fmt, tokenizer=model.tokenizer, n=cfg.n_pairs, seed=cfg.seed, multi_token="keep")
    log.info("%d pairs from %s", len(pairs), ", ".join(cfg.relations))
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
    t_gen = time.time() - t0

    split = split_by_fact([p.fact_id for p in pairs], cfg.test_frac, cfg.seed)
    train_facts = {pairs[i].fact_id for i in split.train}
    test_facts = {pairs[i].fact_id for i in split.test}

    def both(name: str, rows) -> tuple[LabelledSet, LabelledSet]:
        s = LabelledSet(name, *rows)
        return s.subset(train_facts), s.subset(test_facts)

    kf = cfg.known_filter
    sets = {r: both(r, op.framing_rows(relation=r, known_only=kf)) for r in cfg.relations}
    sets["all"] = both("all", op.framing_rows(known_only=kf))
    if kf:
        sets["all (no known filter)"] = both("all (no known filter)", op.framing_rows(known_only=False))
    sets["on-policy"] = both("on-policy", op.rows("within_prompt", site="answer"))
    train = [v[0] for v in sets.values()]
    test = [v[1] for v in sets.values()]
    layer, val_auroc = choose_layer([sets[r][0] for r in cfg.relations], seed=cfg.seed)
    log.info("layer %d chosen on validation facts (diff-of-means AUROC %.3f)", layer, val_auroc[layer])

    kw = dict(n_null=cfg.n_null, n_random=cfg.n_random, n_boot=cfg.n_boot, seed=cfg.seed)
    matrix = transfer_matrix(train, test, cfg.probes, layer, **kw)

    # Leave one relation out: train on the other relations, test on the held-out one.
    loro: dict[str, dict] = {}
    roc_scores: dict[str, tuple[list, list]] = {}
    for kind in cfg.probes:
        cells, draws, pos, neg = {}, [], [], []
        for r in cfg.relations:
            src = LabelledSet.concat([sets[o][0] for o in cfg.relations if o != r], f"not {r}")
            _, (cell,), (sc,), (dr,) = evaluate_transfer(src, [sets[r][1]], kind, layer, **kw)
            cells[r] = cell
            if dr is not None:
                draws.append(dr)
                y = sets[r][1].y
                # z-score per held-out relation so one ROC can pool them (relations sit at offsets)
                if (y == 0).sum() >= 2:  # a z-score needs two honest rows; else left out of the ROC
                    z = (sc - sc[y == 0].mean()) / sc[y == 0].std().clamp_min(1e-8)
                    pos.append(z[y == 1])
                    neg.append(z[y == 0])
        mean_draws = torch.stack(draws).nanmean(0)
        point = float(torch.tensor([c.auroc for c in cells.values()]).nanmean())
        lo, hi = torch.nanquantile(mean_draws, torch.tensor([0.025, 0.975])).tolist()
        loro[kind] = {
            "mean_auroc": point,
            "lo": lo,
            "hi": hi,
            "null_shuffled_q95": float(torch.tensor([c.null_shuffled_q95 for c in cells.values()]).nanmean()),
            "null_random_q95": float(torch.tensor([c.null_random_q95 for c in cells.values()]).nanmean()),
            "per_relation": cells,
        }
        roc_scores[kind] = (torch.cat(pos), torch.cat(neg))

    if cfg.grad_features:
        summary_grad = _grad_feature_comparison(model, pairs, op, sets, cfg, layer, kw)

    # The detector: pooled framing labels, calibrated on controls that are not lies.
    from mechlie.probes import fit_probe

    all_tr, all_te = sets["all"]
    layers = tuple(range(model.cfg.n_layers)) if cfg.detector_probe == "ensemble" else (layer,)
    feats = lambda X: X[:, list(layers)]
    probe = fit_probe(cfg.detector_probe, feats(all_tr.X), all_tr.y, pairs=all_tr.pairs())
    neutral = collect(model, neutral_texts(), kinds=("resid_post",), progress=False, batch_size=cfg.batch_size)[
        "resid_post"
    ]
    honest_test = all_te.X[all_te.y == 0]
    control = torch.cat([feats(honest_test), feats(neutral)])
    det = calibrated_detector(
        model,
        probe,
        "resid_post",
        layers,
        control,
        cfg.fpr,
        {"trained_on": "framing labels, known facts, all relations", "layer": layer},
    )
    recall = {
        name: float(det.flag(det.score_features(feats(s.X[s.y == 1]))).float().mean())
        for name, s in (("framing lies (test facts)", all_te), ("on-policy lies (test facts)", sets["on-policy"][1]))
        if (s.y == 1).any()
    }
    det_path = det.save(run.path / "detector.safetensors")

    # Per-token scores along generated answers to a few test lying prompts.
    test_pairs = [p for p in pairs if p.fact_id in test_facts][:4]
    tok = det.score(model, [p.lying for p in test_pairs], generate_tokens=8)
    figs = {}
    traces = {}
    for i, p in enumerate(test_pairs):
        m = tok.token_mask[i].bool()
        traces[f"{p.truth} | {tok.texts[i]!r}"] = tok.tokens[i][m].tolist()
    width = max(len(v) for v in traces.values())
    traces = {k: v + [float("nan")] * (width - len(v)) for k, v in traces.items()}
    figs["token_scores"] = plotting.lines(
        range(width),
        traces,
        "Detector score per generated token (lying prompts)",
        x_label="generated token (0 = chosen at the final prompt token)",
        y_label="score",
    )
    kinds = [k for k in cfg.probes if k in matrix]
    names = [s.name for s in test]
    heat = [
        plotting.heatmap(
            torch.tensor(
                [[matrix[k].get(a, {}).get(b).auroc if a in matrix[k] else float("nan") for b in names] for a in names]
            ),
            k,
            x_label="test set",
            y_label="train set",
            zmid=0.5,
            x_ticks=names,
            y_ticks=names,
        )
        for k in kinds
    ]
    figs["matrix"] = plotting.side_by_side(heat, kinds, f"Transfer AUROC, layer {layer}")
    from sklearn.metrics import roc_curve

    roc = {}
    for k, (pos, neg) in roc_scores.items():
        fpr_, tpr_, _ = roc_curve([1] * len(pos) + [0] * len(neg), torch.cat([pos, neg]).numpy())
        roc[k] = (fpr_.tolist(), tpr_.tolist())
    figs["roc"] = _roc_figure(roc)
    fig_paths = {name: plotting.save_figure(f, run.path / name) for name, f in figs.items()}

    atomic_write_json(run.path / "matrix.json", {"layer": layer, "matrix": matrix, "loro": loro, "counts": counts})
    summary = {
        "model": cfg.model,
        "n_pairs": len(pairs),
        "layer": layer,
        "val_auroc_layer": float(val_auroc[layer]),
        "label_counts": counts["all"],
        "train_facts": len(train_facts),
        "test_facts": len(test_facts),
        "loro": {k: {kk: vv for kk, vv in v.items() if kk != "per_relation"} for k, v in loro.items()},
        "detector": {
            "path": str(det_path),
            "probe": cfg.detector_probe,
            "threshold": det.threshold,
            "fpr": cfg.fpr,
            **det.info,
            "recall_at_fpr": recall,
        },
        "time_s": {"generation": round(t_gen, 1), "total": round(time.time() - t0, 1)},
        "figures": fig_paths,
    }
    if cfg.grad_features:
        summary["grad_features"] = summary_grad
    # Framing vs on-policy labels, and the known filter: the cells that answer those questions.
    key_cells = [
        ("all", "all"),
        ("all", "on-policy"),
        ("on-policy", "on-policy"),
        ("on-policy", "all"),
        ("all (no known filter)", "all"),
        ("all (no known filter)", "on-policy"),
    ]
    summary["key_cells"] = {
        k: {f"{a} -> {b}": matrix[k][a][b] for a, b in key_cells if a in matrix[k] and b in matrix[k][a]}
        for k in matrix
    }
    _print_table(matrix, loro, counts, summary, [s.name for s in train])
    return summary


def _grad_feature_comparison(model, pairs, op, sets, cfg, layer, kw) -> dict:
    """LORO logistic AUROC at ``layer`` from per-head features: ``z``, ``z x grad`` and both."""
    import torch

    from mechlie.activations import collect
    from mechlie.detector import LabelledSet, evaluate_transfer
    from mechlie.pairs import answer_set, tokenize
    from mechlie.probes import grad_features

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


def _print_table(matrix, loro, counts, summary, names) -> None:
    print(f"\nlayer {summary['layer']} (validation AUROC {summary['val_auroc_layer']:.3f})")
    print("label counts (all relations):", counts["all"])
    print("\nLeave-one-relation-out transfer (mean over held-out relations, 95% CI over facts):")
    print(f"{'probe':<14} {'AUROC':>22} {'shuffled q95':>13} {'random q95':>11}")
    for k, v in loro.items():
        ci = f"{v['mean_auroc']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
        print(f"{k:<14} {ci:>22} {v['null_shuffled_q95']:>13.3f} {v['null_random_q95']:>11.3f}")
    for k, rows in matrix.items():
        print(f"\n{k}: AUROC, rows = train set, columns = test set")
        cols = names
        print(" " * 22 + " ".join(f"{c[:9]:>9}" for c in cols))
        for a in cols:
            if a in rows:
                print(f"{a[:21]:<22}" + " ".join(f"{rows[a][c].auroc:>9.2f}" for c in cols))
    print("\nframing vs on-policy labels, known filter (AUROC [95% CI]; shuffled / random null q95):")
    for k, cells in summary["key_cells"].items():
        for name, c in cells.items():
            ci = f"{c.auroc:.3f} [{c.lo:.3f}, {c.hi:.3f}]"
            nulls = f"{c.null_shuffled_q95:.3f} / {c.null_random_q95:.3f}"
            print(f"  {k:<14} {name:<36} {ci}  {nulls}  (n facts {c.n_target_facts})")
    d = summary["detector"]
    where = f"threshold at {d['fpr']:.0%} control FPR on {d['n_controls']} controls"
    print(f"\ndetector ({d['probe']}, {where}): recall {d['recall_at_fpr']}")
    print(f"time: {summary['time_s']}")


if __name__ == "__main__":
    sys.exit(run_script(Config, main, doc=__doc__))
