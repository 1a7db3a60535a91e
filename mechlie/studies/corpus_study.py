"""The built-in fact corpus (:mod:`mechlie.core.corpus`): its size per relation and the share of each
relation's facts that each model knows (:mod:`mechlie.read.known`: greedy honest few-shot answer is the
truth), with a Wilson 95% interval over facts.

Cost: the known pass runs one honest 3-shot prompt (about 60 tokens) per fact; on 2 CPU cores that is
far too slow for all ~6,300 facts of two models inside a short script, so by default each relation's
share is measured on a seeded sample of ``--known-per-relation`` (20) of its facts (all of a smaller
relation), drawn round-robin over the relation's distinct answers (so the sample's demonstrations can
avoid each target's truth and lie: the share is over an answer-balanced sample, not weighted by how
often each answer occurs), whose demonstrations come from the same sample. ``--known-per-relation none`` measures
every fact (hours on 2 cores; minutes on a GPU).

The corpus and each model's known filter are cached outside the run folder (the corpus under
``<cache_dir>/corpus/``, the filters under ``<cache_dir>/known/<model_id>/``), so a rerun, or another
study that filters the corpus, reuses them. The run folder holds ``summary.json`` (per relation: facts,
and per model the known share) and ``known.json`` (``model -> fact_id -> known``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from mechlie.core.cli import RunDir
from mechlie.studies.base import Study, StudyResult, ci_text, register

DEFAULT_MODELS = ("smollm2-135m-instruct", "gemma-3-270m")


@dataclass(frozen=True)
class CorpusConfig:
    models: tuple[str, ...] = field(
        default=DEFAULT_MODELS, metadata={"help": "models to compute the known share for (names or comma-separated)"}
    )
    known: bool = field(default=True, metadata={"help": "compute the known share (--no-known: counts only, no model)"})
    n_shots: int = field(default=3, metadata={"help": "demonstrations in the honest few-shot prompt"})
    known_per_relation: int | None = field(
        default=20,
        metadata={"help": "facts per relation (seeded sample) in the known pass; none = every fact (slow on CPU)"},
    )
    seed: int = 0
    rebuild: bool = field(default=False, metadata={"help": "rebuild the cached corpus", "run": False})
    batch_size: int = field(default=16, metadata={"run": False})
    out_dir: str = "results/corpus"
    run_name: str = ""

    def __post_init__(self) -> None:
        models = tuple(m.strip() for entry in self.models for m in entry.split(",") if m.strip())
        object.__setattr__(self, "models", models)  # accept "a,b" as well as "a b"
        if self.known and not models:
            raise ValueError("--models is empty; give at least one model or pass --no-known")
        if self.n_shots < 1 or self.batch_size < 1:
            raise ValueError("--n-shots and --batch-size must be >= 1")
        if self.known_per_relation is not None and self.known_per_relation < self.n_shots + 2:
            raise ValueError("--known-per-relation must be >= --n-shots + 2 (demonstrations come from the sample)")


class CorpusResult(StudyResult):
    study = "corpus"
    required = ("n_relations", "n_facts", "relations", "packages")
    title_format = "Fact corpus: {n_facts} facts in {n_relations} relations"

    def lines(self) -> list[str]:
        s = self.summary()
        out = [f"corpus: {s['n_relations']} relations, {s['n_facts']} facts"]
        width = max(len(r) for r in s["relations"])
        for rel, row in s["relations"].items():
            shares = [f"{m} known {ci_text(k, '.2f')}" for m, k in row.get("known", {}).items()]
            n_known = next(iter(row.get("known", {}).values()), {}).get("n")
            sample = f"  (known on {n_known})  " if n_known is not None else ""
            out.append(f"  {rel:<{width}} {row['n']:>5}" + (sample + "; ".join(shares) if shares else ""))
        return out

    def headline(self) -> list[str]:
        s = self.summary()
        lines = [f"- {s['n_facts']} facts in {s['n_relations']} relations from {', '.join(s['packages'])}."]
        for m, k in s.get("known_all", {}).items():
            lines.append(
                f"- {m} knows {ci_text(k, '.3f')} of a seeded sample of {k['n']} facts "
                f"(up to {s['known_per_relation'] or 'all'} per relation; Wilson 95% CI over facts)."
            )
        return lines

    def report(self) -> str:
        return "\n".join(self.lines())


def run(cfg: CorpusConfig, model: Any, run_dir: RunDir) -> CorpusResult:
    from mechlie.core.corpus import build_info, cache_key, corpus, relations

    ds = corpus(rebuild=cfg.rebuild)
    rels = relations(ds)
    by_rel = {r: [i for i, x in enumerate(ds["relation"]) if x == r] for r in rels}
    summary: dict[str, Any] = {
        "kind": "corpus",
        "n_relations": len(rels),
        "n_facts": len(ds),
        "packages": [f"{k}=={v}" for k, v in build_info()["packages"].items()],
        "cache_key": cache_key(),
        "dropped": build_info()["dropped"],
        "relations": {r: {"n": len(idx), "answer_type": ds[idx[0]]["answer_type"]} for r, idx in by_rel.items()},
    }
    if cfg.known:
        summary.update(_known(cfg, ds, by_rel, summary["relations"], run_dir))
    return CorpusResult(run_dir.path, summary)


def _known(cfg: CorpusConfig, ds, by_rel: dict[str, list[int]], rows: dict, run_dir: RunDir) -> dict:
    """Each model's known share per relation over a seeded sample of ``known_per_relation`` facts of
    it (every fact of a smaller relation); the demonstrations come from the same sample."""
    from mechlie.core.models import load_model, model_id
    from mechlie.read.known import known_facts, known_share

    k = cfg.known_per_relation
    answers = ds["answer"]
    picked = {
        r: _balanced_sample(idx, [answers[i] for i in idx], k, f"{cfg.seed}/known/{r}") for r, idx in by_rel.items()
    }
    order = [i for idx in picked.values() for i in idx]
    sub = ds.select(order)
    known_all, seconds, ids, per_model = {}, {}, {}, {}
    for name in cfg.models:
        t0 = time.time()
        model = load_model(name)
        loaded = time.time()
        ids[name] = model_id(model)
        known = known_facts(model, sub, n_shots=cfg.n_shots, seed=cfg.seed, batch_size=cfg.batch_size, progress=True)
        seconds[name] = {"load": round(loaded - t0, 1), "known": round(time.time() - loaded, 1)}
        per_model[name] = dict(zip(sub["fact_id"], known))
        known_all[name] = known_share(known)
        at = 0
        for rel, idx in picked.items():
            rows[rel].setdefault("known", {})[name] = known_share(known[at : at + len(idx)])
            at += len(idx)
        del model
    run_dir.write_json("known.json", per_model)
    return {
        "models": list(cfg.models),
        "model_ids": ids,
        "known_per_relation": k,
        "n_known_facts": len(order),
        "known_all": known_all,
        "known_seconds": seconds,
    }


def _balanced_sample(idx: list[int], answers: list[str], k: int | None, seed: str) -> list[int]:
    """``k`` of ``idx`` (all if fewer or ``k`` is None), drawn round-robin over the distinct answers (each
    answer's facts in seeded random order), sorted. Balanced over answers so that every target keeps
    demonstrations that avoid its truth and lie (a uniform draw of 20 cities is mostly Asia and Europe)."""
    if k is None or len(idx) <= k:
        return idx
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, a in zip(idx, answers):
        groups.setdefault(a, []).append(i)
    queues = [rng.sample(g, len(g)) for g in groups.values()]
    rng.shuffle(queues)
    out: list[int] = []
    while len(out) < k:
        for q in queues:
            if q and len(out) < k:
                out.append(q.pop())
    return sorted(out)


STUDY = register(Study("corpus", CorpusConfig, run, CorpusResult, load_model=False))

__all__ = ["CorpusConfig", "CorpusResult", "STUDY", "run"]
