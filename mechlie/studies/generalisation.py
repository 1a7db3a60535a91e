"""Does lie detection generalise? The held-out matrix and the diversity curve, on every model.

Per model (``--models``; each loaded only when a stage needs it):

1. **Data** (:mod:`mechlie.studies.generalisation_data`): up to ``--facts-per-relation`` known facts of
   every corpus relation (:func:`mechlie.core.corpus.corpus`; known by
   :func:`mechlie.read.known.known_facts` among ``--candidates-per-relation`` seeded candidates), asked
   under every setup of :data:`mechlie.core.setups.SETUPS` (one template per fact and setup). One stage
   per setup: greedy honest, greedy lying and ``--k`` sampled lying answers, states read at
   ``--n-layers-read`` evenly spaced blocks (``blocks.L.hook_resid_post``) at ``prompt_final``,
   ``answer_first`` and ``answer_mean`` only (memory: a few layers, three positions). Lie rates per
   setup x relation with Wilson CIs; junk and paraphrases counted. A setup with fewer than
   ``--min-lies`` labelled lies is reported as skipped and left out of the analysis.
2. **The matrix** (:mod:`mechlie.studies.generalisation_eval`): every reading (on-policy labels at
   ``answer_first`` and ``answer_mean``; framing labels at ``prompt_final`` as a second reading) x probe
   kind (``--probes``) x held-out unit (relation, setup, template): mean held-out AUROC with a CI over
   facts and a CI over held-out units, beside the permutation null (labels permuted across facts within
   each training relation) and the random-direction null (``--n-null`` / ``--n-random`` draws; bar = q95
   of the per-draw mean over units), the surprisal baseline and the mixed-facts cell.
3. **The diversity curve** (reading ``--position``): held-out AUROC against the number of training
   relations (``--curve-relations``, ``--curve-draws`` seeded draws each, tested on relations outside
   every training set) and against the number of training setups (``--curve-setups``, each setup held out
   in turn), with CIs and both nulls.

Resumable by stages: ``<model>/facts.json``, ``<model>/gen_<setup>.safetensors`` (states, labels and
texts; the expensive part) and ``<model>/analysis.json``; a rerun loads every finished stage and loads
no model when nothing is left to generate. Writes RUN/: summary.json, results.json, figures/.

The default is the full command (both models, every corpus relation, the whole matrix and curve); its
measured time is in ``analyses/generalise.py``. ``--threads`` sets torch's CPU threads.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mechlie.studies.base import RunFormatError, Study, StudyResult, register

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from mechlie.core.cli import RunDir

log = logging.getLogger("mechlie")

DEFAULT_MODELS = ("smollm2-135m-instruct", "gemma-3-270m")
POSITIONS = ("answer_first", "answer_mean")


@dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = field(default=DEFAULT_MODELS, metadata={"help": "models, each run in turn"})
    relations: tuple[str, ...] = field(default=(), metadata={"help": "corpus relations (default: all)"})
    setups: tuple[str, ...] = field(default=(), metadata={"help": "lie setups (default: all of SETUPS)"})
    facts_per_relation: int = field(default=4, metadata={"help": "known facts used per relation"})
    candidates_per_relation: int = field(default=16, metadata={"help": "seeded facts checked for 'known'"})
    known_filter: bool = field(default=True, metadata={"help": "use only facts the model knows"})
    k: int = field(default=5, metadata={"help": "sampled answers per lying prompt"})
    temperature: float = 1.0
    max_new_tokens: int = field(default=4, metadata={"help": "raised to the longest truth's token count"})
    n_shots: int = field(default=3, metadata={"help": "demonstrations of the fewshot setup"})
    n_layers_read: int = field(default=8, metadata={"help": "evenly spaced blocks whose states are kept"})
    probes: tuple[str, ...] = field(default=("logistic", "diff_of_means"), metadata={"help": "probe kinds"})
    position: str = field(default="answer_first", metadata={"help": "reading of the curve and the headline"})
    min_lies: int = field(default=10, metadata={"help": "a setup with fewer labelled lies is skipped"})
    curve_relations: tuple[int, ...] = field(default=(1, 2, 4, 8, 16), metadata={"help": "training relations"})
    curve_setups: tuple[int, ...] = field(default=(1, 2, 3), metadata={"help": "training setups"})
    curve_draws: int = field(default=3, metadata={"help": "seeded draws per curve point"})
    n_null: int = field(default=200, metadata={"help": "permutation-null refits per fit"})
    n_random: int = field(default=200, metadata={"help": "random-direction probes per fit"})
    n_boot: int = 500
    test_frac: float = field(default=0.5, metadata={"help": "facts held out with a setup or template"})
    seed: int = 0
    batch_size: int = field(default=16, metadata={"run": False, "help": "prompts per generation batch"})
    threads: int = field(default=0, metadata={"run": False, "help": "torch CPU threads (0: leave as is)"})
    out_dir: str = "results/generalise"
    run_name: str = ""

    def __post_init__(self) -> None:
        from mechlie.core.setups import SETUPS
        from mechlie.read.probes import probe_kinds

        if not self.models or len(set(self.models)) < len(self.models):
            raise ValueError(f"--models must be distinct model names, got {self.models}")
        bad = sorted(set(self.setups) - set(SETUPS))
        if bad or len(set(self.setups)) < len(self.setups):
            raise ValueError(f"--setups must be distinct values of {tuple(SETUPS)}, got {self.setups}")
        bad = sorted(set(self.probes) - {"diff_of_means", "logistic", "mass_mean", "lat"})
        if not self.probes or bad:
            raise ValueError(f"--probes must be among diff_of_means, logistic, mass_mean, lat ({probe_kinds()})")
        if self.position not in POSITIONS:
            raise ValueError(f"--position must be one of {POSITIONS}, got {self.position!r}")
        for name in ("facts_per_relation", "candidates_per_relation", "k", "n_layers_read", "curve_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.facts_per_relation > self.candidates_per_relation:
            raise ValueError("--facts-per-relation must be at most --candidates-per-relation")
        if self.max_new_tokens < 2 or self.n_layers_read < 2:
            raise ValueError("--max-new-tokens and --n-layers-read must be >= 2")
        if min(self.n_null, self.n_random) < 0 or self.n_boot < 10 or self.min_lies < 2:
            raise ValueError("--n-null/--n-random must be >= 0, --n-boot >= 10, --min-lies >= 2")
        if any(n < 1 for n in self.curve_relations + self.curve_setups):
            raise ValueError("--curve-relations and --curve-setups must be >= 1")
        if not 0 < self.test_frac < 1:
            raise ValueError("--test-frac must be in (0, 1)")


def slug(model: str) -> str:
    """A folder name for a model (its file stem for a path)."""
    name = Path(model).stem if ("/" in model or model.endswith(".gguf")) else model
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") or "model"


class _Clock:
    """Seconds per stage, printed as each ends (the run's progress)."""

    def __init__(self, prefix: str):
        self.prefix, self.t, self.times = prefix, time.time(), {}

    def __call__(self, name: str) -> None:
        now = time.time()
        self.times[name] = round(now - self.t, 1)
        self.t = now
        log.info("[%s] %s: %.1f s", self.prefix, name, self.times[name])


class _LazyModel:
    """Loads the model on first use, so a fully resumed run loads none."""

    def __init__(self, name: str):
        self.name, self.model, self.loaded = name, None, False

    def __call__(self):
        if self.model is None:
            from mechlie.core import models

            t = time.time()
            self.model = models.load_model(self.name, device="cpu")
            self.loaded = True
            log.info("[%s] model loaded in %.1f s", self.name, time.time() - t)
        return self.model


def _json_stage(run_dir: RunDir, name: str, compute: Callable[[], Any]) -> Any:
    from mechlie.core.io import atomic_write_json, read_json

    return run_dir.stage(name, compute, lambda p, v: atomic_write_json(p, v), read_json)


def _facts_json(facts: dict, info: dict) -> dict:
    as_dict = lambda f: {  # noqa: E731
        "question": f.question,
        "answer": f.answer,
        "fact_id": f.fact_id,
        "relation": f.relation,
        "aliases": list(f.aliases),
    }
    return {
        "candidates": {r: [as_dict(f) for f in fs] for r, fs in facts["candidates"].items()},
        "used": {r: [as_dict(f) for f in fs] for r, fs in facts["used"].items()},
        "info": info,
    }


def _facts_from_json(d: dict) -> dict:
    from mechlie.studies.generalisation_data import AliasedFact

    make = lambda x: AliasedFact(  # noqa: E731
        x["question"], x["answer"], None, x["fact_id"], relation=x["relation"], aliases=tuple(x["aliases"])
    )
    return {k: {r: [make(x) for x in fs] for r, fs in d[k].items()} for k in ("candidates", "used")}


def _model_run(cfg: Config, name: str, ds, relations: list[str], setups: list[str], run_dir: RunDir) -> dict:
    """Facts, one generation stage per setup, and the analysis of one model (each stage resumable)."""
    from mechlie.core.corpus import relation_answers
    from mechlie.studies import generalisation_data as D

    clock, model, s = _Clock(name), _LazyModel(name), slug(name)

    def facts_stage() -> dict:
        facts, info = D.select_facts(model, ds, relations, cfg)
        return _facts_json(facts, info)

    fj = _json_stage(run_dir, f"{s}/facts.json", facts_stage)
    facts = _facts_from_json(fj)
    clock("facts")
    if not facts["used"]:
        raise ValueError(f"{name}: no relation has 2 known facts among its candidates; see {s}/facts.json")
    pool = {r: relation_answers(ds, r) for r in facts["used"]}
    valid = {r: relation_answers(ds, r, with_aliases=True) for r in facts["used"]}
    stages = {}
    for setup in setups:

        def gen(setup: str = setup) -> tuple[dict, dict]:
            m = model()
            pairs = D.setup_pairs_for(facts, setup, m.tokenizer, pool, cfg)
            log.info("[%s] %s: %d pairs, generating", name, setup, len(pairs))
            return D.generate_setup(m, pairs, valid, D.read_layers(m.cfg.n_layers, cfg.n_layers_read), cfg)

        stages[setup] = run_dir.stage(f"{s}/gen_{setup}.safetensors", gen, D.save_stage, D.load_stage)
        clock(f"generation {setup}")
    model.model = None  # the analysis needs no model: free its memory
    analysis = _json_stage(run_dir, f"{s}/analysis.json", lambda: analyse(cfg, stages, fj["info"]))
    clock("analysis")
    analysis["time_s"] = clock.times
    analysis["model_loaded"] = model.loaded
    return analysis


def analyse(cfg: Config, stages: dict, fact_info: dict) -> dict:
    """Lie rates, skipped setups, the matrix of every reading and the curves of ``cfg.position``."""
    from mechlie.studies import generalisation_data as D
    from mechlie.studies import generalisation_eval as E

    ev = E.EvalSettings(cfg.n_null, cfg.n_random, cfg.n_boot, cfg.test_frac, seed=cfg.seed)
    counts = D.answer_counts(stages, cfg.known_filter)
    skipped = {
        s: f"{c.get('lie', 0)} labelled lies (fewer than --min-lies {cfg.min_lies})"
        for s, c in counts.items()
        if c.get("lie", 0) < cfg.min_lies
    }
    for s, why in skipped.items():
        log.warning("setup %s skipped: %s", s, why)
    kept = {s: v for s, v in stages.items() if s not in skipped}
    out: dict[str, Any] = {
        "facts": fact_info,
        "layers_read": next(iter(stages.values()))[1]["layers"] if stages else [],
        "answer_counts": counts,
        "skipped_setups": skipped,
        "lie_rates": {s: meta["lie_rates"] for s, (_, meta) in stages.items()},
        "readings": {},
        "curve": {},
    }
    if not kept:
        return out
    for reading in D.READINGS:
        label_kind, position = reading.split("/")
        if label_kind == "framing":
            rows, dropped = D.framing_rows(kept, cfg.known_filter)
        else:
            rows, dropped = D.on_policy_rows(kept, position, cfg.known_filter)
        entry: dict[str, Any] = {"rows": rows.counts(), "left_out": dropped, "matrix": {}}
        for kind in cfg.probes:
            t = time.time()
            entry["matrix"][kind] = {by: E.held_out(rows, by, kind, ev) for by in E.UNITS}
            log.info("%s %s: matrix in %.1f s", reading, kind, time.time() - t)
        out["readings"][reading] = entry
        if position == cfg.position and label_kind == "on-policy":
            for kind in cfg.probes:
                t = time.time()
                out["curve"][kind] = {
                    "relations": E.relation_curve(rows, cfg.curve_relations, cfg.curve_draws, kind, ev),
                    "setups": E.setup_curve(rows, cfg.curve_setups, cfg.curve_draws, kind, ev),
                }
                log.info("%s %s: curves in %.1f s", reading, kind, time.time() - t)
    return out


def run(cfg: Config, model: Any, run_dir: RunDir) -> GeneralisationResult:
    """Every model in turn (see the module docstring); writes results.json, summary.json and figures."""
    from mechlie.core import corpus as C
    from mechlie.core.io import atomic_write_json
    from mechlie.core.setups import SETUPS
    from mechlie.report import figures as figlib
    from mechlie.studies.generalisation_figures import summarise

    t0 = time.time()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    ds = C.corpus()
    relations = list(cfg.relations) or C.relations(ds)
    unknown = sorted(set(relations) - set(C.relations(ds)))
    if unknown:
        raise ValueError(f"--relations: unknown {unknown}; the corpus has {C.relations(ds)}")
    setups = list(cfg.setups) or list(SETUPS)
    per_model = {m: _model_run(cfg, m, ds, relations, setups, run_dir) for m in cfg.models}
    atomic_write_json(run_dir.file("results.json"), {"models": list(cfg.models), "per_model": per_model})
    summary = summarise(cfg, per_model)
    summary["seconds_total"] = round(time.time() - t0, 1)
    run_dir.write_json("summary.json", summary)
    res = GeneralisationResult.load(run_dir.path)
    summary["figures"] = figlib.save_figures(res.figures(), run_dir.path / "figures")
    return GeneralisationResult(run_dir.path, summary)


class GeneralisationResult(StudyResult):
    """A generalisation run: ``summary.json`` (headline numbers per model) and ``results.json`` (every
    held-out unit, the lie rates per setup x relation, the curves)."""

    study = "generalisation"
    required = ("models", "per_model", "position")
    files = ("results.json",)

    def results(self) -> dict:
        import json

        path = self.run_dir / "results.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunFormatError(f"{path} cannot be read ({e}); rerun the generalisation study") from e

    def title(self) -> str:
        s = self._summary
        return f"Lie detection that generalises: {', '.join(s['models'])} ({s['n_relations']} relations)"

    def figures(self) -> dict[str, go.Figure]:
        from mechlie.studies.generalisation_figures import figures

        return figures(self._summary, self.results())

    def captions(self) -> dict[str, str]:
        from mechlie.studies.generalisation_figures import captions

        return captions(self._summary)

    def headline(self) -> list[str]:
        from mechlie.studies.generalisation_figures import headline

        return headline(self._summary)

    def report(self) -> str:
        from mechlie.studies.generalisation_figures import report_text

        return report_text(self._summary) + "\n" + "\n".join(self.wrote())


STUDY = register(Study("generalisation", Config, run, GeneralisationResult, load_model=False))
