"""Steer a lying model back to the truth: training-free directions, causally chosen heads and learned
minimal edits (vectors, low-rank adapters, gated vectors), each chosen on validation facts and
reported on test facts, against random controls.

    python analyses/steering_demo.py                         # default: a few minutes on a CPU
    python analyses/steering_demo.py --layers 8 14 --resid-alphas -1 -2 --no-lowrank
    python analyses/steering_demo.py --transfer-relation opposites --n-controls 32

Pairs are split by fact into train / validation / test (mechlie.studies.steering_eval). Directions and
learned edits are fitted on train; each method's hyperparameters (layer, alpha, K heads, the edit's
KL budget and scale) are chosen on validation (most recovery with KL <= --kl-budget); the table
reports test. Alpha is signed: directions point honest -> lying, so alpha < 0 steers toward honesty.
Writes results/steering_demo/<run>/: summary.json, sweep.json, edits (*.safetensors) and figures.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field

from mechlie.core.cli import RunDir, run_script

log = logging.getLogger("mechlie")

METHODS = ("resid", "iti", "causal", "causal_mean", "probe_mean", "ablation", "learned", "lowrank", "gated")


def parse_head(text: str) -> tuple[int, int]:
    """``"L20H5"`` -> ``(20, 5)``."""
    import re

    m = re.fullmatch(r"L(\d+)H(\d+)", text.strip())
    if not m:
        raise ValueError(f"--causal-heads takes heads like L20H5, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _neg(xs: tuple[float, ...], name: str) -> None:
    if not xs or any(not (x == x) or x == 0 for x in xs):
        raise ValueError(f"--{name} needs nonzero numbers (signed: < 0 = toward honesty), got {list(xs)}")


@dataclass(frozen=True)
class Config:
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
        bad = set(self.methods) - set(METHODS)
        if bad or not self.methods:
            raise ValueError(f"unknown methods {sorted(bad)}; methods: {METHODS}")
        if any(l < 0 for l in self.layers + self.gated_layers):
            raise ValueError(f"--layers and --gated-layers must be >= 0, got {list(self.layers + self.gated_layers)}")
        for name in ("resid_alphas", "head_alphas", "edit_scales", "mean_alphas"):
            _neg(getattr(self, name), name.replace("_", "-"))
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


def _cached_sae_rows(model, layer: int):
    """``(path, decoder rows)`` of the cached SAE at ``blocks.{layer+1}.hook_resid_pre`` (= resid_post of
    block ``layer``, where a learned vector is added), as analyses/sae_features.py trains it with its
    default settings; or the reason it is absent (it is not trained here: that takes long)."""
    try:
        from mechlie.core.models import default_cache_dir
        from mechlie.sae import features as msae

        cfg = msae.SAETrainConfig(site=f"blocks.{layer + 1}.hook_resid_pre")
        path = default_cache_dir() / "sae" / msae.cache_key(model, cfg)
        if not (path / "mechlie.json").is_file():
            return f"no cached SAE for {cfg.site} (run analyses/sae_features.py first)"
        sae = msae.load_sae(path)
        msae.check_sae(sae, model, msae.Site.parse(cfg.site))
        return str(path), msae.decoder_rows(sae).float().cpu()
    except Exception as e:  # the SAE is optional here: report why it is missing
        return f"SAE not loaded: {type(e).__name__}: {str(e)[:200]}"


def main(cfg: Config, run: RunDir) -> dict:
    import torch

    from mechlie.control import edits
    from mechlie.core.generation import generate
    from mechlie.core.models import load_model
    from mechlie.core.pairs import load_builtin
    from mechlie.report import steering_figures as sf
    from mechlie.report.plotting import save_figure
    from mechlie.studies import steering_eval as se

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model)
    L = model.cfg.n_layers
    if any(l >= L for l in cfg.layers + cfg.gated_layers):
        raise ValueError(f"--layers/--gated-layers {list(cfg.layers + cfg.gated_layers)}: the model has {L} layers")
    layers = cfg.layers or tuple(sorted({min(L - 1, round(f * L)) for f in (0.25, 0.45)}))
    pairs = load_builtin(cfg.dataset, "fewshot", tokenizer=model.tokenizer, n=cfg.n_per_relation, seed=cfg.seed)
    held = [p for p in pairs if p.relation == cfg.transfer_relation]
    pairs = [p for p in pairs if p.relation != cfg.transfer_relation]
    log.info(
        "%d pairs (%d facts) for fitting; %d held-out-relation pairs for transfer",
        len(pairs),
        len({p.fact_id for p in pairs}),
        len(held),
    )
    data = se.prepare(
        model,
        pairs,
        val_frac=cfg.val_frac,
        test_frac=cfg.test_frac,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        scoring=cfg.scoring,
    )
    neutral_test = se.split_lines(se.neutral_lines(), cfg.seed)[2]
    if held:
        data.extra[f"relation:{cfg.transfer_relation}"] = se.eval_set(
            model, f"relation:{cfg.transfer_relation}", held, neutral_test, cfg.batch_size, scoring=cfg.scoring
        )
    if cfg.transfer_format:
        test_facts = {p.fact_id for p in data.test.pairs}
        other = [
            p
            for p in load_builtin(cfg.dataset, cfg.transfer_format, tokenizer=model.tokenizer, seed=cfg.seed)
            if p.fact_id in test_facts
        ]
        if other:
            data.extra[f"format:{cfg.transfer_format}"] = se.eval_set(
                model, f"format:{cfg.transfer_format}", other, neutral_test, cfg.batch_size, scoring=cfg.scoring
            )
    base = {
        name: se.baseline_summary(es, n_boot=cfg.n_boot, seed=cfg.seed)
        for name, es in [("val", data.val), ("test", data.test), *data.extra.items()]
    }
    print(
        f"baseline, test ({base['test']['n_facts']} facts): P(truth) honest {base['test']['p_truth_honest']}, "
        f"lying {base['test']['p_truth_lying']}, lie rate {base['test']['lie_rate']}"
    )

    # settings per method (all chosen on validation)
    grid: dict[str, list] = {}
    S = se.Setting
    if "resid" in cfg.methods:
        grid["resid"] = [S("resid", l, a) for l in layers for a in cfg.resid_alphas]
    if "ablation" in cfg.methods:
        grid["ablation"] = [S("ablation", l, -1.0) for l in layers]
    if "iti" in cfg.methods:
        grid["iti"] = [S("iti", -1, a, str(k)) for k in cfg.head_ks for a in cfg.head_alphas]
    if {"causal", "causal_mean"} & set(cfg.methods):
        se.attach_causal_heads(
            model,
            data,
            max_pairs=cfg.causal_pairs,
            batch_size=cfg.batch_size,
            heads=[parse_head(h) for h in cfg.causal_heads],
        )
        log.info("causal heads: %s", ", ".join(f"L{l}H{h}" for l, h in data.causal_heads[: max(cfg.head_ks)]))
    if "causal" in cfg.methods:
        grid["causal"] = [S("causal", -1, a, str(k)) for k in cfg.head_ks for a in cfg.head_alphas]
    for kind in ("causal_mean", "probe_mean"):
        if kind in cfg.methods:
            grid[kind] = [S(kind, -1, a, str(k)) for k in cfg.head_ks for a in cfg.mean_alphas]
    train_cfg = lambda b: edits.TrainConfig(kl_budget=b, steps=cfg.edit_steps, max_pairs=cfg.edit_pairs, seed=cfg.seed)
    sae_layer = cfg.sae_layer if 0 <= cfg.sae_layer < L else None
    mid = layers[len(layers) // 2]
    for method in ("learned", "lowrank"):
        if method not in cfg.methods:
            continue
        grid[method] = []
        for b in cfg.edit_budgets:
            name = f"{method}@{b:g}"
            if method == "learned":
                train = lambda b=b: edits.train_vector(
                    model, data.train, data.neutral_train, list(layers), train_cfg(b)
                )
            else:
                train = lambda b=b: edits.train_lowrank(
                    model,
                    data.train,
                    data.neutral_train,
                    mid,
                    train_cfg(b),
                    component=cfg.lowrank_component,
                    rank=cfg.lowrank_rank,
                )
            data.edits[name] = run.stage(f"{name}.safetensors", train, edits.save_edit, edits.load_edit)
            grid[method] += [S(method, -1, a, name) for a in cfg.edit_scales]
            if method == "learned" and sae_layer is not None and sae_layer not in layers:
                # the same edit at the SAE's layer: its direction can be compared with the decoder rows
                name = f"learned@{b:g}/L{sae_layer}"
                train = lambda b=b: edits.train_vector(model, data.train, data.neutral_train, [sae_layer], train_cfg(b))
                data.edits[name] = run.stage(
                    f"{name.replace('/', '_')}.safetensors", train, edits.save_edit, edits.load_edit
                )
                grid[method] += [S(method, -1, a, name) for a in cfg.edit_scales]

    if "gated" in cfg.methods:
        grid["gated"] = []
        for l in cfg.gated_layers or sorted(set(layers) | ({sae_layer} if sae_layer is not None else set())):
            for b in cfg.edit_budgets:
                name = f"gated@{b:g}/L{l}"
                train = lambda b=b, l=l: edits.train_gated(model, data.train, data.neutral_train, l, train_cfg(b))
                data.edits[name] = run.stage(
                    f"{name.replace('/', '_')}.safetensors", train, edits.save_edit, edits.load_edit
                )
                grid["gated"] += [S("gated", -1, a, name) for a in cfg.edit_scales]

    points = {m: se.sweep(model, data, g) for m, g in grid.items()}
    run.write_json("sweep.json", {"baseline": base, "sweep": points})
    chosen = {m: se.choose(p, cfg.kl_budget) for m, p in points.items()}
    evals: dict[str, dict] = {}
    # learned edits first: if a long run is cut short, the partial evaluation.json has them
    for m, c in sorted(chosen.items(), key=lambda mc: mc[0] not in ("gated", "learned", "lowrank")):
        evals[m] = se.evaluate(model, data, c.setting, n_controls=cfg.n_controls, n_boot=cfg.n_boot, seed=cfg.seed)
        for name in data.extra:
            evals[m][f"transfer:{name}"] = se.evaluate(
                model, data, c.setting, on=name, n_controls=0, n_boot=cfg.n_boot, seed=cfg.seed
            )
        run.write_json("evaluation.json", {"chosen": chosen, "evaluation": evals})  # partial results survive

    # how the learned edits line up with the difference of means and with probes
    alignment = {}
    sae_rows = _cached_sae_rows(model, sae_layer) if sae_layer is not None else None
    for name, e in data.edits.items():
        at = sorted(e.vectors) if isinstance(e, edits.LearnedVector) else [e.layer]
        alignment[name] = {f"layer {l}": edits.alignment(e, se.reference_directions(data, l), l) for l in at}
        for l in at:
            alignment[name][f"layer {l}"]["random_direction_typical_abs_cos"] = (
                2 / (3.14159 * model.cfg.d_model)
            ) ** 0.5
            if isinstance(sae_rows, tuple) and l == sae_layer:
                alignment[name][f"layer {l}"]["sae_decoder_rows"] = edits.row_alignment(e.direction(l), sae_rows[1]) | {
                    "sae": sae_rows[0]
                }
    # where the gated edits write: their gate's opening on held-out (test) text, unedited
    gates = {
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
    if sae_layer is not None:
        dom = se.reference_directions(data, sae_layer, ("diff_of_means",))["diff_of_means"]
        alignment["diff_of_means (reference)"] = {
            f"layer {sae_layer}": {"sae_decoder_rows": edits.row_alignment(dom, sae_rows[1]) | {"sae": sae_rows[0]}}
            if isinstance(sae_rows, tuple)
            else {"sae_decoder_rows": sae_rows}
        }

    # demo: held-out prompts where the model really lies, with the method that did best on
    # *validation* (choosing it on test would make the headline a best-of-N on test)
    ok = {m: c for m, c in chosen.items() if c.kl <= cfg.kl_budget} or chosen
    best = max(ok, key=lambda m: ok[m].recovered)
    setting = chosen[best].setting
    iv, iv_lie = se.intervention(model, data, setting), se.intervention(model, data, setting.flipped())
    gen_kw = dict(max_new_tokens=cfg.max_new_tokens, stop_strings=("\n",))

    def table(rows: list[int], which: str, ivx, base_scores) -> list[dict]:
        if not rows:
            return []
        ps = [data.test.pairs[i] for i in rows]
        prompts = [getattr(p, which) for p in ps]
        before, after = generate(model, prompts, **gen_kw), generate(model, prompts, interventions=[ivx], **gen_kw)
        p_after = se.score_prompts(model, ps, which, [ivx], scoring=cfg.scoring, batch_size=cfg.batch_size).p_truth
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

    lies = se.lying_rows(data.test)
    honest_ok = [i for i in range(len(data.test.pairs)) if bool(data.test.base_honest.correct[i])]
    flip_back = table(lies[: cfg.n_demo], "lying", iv, data.test.base_lying)
    into_lies = table(honest_ok[: cfg.n_demo], "honest", iv_lie, data.test.base_honest)

    figures = {
        "frontier": save_figure(
            sf.frontier_figure([p for ps in points.values() for p in ps], evals, cfg.kl_budget), run.file("frontier")
        )
    }
    if "resid" in points:
        for metric in ("recovered", "kl"):
            figures[f"resid_{metric}"] = save_figure(
                sf.dose_heatmap(points["resid"], "resid", metric), run.file(f"resid_{metric}")
            )

    _print(cfg, base, chosen, evals, alignment, best, setting, flip_back, into_lies, len(lies))
    for name, g in gates.items():
        print(
            f"gate of {name}: mean opening {g['test_lying_final']:.3f} on test lying prompts (final token), "
            f"{g['test_honest_final']:.3f} on test honest prompts, "
            f"{g['test_neutral_tokens']:.3f} on test neutral tokens"
        )
    best_r = evals[best]
    return {
        "model": model.cfg.model_name,
        "layers": layers,
        "baseline": base,
        "chosen_on_validation": chosen,
        "evaluation_on_test": evals,
        "alignment": alignment,
        "edits": {n: e.info for n, e in data.edits.items()},
        "gates": gates,
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
            "lies_flipped_back": flip_back,
            "honest_steered_into_lies": into_lies,
        },
        "figures": figures,
        "seconds": round(time.time() - t0, 1),
    }


def _print(cfg, base, chosen, evals, alignment, best, setting, flip_back, into_lies, n_lies) -> None:
    print(
        f"\nEach method at its validation-chosen point (KL <= {cfg.kl_budget} on validation), measured on test; "
        f"95% CIs; control = {cfg.n_controls} random draws of the same size (mean [2.5%, 97.5%] of draws)"
    )
    print(
        f"{'method':<9} {'setting':<28} {'recovered':<22} {'lie rate':<22} {'KL':<22} {'dCE':<22} "
        f"{'honest acc':<22} {'random: recovered':<22} {'random: KL':<20}"
    )
    for m, r in evals.items():
        s = chosen[m].setting
        desc = f"L{s.layer} a={s.alpha:g}" if s.layer >= 0 else f"a={s.alpha:g} {s.param}"
        c = r["control"]
        cells = [
            r["recovered"],
            r["lie_rate_steered"],
            r["kl"],
            r["delta_ce"],
            r["honest_acc_steered"],
            c["recovered"],
            c["kl"],
        ]
        print(f"{m:<9} {desc:<28} " + " ".join(f"{f'{e:.3f}':<22}" for e in cells))
    print(f"lie rate before steering: {base['test']['lie_rate']}; honest accuracy before: {base['test']['honest_acc']}")
    for m, r in evals.items():
        for k, v in r.items():
            if k.startswith("transfer:"):
                print(f"  transfer {m} -> {k[9:]}: recovered {v['recovered']:.3f}, KL {v['kl']:.3f}")
    print(
        "\nalignment (cosine) of each learned edit's honest -> lying direction with directions fitted "
        "on the training facts "
        "(random directions: |cos| ~ 1/sqrt(d_model)):"
    )
    for name, per_layer in alignment.items():
        for where, cos in per_layer.items():
            flat = ", ".join(f"{k} {v:+.3f}" for k, v in cos.items() if isinstance(v, float))
            print(f"  {name} {where}: {flat}")
            sae = cos.get("sae_decoder_rows")
            if isinstance(sae, dict):
                print(
                    f"    SAE decoder rows ({sae['n_rows']}): max |cos| {sae['max_abs_cos']:.3f} (row {sae['row']}), "
                    f"random directions' max |cos| {sae['null_max_mean']:.3f} (95% quantile {sae['null_max_q95']:.3f})"
                )
            elif sae is not None:
                print(f"    SAE: {sae}")
    print(
        f"\nbest: {best} {setting}; goal (>= 0.85 of the gap at KL <= 0.1): "
        f"{'met' if evals[best]['recovered'].mean >= 0.85 and evals[best]['kl'].mean <= 0.1 else 'NOT met'}"
    )
    print(f"\n{n_lies} held-out prompts where the model lies (top-1 false on a fact it knows); {best} toward honesty:")
    for r in flip_back:
        print(
            f"  {r['question'][:40]:<41} truth {r['truth']:<10} before {r['before'][:12]!r:<15} "
            f"after {r['after'][:12]!r:<15} P(truth) {r['p_truth_before']:.3f} -> {r['p_truth_after']:.3f}"
        )
    print(f"\nthe reverse: honest prompts, {best} toward lying (alpha {-setting.alpha:+g}):")
    for r in into_lies:
        print(
            f"  {r['question'][:40]:<41} truth {r['truth']:<10} before {r['before'][:12]!r:<15} "
            f"after {r['after'][:12]!r:<15} P(truth) {r['p_truth_before']:.3f} -> {r['p_truth_after']:.3f}"
        )


if __name__ == "__main__":
    sys.exit(run_script(Config, main, doc=__doc__))
