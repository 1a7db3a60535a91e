"""The head sweep: behaviour, per-head and per-layer directions, and patching, on one dataset.

Pipeline (each stage's output is saved in the run directory and reused on a rerun, so an
interrupted sweep resumes where it stopped):

1. ``activations.pt``: ``head_out``, ``resid_post`` and the next-token logits at the final prompt
   token for the honest and lying prompt of every pair (one forward pass each).
2. ``behaviour.json``: P(truth), logit difference, lie rate and the summary metrics, per relation
   and overall, before any filtering, from those logits. Later stages keep known facts only,
   unless ``known_only=False``.
3. ``directions.pt``: difference-of-means directions per (layer, head) and per layer, fit on the
   training facts, with held-out AUROC and its shuffled-label and random-direction controls.
4. ``patching.pt``: the normalized effect of patching each head's ``z`` and each layer's
   ``resid_pre`` from the honest run into the lying run at the final position, on ``n_patch``
   held-out pairs (test facts first, so the pairs were not used to fit any direction).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from mechlie.activations import Activations, collect
from mechlie.directions import DirectionScores, score_directions, split_by_fact
from mechlie.io import atomic_torch_save, atomic_write_json, ensure_writable_dir, read_json
from mechlie.metrics import Behaviour, score_logits
from mechlie.models import DEFAULT_MODEL
from mechlie.pairs import FORMATS, RELATIONS, ContrastPair, PairError, answer_set, load_builtin, load_pairs_file
from mechlie.patching import PatchResult, patch_final_position

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadSweepConfig:
    model: str = DEFAULT_MODEL
    dataset: str = "all"  # a relation, "all", or a .csv/.jsonl file of pairs
    fmt: str = "fewshot"  # instruct | fewshot | both (built-in datasets only)
    n_pairs: int = 30  # pairs per relation, before the known filter (0 = all)
    n_patch: int = 24  # pairs to patch (each costs one pass per chunk of components)
    known_only: bool = True  # keep facts the model answers correctly when honest
    test_frac: float = 0.3
    seed: int = 0
    batch_size: int = 16
    out_dir: str = "results/head_sweep"
    run_name: str = ""  # default: derived from the settings, so a rerun resumes

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {self.fmt!r}")
        if self.dataset not in RELATIONS + ("all",) and not Path(self.dataset).suffix in (".csv", ".jsonl"):
            raise ValueError(f"dataset must be one of {RELATIONS + ('all',)} or a .csv/.jsonl file")
        if self.n_pairs < 0 or self.n_patch < 1:
            raise ValueError("n_pairs must be >= 0 and n_patch >= 1")
        if not 0 < self.test_frac < 1:
            raise ValueError("test_frac must be in (0, 1)")

    @property
    def run_dir(self) -> Path:
        name = self.run_name or (
            f"{Path(self.model).name}-{Path(self.dataset).stem}-{self.fmt}-n{self.n_pairs}-p{self.n_patch}-s{self.seed}"
        )
        return Path(self.out_dir) / name


@dataclass
class HeadSweepResult:
    config: HeadSweepConfig
    behaviour: dict
    pairs: list[ContrastPair]
    split: dict
    heads: DirectionScores  # [L, H]
    resid: DirectionScores  # [L]
    head_patch: PatchResult  # z, [n_patch, L, H]
    resid_patch: PatchResult  # resid_pre, [n_patch, L]
    patch_pairs: list[str]


def load_sweep_pairs(cfg: HeadSweepConfig, tokenizer) -> list[ContrastPair]:
    if Path(cfg.dataset).suffix in (".csv", ".jsonl"):
        pairs = load_pairs_file(cfg.dataset, tokenizer=tokenizer, on_multitoken="drop")
        return pairs[: cfg.n_pairs or None]
    return load_builtin(cfg.dataset, cfg.fmt, tokenizer=tokenizer, n=cfg.n_pairs or None, seed=cfg.seed)


def _stage(path: Path, compute: Callable[[], object], save: Callable[[Path, object], None], load: Callable[[Path], object]):
    if path.exists():
        log.info("resuming: reusing %s", path)
        return load(path)
    out = compute()
    save(path, out)
    return out


def _behaviour_report(beh: Behaviour, pairs: list[ContrastPair]) -> dict:
    report = {"overall": beh.summary(), "relations": {}}
    rel = [p.relation for p in pairs]
    for r in sorted(set(rel)):
        idx = torch.tensor([i for i, x in enumerate(rel) if x == r])
        report["relations"][r] = beh.subset(idx).summary()
    report["known"] = [bool(k) for k in beh.known.tolist()]
    return report


def run_head_sweep(cfg: HeadSweepConfig, model, progress: bool = True) -> HeadSweepResult:
    run = ensure_writable_dir(cfg.run_dir)
    cfg_path = run / "config.json"
    if cfg_path.exists():
        old = read_json(cfg_path)
        if old != asdict(cfg):
            raise FileExistsError(
                f"{run} holds a run with a different config; pass another --run-name or --out-dir "
                f"(differences: { {k: (old.get(k), v) for k, v in asdict(cfg).items() if old.get(k) != v} })"
            )
    else:
        atomic_write_json(cfg_path, asdict(cfg))

    all_pairs = load_sweep_pairs(cfg, model.tokenizer)

    def acts() -> dict[str, Activations]:
        # One pass per prompt gives both the behaviour (final logits) and the activations.
        kinds = ("head_out", "resid_post")
        return {
            side: collect(model, [getattr(p, side) for p in all_pairs], kinds=kinds, batch_size=cfg.batch_size,
                          progress=progress, desc=f"{side} prompts", return_logits=True)
            for side in ("honest", "lying")
        }

    a = _stage(
        run / "activations.pt", acts,
        lambda p, d: atomic_torch_save(p, {k: {"acts": v.acts, "meta": v.meta, "logits": v.logits} for k, v in d.items()}),
        lambda p: {k: Activations(v["acts"], -1, v["meta"], v["logits"]) for k, v in torch.load(p, weights_only=False).items()},
    )
    answers = answer_set(model.tokenizer, all_pairs)
    beh = Behaviour(score_logits(a["honest"].logits, answers), score_logits(a["lying"].logits, answers))
    report = _behaviour_report(beh, all_pairs)
    atomic_write_json(run / "behaviour.json", report)
    keep = torch.tensor(report["known"]) if cfg.known_only else torch.ones(len(all_pairs), dtype=torch.bool)
    pairs = [p for p, k in zip(all_pairs, keep.tolist()) if k]
    if len(pairs) < 4:
        raise PairError(f"only {len(pairs)} usable pairs after the known filter; use more pairs or --all-facts")
    split = split_by_fact([p.fact_id for p in pairs], cfg.test_frac, cfg.seed)
    kept = {side: {k: v[keep] for k, v in a[side].acts.items()} for side in ("honest", "lying")}

    def dirs() -> dict[str, DirectionScores]:
        return {
            kind: score_directions(kept["honest"][kind], kept["lying"][kind], split, seed=cfg.seed)
            for kind in ("head_out", "resid_post")
        }

    d = _stage(run / "directions.pt", dirs, lambda p, x: atomic_torch_save(p, {k: asdict(v) for k, v in x.items()}),
               lambda p: {k: DirectionScores(**v) for k, v in torch.load(p, weights_only=False).items()})

    # Patch held-out pairs first: none of them helped fit a direction.
    order = split.test + split.train
    patch_pairs = [pairs[i] for i in order[: cfg.n_patch]]

    def patch() -> dict[str, PatchResult]:
        return {
            kind: patch_final_position(model, patch_pairs, kind, batch_size=cfg.batch_size, progress=progress)
            for kind in ("z", "resid_pre")
        }

    pr = _stage(run / "patching.pt", patch, lambda p, x: atomic_torch_save(p, {k: asdict(v) for k, v in x.items()}),
                lambda p: {k: _load_patch(v) for k, v in torch.load(p, weights_only=False).items()})
    return HeadSweepResult(
        cfg, report, pairs, {"train": split.train, "test": split.test}, d["head_out"], d["resid_post"],
        pr["z"], pr["resid_pre"], [p.fact_id for p in patch_pairs],
    )


def _load_patch(d: dict) -> PatchResult:
    from mechlie.metrics import AnswerScores

    return PatchResult(
        kind=d["kind"], p_truth=d["p_truth"], logit_diff=d["logit_diff"],
        clean=AnswerScores(**d["clean"]), corrupt=AnswerScores(**d["corrupt"]),
    )


def top_heads(values: torch.Tensor, k: int = 10) -> list[tuple[int, int, float]]:
    """The k (layer, head, value) with the largest values of a [L, H] tensor."""
    flat = values.flatten()
    idx = flat.argsort(descending=True)[:k]
    n_heads = values.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads, float(flat[i])) for i in idx]


def summarize(res: HeadSweepResult, k: int = 10) -> dict:
    h, r = res.heads, res.resid
    return {
        "model": res.config.model,
        "n_pairs": len(res.pairs),
        "n_train": len(res.split["train"]),
        "n_test": len(res.split["test"]),
        "behaviour": res.behaviour["overall"],
        "head_auroc": {
            "max": float(h.auroc.max()), "mean": float(h.auroc.mean()),
            "shuffled_mean": float(h.auroc_shuffled.mean()), "random_mean": float(h.auroc_random.mean()),
        },
        "resid_auroc": {
            "per_layer": r.auroc.tolist(), "shuffled": r.auroc_shuffled.tolist(), "random": r.auroc_random.tolist(),
        },
        "patching": {
            "n_pairs": len(res.patch_pairs),
            "honest_logit_diff": float(res.head_patch.clean.logit_diff.mean()),
            "lying_logit_diff": float(res.head_patch.corrupt.logit_diff.mean()),
            "honest_p_truth": float(res.head_patch.clean.p_truth.mean()),
            "lying_p_truth": float(res.head_patch.corrupt.p_truth.mean()),
            "resid_effect_logit_diff": res.resid_patch.effect("logit_diff").tolist(),
        },
        "top_heads_by_patching": [
            {"layer": l, "head": hd, "effect": e, "effect_p_truth": float(res.head_patch.effect("p_truth")[l, hd]),
             "auroc": float(h.auroc[l, hd])}
            for l, hd, e in top_heads(res.head_patch.effect("logit_diff"), k)
        ],
        "top_heads_by_auroc": [
            {"layer": l, "head": hd, "auroc": v, "auroc_shuffled": float(h.auroc_shuffled[l, hd]),
             "auroc_random": float(h.auroc_random[l, hd]), "patch_effect": float(res.head_patch.effect()[l, hd])}
            for l, hd, v in top_heads(h.auroc, k)
        ],
    }


def sweep_figures(res: HeadSweepResult) -> dict:
    """The four figures of a head sweep, by file stem."""
    from mechlie import plotting

    h, r = res.heads, res.resid
    L = h.auroc.shape[0]
    beh = res.behaviour["relations"]
    return {
        "head_auroc": plotting.heatmap(
            h.auroc, f"Held-out AUROC of each head's honest→lying direction (controls: shuffled "
            f"{h.auroc_shuffled.mean():.2f}, random {h.auroc_random.mean():.2f} mean)", colorbar="AUROC", zmid=0.5,
        ),
        "head_patching": plotting.heatmap(
            res.head_patch.effect("logit_diff"),
            f"Patching each head's z honest→lying at the final token (0 = lying, 1 = honest; n={len(res.patch_pairs)})",
            colorbar="norm. effect", zmid=0.0,
        ),
        "layer_curves": plotting.lines(
            range(L),
            {
                "resid_post AUROC (held out)": r.auroc.tolist(),
                "AUROC, shuffled labels": r.auroc_shuffled.tolist(),
                "AUROC, random direction": r.auroc_random.tolist(),
                "resid_pre patching effect (logit diff)": res.resid_patch.effect("logit_diff").tolist(),
                "resid_pre patching effect (P(truth))": res.resid_patch.effect("p_truth").tolist(),
            },
            "Per layer: residual direction AUROC and residual patching effect",
            y_label="AUROC / normalized effect",
        ),
        "behaviour": plotting.bars(
            {
                "P(truth) honest": {k: v["p_truth_honest"] for k, v in beh.items()},
                "P(truth) lying": {k: v["p_truth_lying"] for k, v in beh.items()},
                "acc (honest top-1)": {k: v["acc"] for k, v in beh.items()},
                "lie rate (known facts)": {k: v["lie_rate"] for k, v in beh.items()},
                "choice_cov lying": {k: v["choice_cov_lying"] for k, v in beh.items()},
            },
            f"Behaviour of {res.config.model} ({res.config.fmt} format), before any filtering",
        ),
    }
