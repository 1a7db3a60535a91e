"""The steering study: steer a lying model back to the truth with training-free directions,
causally chosen heads and learned minimal edits (vectors, low-rank adapters, gated vectors), each
method's setting chosen on validation facts and reported on test facts, against random controls.

``Config`` holds the flags of ``analyses/steering_demo.py``; :func:`run` does the work (data and
methods: :mod:`mechlie.studies.steering_data`, :mod:`mechlie.studies.steering_methods`; sweep, choice
and evaluation: :mod:`mechlie.studies.steering_eval`); the result is a
:class:`mechlie.studies.steering_result.SteeringResult`. Pairs are split by fact into train /
validation / test. Directions and learned edits are fitted on train; each method's hyperparameters
(layer, alpha, K heads, the edit's KL budget and scale) are chosen on validation (most recovery with
KL <= ``kl_budget``); the table reports test. Alpha is signed: directions point honest -> lying, so
alpha < 0 steers toward honesty. Writes ``summary.json``, ``sweep.json``, ``evaluation.json``, the
learned edits (``*.safetensors``) and ``figures/``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from mechlie.core.cli import RunDir
from mechlie.studies.base import Study, register
from mechlie.studies.steering_methods import parse_head, study_methods
from mechlie.studies.steering_result import SteeringResult

log = logging.getLogger("mechlie")

METHODS = study_methods()


def _nonzero(xs: tuple[float, ...], name: str) -> None:
    if not xs or any(not (x == x) or x == 0 for x in xs):
        raise ValueError(f"--{name} needs nonzero numbers (signed: < 0 = toward honesty), got {list(xs)}")


@dataclass(frozen=True)
class Config:
    """The steering study's flags (``--flag`` per field; see :mod:`mechlie.core.cli`)."""

    model: str = field(default="smollm2-135m-instruct", metadata={"help": "embedded name, .gguf, HF dir or TL name"})
    dataset: str = field(default="all", metadata={"help": "a built-in relation or 'all'"})
    n_per_relation: int = field(default=20, metadata={"help": "pairs sampled per relation"})
    val_frac: float = 0.2
    test_frac: float = 0.3
    seed: int = 0
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": f"any of {METHODS}"})
    layers: tuple[int, ...] = field(default=(), metadata={"help": "sweep layers (default: 25%% and 45%% of depth)"})
    resid_alphas: tuple[float, ...] = field(
        default=(-0.5, -1.0, -2.0), metadata={"help": "signed alphas for resid (x diff-of-means)"}
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
        default=19,
        metadata={
            "help": "also learn a vector here, to compare with the SAE cached at the next block's resid_pre (-1: off)"
        },
    )
    edit_budgets: tuple[float, ...] = field(
        default=(0.05, 0.1), metadata={"help": "KL budgets (nats/token, train lines) of the learned edits"}
    )
    edit_scales: tuple[float, ...] = field(
        default=(-0.75, -1.0, -1.25), metadata={"help": "signed scales of a learned edit (-1 = as trained)"}
    )
    edit_steps: int = field(default=30, metadata={"help": "gradient steps per learned edit"})
    edit_pairs: int = field(default=32, metadata={"help": "training pairs used to train an edit"})
    gated_layers: tuple[int, ...] = field(
        default=(), metadata={"help": "blocks of the gated vectors, one edit each (default: --layers and --sae-layer)"}
    )
    lowrank_rank: int = 2
    lowrank_component: str = "attn_out"
    kl_budget: float = field(default=0.1, metadata={"help": "KL (nats/token) allowed when choosing on validation"})
    n_controls: int = field(default=16, metadata={"help": "random draws per control"})
    n_boot: int = 1000
    transfer_relation: str = field(
        default="", metadata={"help": "a relation held out of fitting, evaluated as transfer"}
    )
    transfer_format: str = field(
        default="instruct", metadata={"help": "another prompt format for the test facts ('' = none)"}
    )
    scoring: str = field(
        default="first", metadata={"help": "'first': first answer token; 'full': teacher-forced full answers"}
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
        from mechlie.core.pairs import FORMATS, RELATIONS

        if self.dataset != "all" and self.dataset not in RELATIONS:
            raise ValueError(f"--dataset must be 'all' or one of {RELATIONS}, got {self.dataset!r}")
        if self.transfer_relation and self.transfer_relation not in RELATIONS:
            raise ValueError(f"--transfer-relation must be one of {RELATIONS}, got {self.transfer_relation!r}")
        if self.transfer_relation and self.dataset != "all":
            raise ValueError("--transfer-relation needs --dataset all (it is held out of the others)")
        if self.transfer_format and self.transfer_format not in FORMATS:
            raise ValueError(f"--transfer-format must be one of {FORMATS} or '', got {self.transfer_format!r}")
        n_layers = _n_layers_without_loading(self.model)
        for name in ("layers", "gated_layers"):
            ls = getattr(self, name)
            if n_layers is not None and any(l >= n_layers for l in ls):
                raise ValueError(
                    f"--{name.replace('_', '-')} {list(ls)}: {self.model} has {n_layers} layers (0..{n_layers - 1})"
                )
        if n_layers is not None and self.sae_layer >= n_layers:
            raise ValueError(f"--sae-layer {self.sae_layer}: {self.model} has {n_layers} layers")


def _n_layers_without_loading(name: str) -> int | None:
    """The layer count from a local checkpoint's config.json (no weights loaded); None if unknown."""
    try:
        from mechlie.core.models import resolve_hf_dir

        d = resolve_hf_dir(name)
        if d is None:
            return None
        cfg = json.loads((d / "config.json").read_text())
        return int(cfg.get("num_hidden_layers") or cfg["text_config"]["num_hidden_layers"])
    except Exception:  # unknown layout: checked again once the model is loaded
        return None


# ---------------------------------------------------------------------------------------------
# the run


def run(cfg: Config, model, run_dir: RunDir) -> SteeringResult:
    """Split, fit, sweep each method on validation, choose, evaluate on test with controls, compare
    the learned edits with fitted directions, and show prompts steered back to the truth."""
    from mechlie.report.figures import save_figures
    from mechlie.studies import steering_eval as se
    from mechlie.studies.steering_methods import GridContext, study_grid

    L = model.cfg.n_layers
    if any(l >= L for l in cfg.layers + cfg.gated_layers):
        raise ValueError(f"--layers/--gated-layers {list(cfg.layers + cfg.gated_layers)}: the model has {L} layers")
    layers = cfg.layers or tuple(sorted({min(L - 1, round(f * L)) for f in (0.25, 0.45)}))
    data, neutral_test = _data(cfg, model)
    base = {
        name: se.baseline_summary(es, n_boot=cfg.n_boot, seed=cfg.seed)
        for name, es in [("val", data.val), ("test", data.test), *data.extra.items()]
    }
    t = base["test"]
    log.info(
        "baseline, test (%d facts): P(truth) honest %s, lying %s, lie rate %s",
        t["n_facts"],
        t["p_truth_honest"],
        t["p_truth_lying"],
        t["lie_rate"],
    )
    sae_layer = cfg.sae_layer if 0 <= cfg.sae_layer < L else None
    grid = study_grid(GridContext(model, data, cfg, run_dir, layers, sae_layer), cfg.methods)
    points = {m: se.sweep(model, data, g) for m, g in grid.items()}
    run_dir.write_json("sweep.json", {"baseline": base, "sweep": points})
    chosen = {m: se.choose(p, cfg.kl_budget) for m, p in points.items()}
    evals = _evaluate(cfg, model, data, chosen, run_dir)
    summary = {
        "kind": "steering",
        "model": model.cfg.model_name,
        "layers": layers,
        "baseline": base,
        "chosen_on_validation": chosen,
        "evaluation_on_test": evals,
        "alignment": _alignment(model, data, sae_layer),
        "edits": {n: e.info for n, e in data.edits.items()},
        "gates": _gates(model, data, neutral_test),
    }
    summary |= _best_and_demo(cfg, model, data, chosen, evals)
    run_dir.write_json("summary.json", summary)  # the figures are drawn from the saved files
    result = SteeringResult.load(run_dir.path)
    result.summary()["figures"] = save_figures(result.figures(), run_dir.path / "figures")
    return result


def _data(cfg: Config, model):
    """The split data with the transfer sets (a held-out relation, another prompt format), and the
    test neutral lines."""
    from mechlie.core.pairs import load_builtin
    from mechlie.studies import steering_eval as se

    pairs = load_builtin(cfg.dataset, "fewshot", tokenizer=model.tokenizer, n=cfg.n_per_relation, seed=cfg.seed)
    held = [p for p in pairs if p.relation == cfg.transfer_relation]
    pairs = [p for p in pairs if p.relation != cfg.transfer_relation]
    n_facts = len({p.fact_id for p in pairs})
    log.info("%d pairs (%d facts) for fitting; %d held-out-relation pairs for transfer", len(pairs), n_facts, len(held))
    kw = dict(seed=cfg.seed, batch_size=cfg.batch_size, scoring=cfg.scoring)
    data = se.prepare(model, pairs, val_frac=cfg.val_frac, test_frac=cfg.test_frac, **kw)
    neutral_test = se.split_lines(se.neutral_lines(), cfg.seed)[2]
    extra = {}
    if held:
        extra[f"relation:{cfg.transfer_relation}"] = held
    if cfg.transfer_format:
        test_facts = {p.fact_id for p in data.test.pairs}
        other = load_builtin(cfg.dataset, cfg.transfer_format, tokenizer=model.tokenizer, seed=cfg.seed)
        other = [p for p in other if p.fact_id in test_facts]
        if other:
            extra[f"format:{cfg.transfer_format}"] = other
    for name, ps in extra.items():
        data.extra[name] = se.eval_set(model, name, ps, neutral_test, cfg.batch_size, scoring=cfg.scoring)
    return data, neutral_test


def _evaluate(cfg: Config, model, data, chosen: dict, run_dir: RunDir) -> dict[str, dict]:
    """Each method's chosen setting on test (with controls) and on every transfer set."""
    from mechlie.studies import steering_eval as se

    evals: dict[str, dict] = {}
    # learned edits first: if a long run is cut short, the partial evaluation.json has them
    for m, c in sorted(chosen.items(), key=lambda mc: se.KINDS[mc[0]].family != "edit"):
        evals[m] = se.evaluate(model, data, c.setting, n_controls=cfg.n_controls, n_boot=cfg.n_boot, seed=cfg.seed)
        for name in data.extra:
            evals[m][f"transfer:{name}"] = se.evaluate(
                model, data, c.setting, on=name, n_controls=0, n_boot=cfg.n_boot, seed=cfg.seed
            )
        run_dir.write_json("evaluation.json", {"chosen": chosen, "evaluation": evals})  # partial results survive
    return evals


def _alignment(model, data, sae_layer: int | None) -> dict:
    """How the learned edits line up with the difference of means, with probes and (when an SAE is
    cached at ``sae_layer``) with its decoder rows."""
    from mechlie.control import edits
    from mechlie.studies.steering_data import reference_directions

    alignment = {}
    sae_rows = _cached_sae_rows(model, sae_layer) if sae_layer is not None else None
    typical = (2 / (3.14159 * model.cfg.d_model)) ** 0.5  # kept as written (not math.pi): the same numbers
    for name, e in data.edits.items():
        at = sorted(e.vectors) if isinstance(e, edits.LearnedVector) else [e.layer]
        alignment[name] = {f"layer {l}": edits.alignment(e, reference_directions(data, l), l) for l in at}
        for l in at:
            alignment[name][f"layer {l}"]["random_direction_typical_abs_cos"] = typical
            if isinstance(sae_rows, tuple) and l == sae_layer:
                rows = edits.row_alignment(e.direction(l), sae_rows[1])
                alignment[name][f"layer {l}"]["sae_decoder_rows"] = rows | {"sae": sae_rows[0]}
    if sae_layer is not None:
        dom = reference_directions(data, sae_layer, ("diff_of_means",))["diff_of_means"]
        alignment["diff_of_means (reference)"] = {
            f"layer {sae_layer}": {"sae_decoder_rows": edits.row_alignment(dom, sae_rows[1]) | {"sae": sae_rows[0]}}
            if isinstance(sae_rows, tuple)
            else {"sae_decoder_rows": sae_rows}
        }
    return alignment


def _cached_sae_rows(model, layer: int):
    """``(path, decoder rows)`` of the cached SAE at ``blocks.{layer+1}.hook_resid_pre`` (= resid_post of
    block ``layer``, where a learned vector is added), as analyses/sae_features.py trains it with its
    default settings; or the reason it is absent (it is not trained here: that takes long)."""
    try:
        from mechlie import sae as msae
        from mechlie.core.hooks import hook_name
        from mechlie.core.models import default_cache_dir

        cfg = msae.SAETrainConfig(site=hook_name("resid_pre", layer + 1))
        path = default_cache_dir() / "sae" / msae.cache_key(model, cfg)
        if not (path / "mechlie.json").is_file():
            return f"no cached SAE for {cfg.site} (run analyses/sae_features.py first)"
        sae = msae.load_sae(path)
        msae.check_sae(sae, model, msae.Site.parse(cfg.site))
        return str(path), msae.decoder_rows(sae).float().cpu()
    except Exception as e:  # the SAE is optional here: report why it is missing
        return f"SAE not loaded: {type(e).__name__}: {str(e)[:200]}"


def _gates(model, data, neutral_test: list[str]) -> dict:
    """Where the gated edits write: their gate's opening on held-out (test) text, unedited."""
    from mechlie.control import edits

    return {
        name: {
            "test_lying_final": float(edits.gate_opening(model, e, [p.lying for p in data.test.pairs]).mean()),
            "test_honest_final": float(edits.gate_opening(model, e, [p.honest for p in data.test.pairs]).mean()),
            "test_neutral_tokens": float(edits.gate_opening(model, e, neutral_test, final_only=False).mean()),
            "train_lying_final": e.info.get("gate_lying_final"),
            "train_neutral_tokens": e.info.get("gate_neutral_tokens"),
        }
        for name, e in data.edits.items()
        if isinstance(e, edits.GatedVector)
    }


def _best_and_demo(cfg: Config, model, data, chosen: dict, evals: dict) -> dict:
    """The best method, chosen on *validation* (choosing it on test would make the headline a
    best-of-N on test), and held-out prompts where the model really lies steered with it."""
    from mechlie.studies import steering_eval as se

    ok = {m: c for m, c in chosen.items() if c.kl <= cfg.kl_budget} or chosen
    best = max(ok, key=lambda m: ok[m].recovered)
    setting = chosen[best].setting
    iv, iv_lie = se.intervention(model, data, setting), se.intervention(model, data, setting.flipped())
    lies = se.lying_rows(data.test)
    honest_ok = [i for i in range(len(data.test.pairs)) if bool(data.test.base_honest.correct[i])]
    best_r = evals[best]
    return {
        "best": {
            "method": best,
            "chosen_by": f"most recovered on validation among methods with validation KL <= {cfg.kl_budget}",
            "setting": setting,
            "recovered": best_r["recovered"],
            "kl": best_r["kl"],
            "goal": "recovered >= 0.85 at KL <= 0.1 nats on test",
            "goal_met": bool(best_r["recovered"].mean >= 0.85 and best_r["kl"].mean <= 0.1),
        },
        "demo": {
            "setting": setting,
            "n_lying_test_prompts": len(lies),
            "lies_flipped_back": _demo_rows(cfg, model, data, lies[: cfg.n_demo], "lying", iv, data.test.base_lying),
            "honest_steered_into_lies": _demo_rows(
                cfg, model, data, honest_ok[: cfg.n_demo], "honest", iv_lie, data.test.base_honest
            ),
        },
    }


def _demo_rows(cfg: Config, model, data, rows: list[int], which: str, iv, base_scores) -> list[dict]:
    """Test prompts ``rows`` generated before and after steering, with P(truth) before and after."""
    from mechlie.core.generation import generate
    from mechlie.studies.steering_data import score_prompts

    if not rows:
        return []
    gen_kw = dict(max_new_tokens=cfg.max_new_tokens, stop_strings=("\n",))
    ps = [data.test.pairs[i] for i in rows]
    prompts = [getattr(p, which) for p in ps]
    before, after = generate(model, prompts, **gen_kw), generate(model, prompts, interventions=[iv], **gen_kw)
    p_after = score_prompts(model, ps, which, [iv], scoring=cfg.scoring, batch_size=cfg.batch_size).p_truth
    return [
        {
            "question": p.question,
            "truth": p.truth,
            "before": before.texts[j].strip(),
            "after": after.texts[j].strip(),
            "p_truth_before": float(base_scores.p_truth[i]),
            "p_truth_after": float(p_after[j]),
        }
        for j, (i, p) in enumerate(zip(rows, ps))
    ]


STUDY = register(Study("steering", Config, run, SteeringResult))

__all__ = ["Config", "METHODS", "STUDY", "SteeringResult", "parse_head", "run"]
