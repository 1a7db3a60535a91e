"""The head sweep: behaviour, per-head and per-layer directions, and patching, on one dataset.

Pipeline (each stage's output is saved in the run folder, a :class:`mechlie.core.cli.RunDir` whose
name is keyed on the settings and on the dataset file's content, and reused on a rerun, so an
interrupted sweep resumes where it stopped and an edited data file starts a new run):

1. ``activations.safetensors``: ``head_out``, ``resid_post`` and the next-token logits at the
   final prompt token for the honest and lying prompt of every pair (one forward pass each).
2. ``behaviour.json``: P(truth), logit difference, lie rate and the summary metrics, per relation
   and overall, for *all* pairs and for the *known* pairs (facts the model answers correctly when
   honest), with 95% bootstrap CIs over facts. Later stages keep known facts only, unless
   ``known_only=False``.
3. ``directions.safetensors``: difference-of-means directions per (layer, head) and per layer,
   fit on the training facts, scored on held-out facts (AUROC with a CI over facts), against the
   within-pair label-swap null and random directions, each from many draws. Every head (and layer)
   has two bars per control: its own 95th percentile (the per-head bar) and the 95th percentile of
   the maximum over all heads (the max bar, the family-wise bar for "the best head"); the summary
   reports both, per head, and how many heads pass each
   (:func:`mechlie.read.directions.score_directions`). The label-swap null tests only that the
   honest and lying activations differ: the prompts differ in their demonstrations, so passing it
   says a head encodes which demonstrations were shown, not lying (:data:`LABEL_SWAP_NOTE`).
   The layer choice is checked over ``n_layer_seeds`` splits by fact
   (:func:`mechlie.read.directions.scores_over_seeds`, the same difference-of-means fit that is
   reported): per layer the mean held-out AUROC with a CI over seeds, and whether the best layer's
   CI overlaps others' (a noise-level choice).
4. ``patching.safetensors``: the per-pair metrics after patching each head's ``z`` and each
   layer's ``resid_pre`` from the honest run into the lying run at the final position, on
   ``n_patch`` pairs (held-out facts first, so they did not fit any direction). The effect is
   normalized on the means (0 = lying, 1 = honest) and bootstrapped over pairs; the top heads'
   rank stability is the share of resamples in which each is top-1 / in the top k.
5. ``patching_rest.safetensors`` (``n_split_seeds`` > 0): each head's ``z`` patched on the analysed
   pairs stage 4 left out, so that every pair has its per-head effects. The headline is then
   repeated on ``n_split_seeds`` splits by fact (:mod:`mechlie.studies.head_sweep_seeds`): each seed
   picks its top head on its own training facts and reports its effect on its own held-out facts
   (95% CI over them), counts the heads passing each bar, and the seeds give mean ± SD and how often
   the same head is picked. Nothing else is recomputed from the model (the splits reuse stage 1's
   activations and these per-pair results).

:func:`run` (the study, ``STUDY``) adds the summary, the figures and the head views; the finished
run reads back as :class:`mechlie.studies.head_sweep_result.HeadSweepResult`.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformer_lens import HookedTransformer

from mechlie.core.activations import Activations
from mechlie.core.cli import RunDir, prepare_run
from mechlie.core.facts import load_pairs_file
from mechlie.core.io import load_tensors, save_tensors
from mechlie.core.kv import FinalActs, collect_batch
from mechlie.core.metrics import Behaviour, score_logits
from mechlie.core.pairs import (
    RELATIONS,
    AnswerTokenError,
    ContrastPair,
    PairError,
    answer_set,
    answer_token_ids,
    load_builtin,
    tokenize,
)
from mechlie.read.directions import (
    DirectionScores,
    SeedScores,
    Split,
    score_directions,
    scores_over_seeds,
    split_by_fact,
)
from mechlie.studies.base import Study, register
from mechlie.studies.behaviour import behaviour_report
from mechlie.studies.flags import model_flag
from mechlie.studies.head_sweep_result import VIEW_PAIRS, HeadSweepResult, load_patch, save_patch
from mechlie.studies.head_sweep_seeds import over_split_seeds
from mechlie.studies.head_sweep_summary import patching_summary, summarize  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

PAIR_FILE_SUFFIXES = (".csv", ".jsonl")
PATCH_KINDS = ("z", "resid_pre")  # patched at the final position: each head's z, each layer's input
ACT_KINDS = ("head_out", "resid_post") + PATCH_KINDS  # stage 1: directions (head_out, resid_post) + patching
MIN_TEST_FACTS = 10  # below this the held-out AUROC's CI is too wide to mean much: warn
FIT = "diff_of_means"  # the directions' fit: scored, reported, and used for the layer CI over seeds
MIN_PAIRS = 4  # fewer cannot give both a train and a test side to fit and score directions


@dataclass(frozen=True)
class HeadSweepConfig:
    model: str = model_flag()
    dataset: str = field(
        default="all",
        metadata={"help": f"a relation ({'|'.join(RELATIONS)}), all, or a .csv/.jsonl file of pairs", "path": True},
    )
    fmt: Literal["instruct", "fewshot", "both"] = field(
        default="fewshot", metadata={"help": "prompt format (built-in datasets only)", "aliases": ("--format",)}
    )
    n_pairs: int = field(
        default=30,
        metadata={
            "help": "built-in datasets: pairs per relation, a seeded sample (0 = all); not used for a pairs file"
        },
    )
    max_rows: int = field(default=0, metadata={"help": "pairs file: use only its first N rows (0 = every row)"})
    multi_token: Literal["first", "drop"] = field(
        default="first",
        metadata={
            "help": "pairs whose truth or lie is several tokens: 'first' scores them by the first token of each "
            "spelling (a pair whose truth and lie share a first token is an error), 'drop' leaves them out (counted)"
        },
    )
    views: bool = field(
        default=True,
        metadata={"help": "write circuitsvis views of the top 3 heads (lying_heads.html/.json)", "run": False},
    )
    n_patch: int = field(default=24, metadata={"help": "pairs to patch (held-out facts first)"})
    known_only: bool = field(default=True, metadata={"help": "keep facts the model answers correctly when honest"})
    test_frac: float = field(default=0.3, metadata={"help": "share of facts held out to score directions"})
    n_perm: int = field(default=200, metadata={"help": "draws of the within-pair label-swap null"})
    n_random: int = field(default=200, metadata={"help": "random directions (control)"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for every CI"})
    n_layer_seeds: int = field(
        default=10, metadata={"help": "split seeds for the per-layer AUROC CI and the layer choice (0 = skip)"}
    )
    n_split_seeds: int = field(
        default=5,
        metadata={
            "help": "split seeds for the headline over splits: each picks its top head on its training facts, "
            "reports it on its held-out facts, and counts the heads passing each bar (0 = skip; patches every "
            "analysed pair, not only --n-patch)"
        },
    )
    top_k: int = field(default=10, metadata={"help": "top heads reported (and the k of rank stability)"})
    seed: int = 0
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass", "run": False})
    out_dir: str = "results/head_sweep"
    run_name: str = field(default="", metadata={"help": "default: derived from the settings and the data"})

    def __post_init__(self) -> None:
        is_file = Path(self.dataset).suffix.lower() in PAIR_FILE_SUFFIXES
        if self.dataset not in RELATIONS + ("all",) and not is_file:
            raise ValueError(
                f"--dataset must be one of {RELATIONS + ('all',)} or a .csv/.jsonl file, got {self.dataset!r}"
            )
        if is_file and Path(self.dataset).is_dir():
            raise IsADirectoryError(f"--dataset: {self.dataset} is a directory, not a pairs file")
        if is_file and not Path(self.dataset).is_file():
            raise FileNotFoundError(f"--dataset: no such file: {self.dataset}")
        if self.multi_token not in ("first", "drop"):
            raise ValueError(f"--multi-token must be first or drop, got {self.multi_token!r}")
        if self.fmt not in ("instruct", "fewshot", "both"):
            raise ValueError(f"--fmt must be instruct, fewshot or both, got {self.fmt!r}")
        if self.n_pairs < 0 or self.max_rows < 0:
            raise ValueError("--n-pairs and --max-rows must be >= 0 (0 = all)")
        if self.n_patch < 1 or self.batch_size < 1 or self.top_k < 1:
            raise ValueError("--n-patch, --batch-size and --top-k must be >= 1")
        if self.n_perm < 20 or self.n_random < 20 or self.n_boot < 100:
            raise ValueError("--n-perm and --n-random must be >= 20 and --n-boot >= 100 for a usable null and CI")
        if not 0 < self.test_frac < 1:
            raise ValueError(f"--test-frac must be in (0, 1), got {self.test_frac}")
        if self.n_layer_seeds == 1 or self.n_layer_seeds < 0:
            raise ValueError(f"--n-layer-seeds must be 0 (skip) or >= 2 for a CI over seeds, got {self.n_layer_seeds}")
        if self.n_split_seeds == 1 or self.n_split_seeds < 0:
            raise ValueError(f"--n-split-seeds must be 0 (skip) or >= 2 for an SD over seeds, got {self.n_split_seeds}")

    @property
    def is_file(self) -> bool:
        return Path(self.dataset).suffix.lower() in PAIR_FILE_SUFFIXES


@dataclass(frozen=True)
class SweepData:
    """What :func:`run_head_sweep` computed (or resumed), in memory."""

    config: HeadSweepConfig
    behaviour: dict
    pairs: list[ContrastPair]  # the pairs analysed (known only, unless known_only=False)
    split: Split
    heads: DirectionScores  # [L, H]
    resid: DirectionScores  # [L]
    head_patch: "PatchResult"  # z, [n_patch, L, H]  # noqa: F821
    resid_patch: "PatchResult"  # resid_pre, [n_patch, L]  # noqa: F821
    patch_pairs: list[str]
    data: dict  # rows read / used / dropped, and why
    warnings: list[str]
    run_dir: Path
    layer_seeds: SeedScores | None = None  # resid_post AUROC per split seed (None: n_layer_seeds = 0)
    split_seeds: dict | None = None  # the headline per split seed (head_sweep_seeds; None: n_split_seeds = 0)


def _count_rows(path: Path) -> int:
    """Data rows in a pairs file (non-empty JSONL lines, or CSV records)."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            return sum(1 for _ in csv.DictReader(f))
    return sum(1 for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip())


def load_sweep_pairs(cfg: HeadSweepConfig, tokenizer) -> tuple[list[ContrastPair], dict]:
    """The sweep's pairs and what was read, used and dropped (logged; nothing is cut silently)."""
    if cfg.is_file:
        path = Path(cfg.dataset)
        on_multi = "drop" if cfg.multi_token == "drop" else "keep"
        # Load first: the loader names the file, line and field of a bad record or encoding.
        pairs = load_pairs_file(path, tokenizer=tokenizer, on_multitoken=on_multi)
        n_rows = _count_rows(path)
        info = {"source": str(path), "rows_read": n_rows, "rows_dropped_multitoken_answer": n_rows - len(pairs)}
        if cfg.max_rows and cfg.max_rows < len(pairs):
            info["rows_not_used_max_rows"] = len(pairs) - cfg.max_rows
            pairs = pairs[: cfg.max_rows]
        info["pairs_used"] = len(pairs)
        log.info(
            "%s: %d rows read, %d dropped (an answer is not one token; --multi-token drop), %d not used "
            "(--max-rows), %d pairs used",
            path,
            n_rows,
            info["rows_dropped_multitoken_answer"],
            info.get("rows_not_used_max_rows", 0),
            len(pairs),
        )
    else:
        kw = {"multi_token": "drop"} if cfg.multi_token == "drop" else {}
        pairs = load_builtin(cfg.dataset, cfg.fmt, tokenizer=tokenizer, n=cfg.n_pairs or None, seed=cfg.seed, **kw)
        info = {
            "source": f"built-in {cfg.dataset} ({cfg.fmt})",
            "pairs_per_relation": cfg.n_pairs or "all",
            "pairs_used": len(pairs),
        }
        log.info("built-in %s (%s): %d pairs", cfg.dataset, cfg.fmt, len(pairs))
    if not pairs:
        raise PairError(f"no usable pairs in {info['source']}")
    # Multi-token answers are scored by the first token of each spelling: say how many, and refuse
    # (before any model pass) a pair whose truth and lie cannot be told apart that way.
    answer_set(tokenizer, pairs, multi_token="first")
    info["pairs_multitoken_answer"] = sum(_multi_token(tokenizer, p) for p in pairs)
    if info["pairs_multitoken_answer"]:
        log.info("%d pairs have a multi-token answer: scored by its first token", info["pairs_multitoken_answer"])
    return pairs, info


def check_dataset(cfg: HeadSweepConfig) -> None:
    """Read a pairs file before the model loads (``Study.check``, run by :func:`mechlie.studies.base.launch`):
    a bad row, a lie equal to its truth, or fewer than ``MIN_PAIRS`` rows fails in a second, naming the file
    and line, instead of after the weights load."""
    if not cfg.is_file:
        return
    n = len(load_pairs_file(Path(cfg.dataset)))
    n_used = min(n, cfg.max_rows) if cfg.max_rows else n
    if n_used < MIN_PAIRS:
        rows = f"{n} pairs" + (f", {n_used} used (--max-rows {cfg.max_rows})" if n_used < n else "")
        raise PairError(f"--dataset {cfg.dataset}: {rows}; the head sweep needs at least {MIN_PAIRS}")


def _multi_token(tokenizer, pair: ContrastPair) -> bool:
    """Whether the truth or the lie has no one-token spelling."""
    try:
        answer_token_ids(tokenizer, pair.truth)
        if pair.lie:
            answer_token_ids(tokenizer, pair.lie)
    except AnswerTokenError:
        return True
    return False


def _save_acts(path: Path, acts: dict[str, Activations]) -> None:
    save_tensors(
        path,
        {side: {"acts": a.acts, "logits": a.logits} for side, a in acts.items()},
        {side: {"position": a.position, "meta": a.meta} for side, a in acts.items()},
    )


def _load_acts(path: Path) -> dict[str, Activations]:
    tensors, meta = load_tensors(path)
    return {
        side: Activations(dict(t["acts"]), meta[side]["position"], meta[side]["meta"], t["logits"])
        for side, t in tensors.items()
    }


def _collect(cfg: HeadSweepConfig, model: HookedTransformer, pairs: list[ContrastPair], progress: bool):
    """Stage 1's computation: one pass per prompt gives the behaviour (final logits), the activations
    the directions are fit on, and the honest activations patching takes (z, resid_pre)."""

    def acts() -> dict[str, Activations]:
        out = {}
        for side in ("honest", "lying"):
            prompts = [getattr(p, side) for p in pairs]
            fa = collect_batch(
                model,
                tokenize(model, prompts),
                ACT_KINDS,
                batch_size=cfg.batch_size,
                progress=progress,
                desc=f"{side} prompts",
            )
            meta = {"model": model.cfg.model_name, "n": len(prompts), "kinds": list(ACT_KINDS), "position": -1}
            out[side] = Activations(fa.acts, -1, meta, fa.logits)
        return out

    return acts


def _keep_known(
    cfg: HeadSweepConfig, report: dict, all_pairs: list[ContrastPair], data: dict, warnings: list[str]
) -> tuple[torch.Tensor, list[ContrastPair], Split]:
    """Stage 2's filter (known facts, unless ``known_only=False``) and the train/test split by fact."""
    keep = torch.tensor(report["known"]) if cfg.known_only else torch.ones(len(all_pairs), dtype=torch.bool)
    pairs = [p for p, k in zip(all_pairs, keep.tolist()) if k]
    data["pairs_analysed"] = len(pairs)
    if cfg.known_only:
        data["pairs_dropped_unknown"] = len(all_pairs) - len(pairs)
        log.info(
            "kept %d known pairs of %d (%d dropped: the honest prompt's top-1 token is not the truth)",
            len(pairs),
            len(all_pairs),
            len(all_pairs) - len(pairs),
        )
    if len(pairs) < MIN_PAIRS:
        if cfg.known_only:
            raise PairError(
                f"only {len(pairs)} usable pairs after the known filter; the head sweep needs {MIN_PAIRS}: "
                "use more pairs or --no-known-only"
            )
        raise PairError(
            f"only {len(pairs)} usable pairs (--no-known-only keeps every pair); the head sweep needs {MIN_PAIRS}: "
            "use more pairs"
        )
    split = split_by_fact([p.fact_id for p in pairs], cfg.test_frac, cfg.seed)
    n_test_facts = len({pairs[i].fact_id for i in split.test})
    if n_test_facts < MIN_TEST_FACTS:
        msg = (
            f"only {n_test_facts} held-out facts (< {MIN_TEST_FACTS}): held-out AUROCs are very noisy; "
            "see their CIs, and use more pairs"
        )
        log.warning(msg)
        warnings.append(msg)
    return keep, pairs, split


def _score(cfg: HeadSweepConfig, kept: dict, split: Split):
    """Stage 3's computation: head and layer directions against their many-draw nulls."""

    def dirs() -> dict[str, DirectionScores]:
        out = {}
        for kind in ("head_out", "resid_post"):
            log.info("scoring %s directions (%d null draws, %d random directions)", kind, cfg.n_perm, cfg.n_random)
            t0 = time.perf_counter()
            out[kind] = score_directions(
                kept["honest"][kind],
                kept["lying"][kind],
                split,
                fit=FIT,
                n_perm=cfg.n_perm,
                n_random=cfg.n_random,
                n_boot=cfg.n_boot,
                seed=cfg.seed,
            )
            log.info("%s directions scored in %.1f s", kind, time.perf_counter() - t0)
        return out

    return dirs


def _save_dirs(path: Path, d: dict[str, DirectionScores]) -> None:
    parts = {k: v.to_tensors() for k, v in d.items()}
    save_tensors(path, {k: t for k, (t, _) in parts.items()}, {k: m for k, (_, m) in parts.items()})


def _load_dirs(path: Path) -> dict[str, DirectionScores]:
    tensors, meta = load_tensors(path)
    return {k: DirectionScores.from_tensors(tensors[k], meta[k]) for k in tensors}


def _patch(cfg, model, all_pairs, patch_pairs, honest: Activations, progress: bool, kinds=PATCH_KINDS):
    """Stage 4's computation (``kinds`` on ``patch_pairs``); the honest runs of the patched pairs are
    stage 1's (when its file has every kind)."""
    from mechlie.causal.patching import patch_final_positions

    def patch() -> dict:
        pos = {id(p): i for i, p in enumerate(all_pairs)}
        rows = torch.tensor([pos[id(p)] for p in patch_pairs])
        clean = (
            FinalActs({k: honest.acts[k][rows] for k in kinds}, honest.logits[rows])
            if all(k in honest.acts for k in kinds)
            else None
        )
        return patch_final_positions(
            model, patch_pairs, kinds, batch_size=cfg.batch_size, progress=progress, clean=clean
        )

    return patch


def run_head_sweep(
    cfg: HeadSweepConfig, model: HookedTransformer, run: RunDir | None = None, progress: bool = True
) -> SweepData:
    """Run (or resume) the head sweep.

    Args:
        cfg: the settings (checked when built).
        model: the model to study.
        run: the run folder (``mechlie.core.cli.prepare_run(cfg)`` if not given: named from the
            settings and the dataset file's content; a folder with another config is refused).
        progress: show tqdm bars.

    Returns:
        :class:`SweepData`; :func:`summarize` turns it into the JSON summary.

    Example:
        >>> res = run_head_sweep(HeadSweepConfig(dataset="capitals", n_pairs=20), model)
        >>> summarize(res)["head_auroc"]["null"]["n_pass"]
    """
    run = run if run is not None else prepare_run(cfg)
    warnings: list[str] = []
    all_pairs, data = load_sweep_pairs(cfg, model.tokenizer)
    a = run.stage("activations.safetensors", _collect(cfg, model, all_pairs, progress), _save_acts, _load_acts)
    if len(a["honest"].logits) != len(all_pairs):
        raise PairError(
            f"{run.path}/activations.safetensors holds {len(a['honest'].logits)} pairs, the data "
            f"{len(all_pairs)}; delete that folder and rerun"
        )
    answers = answer_set(model.tokenizer, all_pairs)
    beh = Behaviour(score_logits(a["honest"].logits, answers), score_logits(a["lying"].logits, answers))
    report = behaviour_report(beh, all_pairs, n_boot=cfg.n_boot, seed=cfg.seed)
    run.write_json("behaviour.json", report)
    keep, pairs, split = _keep_known(cfg, report, all_pairs, data, warnings)
    kept = {side: {k: v[keep] for k, v in a[side].acts.items()} for side in ("honest", "lying")}
    d = run.stage("directions.safetensors", _score(cfg, kept, split), _save_dirs, _load_dirs)
    # A few ms per seed (one fit and one AUROC per layer): recomputed, not a stage.
    layer_seeds = (
        scores_over_seeds(
            kept["honest"]["resid_post"],
            kept["lying"]["resid_post"],
            [p.fact_id for p in pairs],
            range(cfg.seed, cfg.seed + cfg.n_layer_seeds),
            fit=FIT,
            test_frac=cfg.test_frac,
        )
        if cfg.n_layer_seeds
        else None
    )

    # Patch held-out pairs first: none of them helped fit a direction.
    order = split.test + split.train
    patch_pairs = [pairs[i] for i in order[: cfg.n_patch]]
    if len(patch_pairs) < cfg.n_patch:
        msg = f"--n-patch {cfg.n_patch} but only {len(patch_pairs)} pairs are available: patching {len(patch_pairs)}"
        log.warning(msg)
        warnings.append(msg)
    patch = _patch(cfg, model, all_pairs, patch_pairs, a["honest"], progress)
    pr = run.stage("patching.safetensors", patch, save_patch, load_patch)
    split_seeds = (
        _split_seeds(cfg, model, run, (all_pairs, pairs, order), a["honest"], kept, d["head_out"], pr["z"], progress)
        if cfg.n_split_seeds
        else None
    )
    return SweepData(
        cfg,
        report,
        pairs,
        split,
        d["head_out"],
        d["resid_post"],
        pr["z"],
        pr["resid_pre"],
        [p.fact_id for p in patch_pairs],
        data,
        warnings,
        run.path,
        layer_seeds,
        split_seeds,
    )


def _split_seeds(
    cfg: HeadSweepConfig,
    model: HookedTransformer,
    run: RunDir,
    rows: tuple[list[ContrastPair], list[ContrastPair], list[int]],
    honest: Activations,
    kept: dict,
    heads: DirectionScores,
    z: "PatchResult",  # noqa: F821
    progress: bool,
) -> dict:
    """The headline over ``n_split_seeds`` splits (:mod:`mechlie.studies.head_sweep_seeds`). Every
    analysed pair needs its head patching: the pairs stage 4 did not patch are patched here, once
    (stage ``patching_rest.safetensors``), and every split reuses the same per-pair results and
    activations; the reported split's direction scores are reused as they are. ``rows``: every
    loaded pair, the analysed pairs, and the order (indices into the analysed pairs) in which stage 4
    patched them."""
    all_pairs, pairs, order = rows
    rest = [pairs[i] for i in order[cfg.n_patch :]]
    ld, lo, hi = z.logit_diff, z.corrupt.logit_diff, z.clean.logit_diff
    if rest:
        patch = _patch(cfg, model, all_pairs, rest, honest, progress, kinds=("z",))
        zr = run.stage("patching_rest.safetensors", patch, save_patch, load_patch)["z"]
        ld, lo, hi = (
            torch.cat([x, y]) for x, y in ((ld, zr.logit_diff), (lo, zr.corrupt.logit_diff), (hi, zr.clean.logit_diff))
        )
    # Rows back in the analysed pairs' order (patched in `order`: held-out facts of the reported split first).
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    t0 = time.perf_counter()
    out = over_split_seeds(
        kept["honest"]["head_out"],
        kept["lying"]["head_out"],
        ld[inv],
        lo[inv],
        hi[inv],
        [p.fact_id for p in pairs],
        range(cfg.seed, cfg.seed + cfg.n_split_seeds),
        test_frac=cfg.test_frac,
        n_perm=cfg.n_perm,
        n_random=cfg.n_random,
        n_boot=cfg.n_boot,
        fit=FIT,
        known={cfg.seed: heads},
    )
    log.info("headline over %d split seeds in %.1f s", cfg.n_split_seeds, time.perf_counter() - t0)
    return out


def head_views(cfg: HeadSweepConfig, model: HookedTransformer, res: SweepData, summary: dict) -> str | None:
    """circuitsvis views of the top 3 heads by patching effect (mechlie.report.views), on the first
    VIEW_PAIRS patched pairs; None, with a warning, when the prompts are not few-shot."""
    from mechlie.report.views import write_head_views

    top3 = [(t["layer"], t["head"]) for t in summary["top_heads_by_patching"][:3]]
    by_fact = {p.fact_id: p for p in res.pairs}
    pairs = [by_fact[f] for f in res.patch_pairs[:VIEW_PAIRS]]
    try:
        return str(write_head_views(model, pairs, top3, res.run_dir, n_boot=cfg.n_boot, seed=cfg.seed))
    except PairError as e:  # e.g. instruct prompts have no demonstrations to attend to
        summary["warnings"].append(f"head views not written: {e}")
        return None


def run(cfg: HeadSweepConfig, model: HookedTransformer, run_dir: RunDir, progress: bool = True) -> HeadSweepResult:
    """The study: the sweep (resumed stage by stage), its summary, its figures (drawn from the saved
    files by :class:`HeadSweepResult`, as ``make_figures`` draws them) and the head views."""
    from mechlie.report.figures import save_figures

    t0 = time.time()
    times = {}
    res = run_head_sweep(cfg, model, run_dir, progress=progress)
    times["sweep"] = time.time() - t0
    summary = summarize(res)
    times["summary"] = time.time() - t0 - sum(times.values())
    result = HeadSweepResult(run_dir.path, summary)
    summary["figures"] = save_figures(result.figures(), run_dir.path)
    times["figures"] = time.time() - t0 - sum(times.values())
    if cfg.views:
        summary["views"] = head_views(cfg, model, res, summary)
        times["views"] = time.time() - t0 - sum(times.values())
    summary["seconds"] = round(time.time() - t0, 1)
    summary["stage_seconds"] = {k: round(v, 1) for k, v in times.items()}
    return result


STUDY = register(Study("head_sweep", HeadSweepConfig, run, HeadSweepResult, check=check_dataset))
