"""The steering study: steer a lying model back to the truth with training-free directions,
causally chosen heads and learned minimal edits (vectors, low-rank adapters, gated vectors), beside a
prompting baseline and an honest-only control, reported on relations nothing was fitted or chosen on.

``Config`` holds the flags of ``analyses/steering_demo.py``; :func:`run` does the work (data and
methods: :mod:`mechlie.studies.steering_data`, :mod:`mechlie.studies.steering_methods`; sweep, choice
and evaluation: :mod:`mechlie.studies.steering_eval`); the result is a
:class:`mechlie.studies.steering_result.SteeringResult`.

Splits: directions and learned edits are fitted on the training facts of ``--relations``; every
hyperparameter (layer, alpha, K heads, the edit's scale) is chosen on ``--val-relations`` (most
recovery with validation KL <= ``kl_budget``); the headline is measured on ``--heldout-relations``
(a relation with fewer than ``--min-known`` known facts is refused), with ``--n-controls`` random
draws of the same size (a gated edit's draws randomise its gate too). The fitted relations' own test
facts give the in-relation table, labelled as such. ``--split-seeds`` repeats fit, choice and the
held-out evaluation on other seeds (mean +/- SD).

Every row (the ``prompt baseline`` included: :func:`mechlie.studies.steering_data.prompt_baseline`)
reports recovery with its 95% CI split into real lies undone and sharpening of facts already answered
truthfully, lies flipped, honest accuracy before -> after, KL on neutral text and at the honest
prompts' answer position, and the answer entropy before -> after, and the capability check (share of
unrelated corpus questions the model answered correctly that it still answers correctly, Wilson CI:
:mod:`mechlie.studies.steering_capability`); gated edits report the share of lying / honest /
neutral inputs on which their gate is open. The honest-only control (``honest_only``) is a vector
trained to raise P(truth) on honest prompts only: a method is about honesty only where it beats it by
a margin (0.3 of the gap, the issue's bar). Objectives: ``learned`` raises P(truth), ``learned_kl``
pulls the lying run onto the honest run's answer distribution, ``reft`` maps lying-run residuals onto
honest-run ones (representation level, as ReFT).

Held-out setup (``--heldout-setup``, default ``instructed``): all is fitted and chosen on the few-shot
setup (lies asked for by false demonstrations); the held-out relations (``--heldout-setup-on test``:
the fitted relations' test facts) are asked in a setup that asks for the lie in words, after
``--heldout-setup-demos`` *true* demonstrations that show only the answer format (zero-shot, SmolLM2
answers too few facts at the first token: :func:`mechlie.studies.steering_capability.setup_heldout_pairs`).
Its own known count and lie rate are reported, never refused: a setup the model ignores is a finding.

The default (``DEFAULT_METHODS``, 12 pairs per relation, one KL budget, 8 steps per edit, 4 control
draws, no SAE layer) is sized for minutes on a 2-core CPU (a gated edit, shut on neutral text, meets any KL
budget there and takes its largest scale); the wide sweep is flags (``--methods``,
``--n-per-relation``, ``--n-controls 100``, ``--split-seeds 1 2 3 4`` with or without
``--seeds-lean``, ``--corpus``), and every stage
(edits, each method's sweep and evaluation) is saved as it ends, so a cut run resumes. Alpha is
signed: directions point honest -> lying, so alpha < 0 steers toward honesty. Writes
``summary.json``, ``sweep.json``, ``sweep_<method>.json``, ``eval_<method>.json``, the learned edits
(``*.safetensors``) and ``figures/``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from mechlie.core.cli import RunDir
from mechlie.studies.base import Study, register
from mechlie.studies.steering_best import best_and_demo, mean_of
from mechlie.studies.steering_capability import CAPABILITY_RELATIONS
from mechlie.studies.steering_methods import parse_head, study_methods
from mechlie.studies.steering_result import SteeringResult
from mechlie.studies.steering_stages import (
    Clock,
    Prefixed,
    avg,
    load_sweep,
    n_layers_without_loading,
    read_stage,
    save_json,
    sd,
)

log = logging.getLogger("mechlie")

METHODS = study_methods()
# The default methods: a training-free direction, learned edits on three objectives (P(truth), KL to
# the honest run, the honest run's residual: reft), a conditional edit and the honest-only control;
# ITI, head patching, mean patching, ablation and low-rank edits stay behind --methods (the whole set
# took over 20 minutes on 2 cores).
DEFAULT_METHODS = ("resid", "learned", "learned_kl", "reft", "gated", "honest_only")


def _nonzero(xs: tuple[float, ...], name: str) -> None:
    if not xs or any(not (x == x) or x == 0 for x in xs):
        raise ValueError(f"--{name} needs nonzero numbers (signed: < 0 = toward honesty), got {list(xs)}")


@dataclass(frozen=True)
class Config:
    """The steering study's flags (``--flag`` per field; see :mod:`mechlie.core.cli`)."""

    model: str = field(default="smollm2-135m-instruct", metadata={"help": "embedded name, .gguf, HF dir or TL name"})
    relations: tuple[str, ...] = field(
        default=("capitals", "cities"),
        metadata={"help": "relations the directions and edits are fitted on (their test facts: the in-relation table)"},
    )
    val_relations: tuple[str, ...] = field(
        default=("languages",),
        metadata={"help": "relations every setting is chosen on (not fitted on; needs --min-known known facts)"},
    )
    heldout_relations: tuple[str, ...] = field(
        default=("opposites", "symbols"), metadata={"help": "relations only reported on (the headline)"}
    )
    corpus: bool = field(
        default=False,
        metadata={"help": "take the relations from the fact corpus (mechlie.core.corpus), not the built-in ones"},
    )
    min_known: int = field(
        default=5, metadata={"help": "refuse a held-out relation with fewer known facts (0: no check)"}
    )
    n_per_relation: int = field(default=12, metadata={"help": "pairs sampled per relation (each group of relations)"})
    val_frac: float = 0.2
    test_frac: float = 0.3
    seed: int = 0
    methods: tuple[str, ...] = field(
        default=DEFAULT_METHODS, metadata={"help": f"any of {METHODS} (default: a subset that runs in minutes)"}
    )
    layers: tuple[int, ...] = field(default=(), metadata={"help": "sweep layers (default: 25%% and 45%% of depth)"})
    resid_alphas: tuple[float, ...] = field(
        default=(-0.5, -1.0, -2.0, -3.0), metadata={"help": "signed alphas for resid (x diff-of-means)"}
    )
    head_ks: tuple[int, ...] = field(default=(8, 16), metadata={"help": "K heads for iti and causal"})
    head_alphas: tuple[float, ...] = field(
        default=(-1.0, -2.0, -4.0), metadata={"help": "signed alphas for head shifts (x sigma)"}
    )
    causal_pairs: int = field(default=8, metadata={"help": "training pairs patched to rank heads causally"})
    causal_heads: tuple[str, ...] = field(
        default=(), metadata={"help": "heads for the causal kinds, e.g. L20H5 L29H1 (default: patch training pairs)"}
    )
    mean_alphas: tuple[float, ...] = field(
        default=(-0.5, -1.0, -2.0), metadata={"help": "signed alphas for mean patching (-1 = set z to the honest mean)"}
    )
    sae_layer: int = field(
        default=-1,
        metadata={
            "help": "also learn a vector here, to compare with the SAE cached at the next block's resid_pre (-1: off)"
        },
    )
    edit_budgets: tuple[float, ...] = field(
        default=(0.1,), metadata={"help": "KL budgets (nats/token, train lines) of the learned edits"}
    )
    edit_scales: tuple[float, ...] = field(
        default=(-0.25, -0.5, -0.75, -1.0, -1.5), metadata={"help": "signed scales of a learned edit (-1 = as trained)"}
    )
    edit_steps: int = field(default=8, metadata={"help": "gradient steps per learned edit"})
    edit_pairs: int = field(default=24, metadata={"help": "training pairs used to train an edit"})
    gated_layers: tuple[int, ...] = field(
        default=(), metadata={"help": "blocks of the gated vectors, one edit each (default: the deepest of --layers)"}
    )
    lowrank_rank: int = 2
    lowrank_component: str = "attn_out"
    kl_budget: float = field(default=0.1, metadata={"help": "KL (nats/token) allowed when choosing on validation"})
    n_controls: int = field(
        default=4, metadata={"help": "random draws per control, on held-out relations (>= 100 for p < 0.01)"}
    )
    n_boot: int = 1000
    transfer_format: str = field(
        default="", metadata={"help": "another prompt format for the held-out facts, e.g. instruct ('' = none)"}
    )
    heldout_setup: str = field(
        default="instructed",
        metadata={
            "help": "a setup of mechlie.core.setups nothing is fitted on, asked on the held-out relations ('': none)"
        },
    )
    heldout_template: str = field(default="", metadata={"help": "its template ('': the setup's first)"})
    heldout_setup_demos: int = field(
        default=3,
        metadata={"help": "true demonstrations after the setup's instruction (0: none; see steering_capability)"},
    )
    heldout_setup_on: str = field(
        default="heldout",
        metadata={
            "help": "facts the held-out setup asks: 'test' (the fitted relations' test facts, none trained on) "
            "or 'heldout' (the held-out relations)"
        },
    )
    heldout_chat: bool = field(
        default=False,
        metadata={"help": "render the held-out setup with the chat template (default plain text, as the fit prompts)"},
    )
    capability_relations: tuple[str, ...] = field(
        default=CAPABILITY_RELATIONS, metadata={"help": "corpus relations of the capability check (used nowhere else)"}
    )
    capability_n: int = field(
        default=48, metadata={"help": "questions answered correctly unedited kept for the capability check (0: off)"}
    )
    reft_rank: int = field(default=4, metadata={"help": "rank of the reft edit (representation-level objective)"})
    seeds_lean: bool = field(
        default=False,
        metadata={
            "help": "--split-seeds refit the edits and directions but reuse the main seed's chosen settings "
            "(no sweep) and evaluate on held-out relations only"
        },
    )
    scoring: str = field(
        default="first", metadata={"help": "'first': first answer token; 'full': teacher-forced full answers"}
    )
    split_seeds: tuple[int, ...] = field(
        default=(),
        metadata={"help": "also fit, choose and evaluate on these split seeds (e.g. 1 2 3 4): mean +/- SD"},
    )
    n_demo: int = 8
    max_new_tokens: int = 4
    batch_size: int = field(default=16, metadata={"run": False})
    out_dir: str = "results/steering_demo"
    run_name: str = ""

    def __post_init__(self) -> None:
        bad = set(self.methods) - set(study_methods())
        if bad or not self.methods:
            raise ValueError(f"unknown methods {sorted(bad)}; methods: {study_methods()}")
        if any(l < 0 for l in self.layers + self.gated_layers):
            raise ValueError(f"--layers and --gated-layers must be >= 0, got {list(self.layers + self.gated_layers)}")
        for name in ("resid_alphas", "head_alphas", "edit_scales", "mean_alphas"):
            _nonzero(getattr(self, name), name.replace("_", "-"))
        if any(k < 1 for k in self.head_ks) or not self.head_ks:
            raise ValueError(f"--head-ks must be >= 1, got {list(self.head_ks)}")
        if not self.edit_budgets or any(not b > 0 for b in self.edit_budgets):
            raise ValueError(f"--edit-budgets must be > 0 (nats per token), got {list(self.edit_budgets)}")
        for name in (
            "n_per_relation",
            "batch_size",
            "edit_steps",
            "edit_pairs",
            "causal_pairs",
            "n_boot",
            "n_demo",
            "max_new_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_controls < 2:
            raise ValueError(
                f"--n-controls must be >= 2 (a control is a distribution of random draws), got {self.n_controls}"
            )
        if not 1 <= self.lowrank_rank <= 4:
            raise ValueError(f"--lowrank-rank must be 1..4, got {self.lowrank_rank}")
        if self.lowrank_component not in ("attn_out", "mlp_out", "resid_post"):
            raise ValueError(
                f"--lowrank-component must be attn_out, mlp_out or resid_post, got {self.lowrank_component!r}"
            )
        heads = [parse_head(h) for h in self.causal_heads]
        if heads and max(self.head_ks) > len(heads):
            raise ValueError(f"--head-ks {list(self.head_ks)} asks for more heads than the {len(heads)} --causal-heads")
        if self.sae_layer < -1:
            raise ValueError(f"--sae-layer must be a layer or -1 (off), got {self.sae_layer}")
        if self.scoring not in ("first", "full"):
            raise ValueError(f"--scoring must be 'first' or 'full', got {self.scoring!r}")
        if self.scoring == "full" and {"causal_mean", "probe_mean"} & set(self.methods):
            raise ValueError("--scoring full cannot score final-position mean patching: drop causal_mean/probe_mean")
        if not self.kl_budget > 0:
            raise ValueError(f"--kl-budget must be > 0, got {self.kl_budget}")
        from mechlie.core.pairs import EXTRA_RELATIONS, FORMATS, RELATIONS

        known = RELATIONS + EXTRA_RELATIONS
        groups = {"relations": self.relations, "val-relations": self.val_relations}
        groups["heldout-relations"] = self.heldout_relations
        for name, rels in groups.items():
            bad = [r for r in rels if r not in known and not self.corpus]  # corpus names: checked when it loads
            if bad or not rels:
                raise ValueError(f"--{name} needs relations among {known} (or --corpus), got {list(rels)}")
        every = self.relations + self.val_relations + self.heldout_relations
        if len(set(every)) < len(every):
            raise ValueError(f"a relation is in two of --relations / --val-relations / --heldout-relations: {every}")
        if self.min_known < 0:
            raise ValueError(f"--min-known must be >= 0, got {self.min_known}")
        _check_transfer_flags(self)
        if self.transfer_format and self.transfer_format not in FORMATS:
            raise ValueError(f"--transfer-format must be one of {FORMATS} or '', got {self.transfer_format!r}")
        n_layers = n_layers_without_loading(self.model)
        for name in ("layers", "gated_layers"):
            ls = getattr(self, name)
            if n_layers is not None and any(l >= n_layers for l in ls):
                raise ValueError(
                    f"--{name.replace('_', '-')} {list(ls)}: {self.model} has {n_layers} layers (0..{n_layers - 1})"
                )
        if n_layers is not None and self.sae_layer >= n_layers:
            raise ValueError(f"--sae-layer {self.sae_layer}: {self.model} has {n_layers} layers")


def _check_transfer_flags(cfg: Config) -> None:
    """The held-out setup, the capability check's relations and the reft rank."""
    from mechlie.core.corpus import RELATIONS as CORPUS_RELATIONS
    from mechlie.core.setups import SETUPS

    if cfg.heldout_setup and cfg.heldout_setup not in set(SETUPS) - {"fewshot"}:
        raise ValueError(
            f"--heldout-setup must be one of {sorted(set(SETUPS) - {'fewshot'})} or '' (the fit setup "
            f"is fewshot), got {cfg.heldout_setup!r}"
        )
    if cfg.heldout_setup_on not in ("test", "heldout"):
        raise ValueError(f"--heldout-setup-on must be 'test' or 'heldout', got {cfg.heldout_setup_on!r}")
    if cfg.heldout_template and cfg.heldout_template not in SETUPS.get(cfg.heldout_setup, ()):
        raise ValueError(
            f"--heldout-template {cfg.heldout_template!r} is not a template of "
            f"{cfg.heldout_setup!r}: {SETUPS.get(cfg.heldout_setup, ())}"
        )
    bad = [r for r in cfg.capability_relations if r not in CORPUS_RELATIONS]
    if bad or (cfg.capability_n and not cfg.capability_relations):
        raise ValueError(f"--capability-relations needs corpus relations among {sorted(CORPUS_RELATIONS)}, got {bad}")
    used = set(cfg.relations + cfg.val_relations + cfg.heldout_relations) & set(cfg.capability_relations)
    if used:
        raise ValueError(
            f"--capability-relations {sorted(used)} are also steering relations: the check must be unrelated"
        )
    if cfg.capability_n < 0 or not 1 <= cfg.reft_rank <= 16:
        raise ValueError(f"--capability-n must be >= 0 and --reft-rank 1..16, got {cfg.capability_n}, {cfg.reft_rank}")


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Fitted:
    """One split's fitted state: data, baselines, sweep points, the choices and their notes."""

    data: object  # mechlie.studies.steering_data.SteeringData
    neutral_test: list[str]
    base: dict
    points: dict
    chosen: dict
    notes: dict
    layers: tuple[int, ...]
    sae_layer: int | None


def fit_and_choose(cfg: Config, model, run_dir, clock: Clock, fixed: dict | None = None) -> Fitted:
    """Data for ``cfg.seed``, the edits trained (resumable stages), every method swept on the
    validation relations (one resumable stage per method) and its setting chosen; with ``fixed``
    (method -> chosen sweep point, the lean seed mode) no sweep: those settings are kept."""
    from mechlie.studies import steering_eval as se
    from mechlie.studies.steering_methods import GridContext, study_grid

    L = model.cfg.n_layers
    if any(l >= L for l in cfg.layers + cfg.gated_layers):
        raise ValueError(f"--layers/--gated-layers {list(cfg.layers + cfg.gated_layers)}: the model has {L} layers")
    layers = cfg.layers or tuple(sorted({min(L - 1, round(f * L)) for f in (0.25, 0.45)}))
    with clock(f"data (seed {cfg.seed})"):
        data, neutral_test = _data(cfg, model)
        base = {
            name: se.baseline_summary(es, n_boot=cfg.n_boot, seed=cfg.seed)
            for name, es in [("val", data.val), ("test", data.test), *data.extra.items()]
        }
    sae_layer = cfg.sae_layer if 0 <= cfg.sae_layer < L else None
    with clock(f"fit: edits trained or resumed (seed {cfg.seed})"):
        grid = study_grid(GridContext(model, data, cfg, run_dir, layers, sae_layer), cfg.methods)
    if fixed is not None:
        return Fitted(data, neutral_test, base, {}, dict(fixed), {}, layers, sae_layer)
    points = {}
    for m, g in grid.items():
        with clock(f"sweep {m} ({len(g)} settings, seed {cfg.seed})"):
            points[m] = run_dir.stage(f"sweep_{m}.json", lambda g=g: se.sweep(model, data, g), save_json, load_sweep)
    chosen = {m: se.choose(p, cfg.kl_budget) for m, p in points.items()}
    notes = {m: se.choice_notes(points[m], c, cfg.kl_budget) for m, c in chosen.items()}
    for m, n in notes.items():
        if not n["met_kl_budget"] or n["at_grid_edge"]:
            why = "no setting met the KL budget" if not n["met_kl_budget"] else "chosen at its grid's edge"
            log.warning("%s: %s", m, why)
    return Fitted(data, neutral_test, base, points, chosen, notes, layers, sae_layer)


def run(cfg: Config, model, run_dir: RunDir) -> SteeringResult:
    """Fit on the training relations, sweep each method on the validation relations, choose, evaluate
    on the training relations' test facts (in-relation) and on the held-out relations (with controls),
    beside the prompting baseline; show held-out lies steered back to the truth; with
    ``--split-seeds``, repeat fit, choice and held-out evaluation on each further split seed."""
    from mechlie.report.figures import save_figures
    from mechlie.studies import steering_eval as se
    from mechlie.studies.steering_alignment import alignment

    clock = Clock()
    f = fit_and_choose(cfg, model, run_dir, clock)
    data, neutral_test, base, points, chosen, notes = f.data, f.neutral_test, f.base, f.points, f.chosen, f.notes
    layers, sae_layer = f.layers, f.sae_layer
    run_dir.write_json("sweep.json", {"baseline": base, "sweep": points})
    evals, prompt = _evaluate(cfg, model, data, chosen, run_dir, clock)
    capability = _capability(cfg, model, data, chosen, run_dir, clock)
    with clock("gates, alignment, demo"):
        summary = {
            "kind": "steering",
            "model": model.cfg.model_name,
            "layers": layers,
            "relations": {"fit": cfg.relations, "validation": cfg.val_relations, "heldout": cfg.heldout_relations},
            "known_per_heldout_relation": se.check_known(data.extra["heldout"], 0),
            "baseline": base,
            "chosen_on_validation": chosen,
            "choice_notes": notes,
            "evaluation_on_test": {m: e["heldout"] for m, e in evals.items()},
            "evaluation_in_relation": {m: e["test"] for m, e in evals.items()},
            "transfer": {m: {k: v for k, v in e.items() if k not in ("test", "heldout")} for m, e in evals.items()},
            "prompt_baseline": prompt,
            "capability": capability,
            "heldout_setup": {
                "setup": cfg.heldout_setup,
                "template": cfg.heldout_template or None,
                "rendering": "chat template" if cfg.heldout_chat else "plain text",
                "demonstrations": cfg.heldout_setup_demos,
                "facts": "test facts of the fitted relations (in-relation)"
                if cfg.heldout_setup_on == "test"
                else "held-out relations",
            },
            "alignment": alignment(model, data, sae_layer),
            "edits": {n: e.info for n, e in data.edits.items()},
            "gates": se.gates(model, data, neutral_test),
        }
        summary |= best_and_demo(cfg, model, data, chosen, summary["evaluation_on_test"])
    if cfg.split_seeds:
        summary["split_seeds"] = _seed_repeats(cfg, model, run_dir, clock, summary, chosen)
        summary["split_seeds"]["mode"] = "lean: main seed's settings, refitted" if cfg.seeds_lean else "full"
    summary["seconds"] = clock.seconds | {"total_in_study": round(time.time() - clock.t0, 1)}
    run_dir.write_json("summary.json", summary)  # the figures are drawn from the saved files
    result = SteeringResult.load(run_dir.path)
    result.summary()["figures"] = save_figures(result.figures(), run_dir.path / "figures")
    return result


def _pairs(cfg: Config, model, relations: tuple[str, ...], fmt: str = "fewshot") -> list:
    """``cfg.n_per_relation`` pairs (a seeded sample) of each relation: built-in, or from the fact
    corpus with ``--corpus`` (its demonstrations drawn from the relation's own demonstration pool)."""
    from mechlie.core.pairs import load_builtin

    if not cfg.corpus:
        out = []
        for rel in relations:
            out += load_builtin(rel, fmt, tokenizer=model.tokenizer, n=cfg.n_per_relation, seed=cfg.seed)
        return out
    import random

    from mechlie.core.corpus import corpus, corpus_facts
    from mechlie.core.corpus import relations as corpus_relations
    from mechlie.core.facts import pairs_from_user_facts

    ds = corpus()
    bad = [r for r in relations if r not in corpus_relations(ds)]
    if bad:
        raise ValueError(f"relations {bad} are not in the corpus; it has {corpus_relations(ds)}")
    out = []
    for rel in relations:
        ps = pairs_from_user_facts(corpus_facts(ds, [rel]), fmt, tokenizer=model.tokenizer, seed=cfg.seed)
        if cfg.n_per_relation < len(ps):
            keep = sorted(random.Random(f"{cfg.seed}/sample/{rel}").sample(range(len(ps)), cfg.n_per_relation))
            ps = [ps[i] for i in keep]
        out += ps
    return out


def _data(cfg: Config, model):
    """The split data: fitted on ``cfg.relations`` (their held-out facts: the in-relation test set),
    validated on ``cfg.val_relations``, and the held-out relations (``data.extra["heldout"]``, refused
    when a relation has fewer than ``cfg.min_known`` known facts); and the test neutral lines."""
    from mechlie.studies import steering_eval as se

    pairs, val = _pairs(cfg, model, cfg.relations), _pairs(cfg, model, cfg.val_relations)
    held = _pairs(cfg, model, cfg.heldout_relations)
    log.info(
        "%d pairs to fit on (%s), %d to choose on (%s), %d held out (%s)",
        len(pairs),
        ", ".join(cfg.relations),
        len(val),
        ", ".join(cfg.val_relations),
        len(held),
        ", ".join(cfg.heldout_relations),
    )
    kw = dict(seed=cfg.seed, batch_size=cfg.batch_size, scoring=cfg.scoring)
    data = se.prepare(model, pairs, val_frac=cfg.val_frac, test_frac=cfg.test_frac, val_pairs=val, **kw)
    neutral_test = se.split_lines(se.neutral_lines(), cfg.seed)[2]
    data.extra["heldout"] = se.eval_set(model, "heldout", held, neutral_test, cfg.batch_size, scoring=cfg.scoring)
    known = se.check_known(data.extra["heldout"], cfg.min_known)
    log.info("known facts per held-out relation: %s", known)
    # a validation relation the model does not know would choose every setting on noise
    log.info("known facts per validation relation: %s", se.check_known(data.val, cfg.min_known))
    if cfg.heldout_setup:  # reported with its own known count and lie rate: not refused
        from mechlie.studies.steering_capability import setup_heldout_pairs

        on_test = cfg.heldout_setup_on == "test"
        ps = setup_heldout_pairs(
            cfg.relations if on_test else cfg.heldout_relations,
            cfg.heldout_setup,
            cfg.heldout_template,
            cfg.n_per_relation,
            model.tokenizer,
            cfg.seed,
            cfg.corpus,
            cfg.heldout_chat,
            {p.fact_id for p in data.test.pairs} if on_test else None,
            cfg.heldout_setup_demos,
        )
        name = f"setup:{cfg.heldout_setup}"
        data.extra[name] = se.eval_set(model, name, ps, neutral_test, cfg.batch_size, scoring=cfg.scoring)
        log.info("known facts in the held-out setup %s: %s", cfg.heldout_setup, se.check_known(data.extra[name], 0))
    if cfg.transfer_format:
        other = _pairs(cfg, model, cfg.heldout_relations, cfg.transfer_format)
        name = f"format:{cfg.transfer_format}"
        data.extra[name] = se.eval_set(model, name, other, neutral_test, cfg.batch_size, scoring=cfg.scoring)
    return data, neutral_test


def _evaluate(cfg: Config, model, data, chosen: dict, run_dir: RunDir, clock: Clock) -> tuple[dict, dict]:
    """Each method's chosen setting on the held-out relations (with ``cfg.n_controls`` random draws),
    on the in-relation test facts and on any other transfer set; and the prompting baseline on each.
    One resumable stage per method (``eval_<method>.json``)."""
    from mechlie.studies import steering_eval as se

    kw = dict(n_boot=cfg.n_boot, seed=cfg.seed)
    sets = ["heldout", "test", *(k for k in data.extra if k != "heldout")]

    def one(m: str) -> dict:
        c, ne = chosen[m].setting, {}  # the sets share their neutral lines: measured once per method
        return {
            on: se.evaluate(
                model,
                data,
                c,
                on=on,
                n_controls=cfg.n_controls if on == "heldout" else 0,
                n_control_kl=2,
                neutral_cache=ne,
                **kw,
            )
            for on in sets
        }

    evals = {}
    # learned edits first: if a long run is cut short, the finished stages are kept
    for m in sorted(chosen, key=lambda m: se.KINDS[m].family != "edit"):
        with clock(f"evaluate {m}"):
            evals[m] = run_dir.stage(f"eval_{m}.json", lambda m=m: one(m), save_json, read_stage)
    with clock("evaluate prompt baseline"):
        prompt = {on: se.evaluate_prompt(model, data.test if on == "test" else data.extra[on], **kw) for on in sets}
    return evals, prompt


def _capability(cfg: Config, model, data, chosen: dict, run_dir: RunDir, clock: Clock) -> dict:
    """The capability check (:mod:`mechlie.studies.steering_capability`) of each method's chosen setting
    and of the prompting baseline, as one resumable stage (``capability.json``); {} with --capability-n 0."""
    from mechlie.studies import steering_capability as sc
    from mechlie.studies import steering_eval as se

    if not cfg.capability_n:
        return {}

    def compute() -> dict:
        n_each = -(-3 * cfg.capability_n // (2 * len(cfg.capability_relations)))  # 1.5x: some are not known
        pairs = sc.corpus_pairs(cfg.capability_relations, n_each, model.tokenizer, cfg.seed)
        cap = sc.capability_set(model, pairs, cfg.capability_n, cfg.batch_size)
        out = {m: cap.check(model, [se.intervention(model, data, c.setting)]) for m, c in chosen.items()}
        return {
            "relations": list(cfg.capability_relations),
            "n_candidates": cap.n_candidates,
            "kept_per_relation": cap.known_per_relation,
            "methods": out | {"prompt baseline": cap.check_prompt(model, cfg.batch_size)},
        }

    with clock("capability check"):
        return run_dir.stage("capability.json", compute, save_json, read_stage)


def _seed_repeats(cfg: Config, model, run_dir: RunDir, clock: Clock, summary: dict, chosen: dict) -> dict:
    """Fit, choose and evaluate on the held-out relations once per further split seed (no random
    controls: they are the main seed's); each method's headline (recovery, KL on neutral text, KL at
    the honest answer, honest accuracy change) over all seeds, main seed included, as mean and SD.
    With ``--seeds-lean`` each seed refits the directions and retrains the edits on its own split but
    keeps the main seed's ``chosen`` settings (alpha, scale; no sweep): it measures the variance of
    the fit and of the held-out facts, not of the choice."""
    from dataclasses import replace

    from mechlie.studies import steering_eval as se

    keys = ("recovered", "kl", "kl_honest_answer", "honest_acc_steered")
    rows = {m: {k: [mean_of(r[k])] for k in keys} for m, r in summary["evaluation_on_test"].items()}
    rows["prompt baseline"] = {k: [mean_of(summary["prompt_baseline"]["heldout"][k])] for k in keys}
    seeds = [cfg.seed] + [s for s in cfg.split_seeds if s != cfg.seed]
    for s in seeds[1:]:
        c = replace(cfg, seed=s)
        sub = Prefixed(run_dir, f"seed{s}_")
        f = fit_and_choose(c, model, sub, clock, fixed=chosen if cfg.seeds_lean else None)
        kw = dict(n_boot=cfg.n_boot, seed=s)
        for m, ch in f.chosen.items():
            with clock(f"evaluate {m} (seed {s})"):
                r = sub.stage(
                    f"eval_{m}.json",
                    lambda ch=ch, f=f: se.evaluate(model, f.data, ch.setting, on="heldout", n_controls=0, **kw),
                    save_json,
                    read_stage,
                )
            for k in keys:
                rows[m][k].append(mean_of(r[k]))
        pb = se.evaluate_prompt(model, f.data.extra["heldout"], **kw)
        for k in keys:
            rows["prompt baseline"][k].append(mean_of(pb[k]))
    out = {"seeds": seeds}
    for m, per in rows.items():
        out[m] = {k: {"values": v, "mean": avg(v), "sd": sd(v)} for k, v in per.items()}
    return out


STUDY = register(Study("steering", Config, run, SteeringResult, page_flags=("corpus",)))

__all__ = ["Config", "METHODS", "STUDY", "SteeringResult", "parse_head", "run"]
