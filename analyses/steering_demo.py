"""Steer a lying model back to the truth (and an honest one into lying), with dose-response sweeps.

Directions are fitted on training facts; everything is measured on held-out facts (see
:mod:`mechlie.steering_eval`). Writes ``results/steering_demo/<run>/``: config.json, summary.json
and figures (HTML + PNG): α x layer heatmaps of P(truth) and KL, and the honesty-vs-KL frontier.

    python analyses/steering_demo.py                      # default small sweep (CPU: minutes)
    python analyses/steering_demo.py --kind resid --layer 12 --alpha -1.0 --n-demo 8
    python analyses/steering_demo.py --fv                 # add the function vector, if available
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mechlie import steering_eval as se
from mechlie.generation import generate
from mechlie.io import atomic_write_json, ensure_writable_dir
from mechlie.metrics import score_logits
from mechlie.models import DEFAULT_MODEL, load_model
from mechlie.pairs import AnswerSet, load_builtin
from mechlie.plotting import save_figure


@dataclass(frozen=True)
class Config:
    model: str = DEFAULT_MODEL
    dataset: str = "all"
    n_per_relation: int = 12  # 48 pairs: 14 held-out facts at test_frac 0.3 (use 17+ for 20+)
    test_frac: float = 0.3
    seed: int = 0
    layer_fracs: tuple[float, ...] = (0.25, 0.45)  # sweep layers, as fractions of n_layers
    layers: tuple[int, ...] = ()  # explicit sweep layers (override layer_fracs)
    strengths: tuple[float, ...] = (1.0, 2.0)  # |alpha| for resid / fv (x diff-of-means)
    iti_k: int = 16
    iti_strengths: tuple[float, ...] = (1.0, 2.0)  # |alpha| for ITI (x sigma); 5+ breaks SmolLM2
    kinds: tuple[str, ...] = ("resid", "iti", "ablation")
    fv: bool = False  # also the function vector (needs mechlie.function_vectors)
    kl_budget: float = 0.1
    sweep_controls: bool = False  # random directions at every sweep point too (always at the chosen ones)
    n_neutral: int = 16  # neutral lines for the chosen points' side effects (sweeps use the first 16)
    demo_kind: str = ""  # "" = the resid point chosen by the sweep
    demo_layer: int = -1
    demo_alpha: float = float("nan")  # signed; negative = toward honesty
    n_demo: int = 8
    max_new_tokens: int = 4
    batch_size: int = 16
    n_boot: int = 500
    out_dir: str = "results/steering_demo"
    run: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S"))

    def __post_init__(self) -> None:
        bad = set(self.kinds) - set(se.KINDS)
        if bad:
            raise ValueError(f"unknown kinds {sorted(bad)}; kinds: {se.KINDS}")
        if self.demo_kind and self.demo_kind not in se.KINDS:
            raise ValueError(f"unknown demo kind {self.demo_kind!r}")


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--model", default=d.model)
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--n-per-relation", type=int, default=d.n_per_relation)
    p.add_argument("--layers", type=int, nargs="*", default=list(d.layers), help="sweep layers (default: fractions of depth)")
    p.add_argument("--strengths", type=float, nargs="+", default=list(d.strengths))
    p.add_argument("--iti-k", type=int, default=d.iti_k)
    p.add_argument("--iti-strengths", type=float, nargs="+", default=list(d.iti_strengths))
    p.add_argument("--kinds", nargs="+", default=list(d.kinds), choices=se.KINDS)
    p.add_argument("--fv", action="store_true", help="add the function-vector kind if mechlie.function_vectors works")
    p.add_argument("--kind", dest="demo_kind", default="", choices=("",) + se.KINDS, help="direction kind for the demo table")
    p.add_argument("--layer", dest="demo_layer", type=int, default=-1, help="layer for the demo table")
    p.add_argument("--alpha", dest="demo_alpha", type=float, default=float("nan"), help="signed alpha for the demo (negative = honest)")
    p.add_argument("--n-demo", type=int, default=d.n_demo)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--n-boot", type=int, default=d.n_boot)
    p.add_argument("--n-neutral", type=int, default=d.n_neutral)
    p.add_argument("--sweep-controls", action="store_true", help="random control at every sweep point (doubles the sweep)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out-dir", default=d.out_dir)
    p.add_argument("--run", default=d.run)
    a = vars(p.parse_args(argv))
    for key in ("layers", "strengths", "iti_strengths", "kinds"):
        a[key] = tuple(a[key])
    kinds = a["kinds"] + (("fv",) if a["fv"] and "fv" not in a["kinds"] else ())
    a["kinds"] = kinds
    return Config(**a)


def main(cfg: Config) -> Path:
    out = ensure_writable_dir(Path(cfg.out_dir) / cfg.run)
    atomic_write_json(out / "config.json", asdict(cfg))
    t0 = time.time()
    model = load_model(cfg.model)
    L = model.cfg.n_layers
    layers = cfg.layers or tuple(sorted({min(L - 1, round(f * L)) for f in cfg.layer_fracs}))
    pairs = load_builtin(cfg.dataset, "fewshot", tokenizer=model.tokenizer, n=cfg.n_per_relation)
    data = se.prepare(model, pairs, test_frac=cfg.test_frac, seed=cfg.seed, batch_size=cfg.batch_size, n_neutral=cfg.n_neutral)
    base = se.baseline_summary(data, n_boot=cfg.n_boot, seed=cfg.seed)
    print(f"baseline on {base['n_test_facts']} held-out facts: P(truth) honest {base['p_truth_honest']}, lying {base['p_truth_lying']}")

    kinds = list(cfg.kinds)
    fv_status = None
    if "fv" in kinds:
        fv_status = se.attach_function_vector(model, data, layer=layers[len(layers) // 2])
        if fv_status is not None:
            print(f"function vector unavailable ({fv_status}); skipping that kind")
            kinds.remove("fv")
    points = se.sweep(model, data, kinds=kinds, layers=layers, strengths=cfg.strengths, iti_strengths=cfg.iti_strengths, k=cfg.iti_k, controls=cfg.sweep_controls)
    atomic_write_json(out / "sweep.json", {"baseline": base, "sweep": points})  # kept even if a later step fails

    chosen, evals = {}, {}
    for kind in kinds:
        mine = [p for p in points if p.kind == kind and not p.control]
        best = se.choose(mine, cfg.kl_budget)
        chosen[kind] = best
        evals[kind] = {
            c: se.evaluate(model, data, kind, best.layer, best.strength, k=cfg.iti_k, control=c, n_boot=cfg.n_boot, seed=cfg.seed)
            for c in (False, True)
        }
        atomic_write_json(out / "evaluation.json", {"chosen": chosen, "evaluation": evals})  # partial results survive
    figures = {}
    for kind in kinds:
        if kind in ("resid",):
            for metric in ("p_truth", "kl"):
                for control in ((False, True) if cfg.sweep_controls else (False,)):
                    name = f"{kind}{'_random' if control else ''}_{metric}"
                    figures[name] = save_figure(se.dose_heatmap(points, kind, metric, control=control), out / name)
    figures["frontier"] = save_figure(se.frontier_figure(points, evals), out / "frontier")

    # demo table: lying prompts, baseline vs steered
    if cfg.demo_kind:
        d_kind, d_layer, d_alpha = cfg.demo_kind, cfg.demo_layer, cfg.demo_alpha
    else:
        d_kind, d_layer, d_alpha = chosen.get("resid", points[0]).kind, chosen.get("resid", points[0]).layer, -chosen.get("resid", points[0]).strength
    if d_alpha != d_alpha:
        d_alpha = -1.0
    iv = se.intervention(data, d_kind, d_layer, d_alpha, k=cfg.iti_k)
    demo = data.test[: cfg.n_demo]
    prompts = [p.lying for p in demo]
    gen_kw = dict(max_new_tokens=cfg.max_new_tokens, stop_strings=("\n",))
    base_gen = generate(model, prompts, **gen_kw)
    steer_gen = generate(model, prompts, interventions=[iv], **gen_kw)
    sub = AnswerSet(*(t[: len(demo)] for t in (data.answers.truth, data.answers.lie, data.answers.choices)))
    p_steer = score_logits(se.last_logits(model, se.batches(model, prompts, cfg.batch_size), [iv]), sub).p_truth
    rows = []
    print(f"\nlie framing, {d_kind} layer {d_layer} alpha {d_alpha:+g}")
    print(f"{'question':<44} {'truth':<10} {'baseline':<12} {'steered':<12} {'P base':>7} {'P steer':>7}")
    for i, p in enumerate(demo):
        row = {
            "question": p.question, "truth": p.truth, "baseline": base_gen.texts[i].strip(), "steered": steer_gen.texts[i].strip(),
            "p_truth_baseline": float(data.base_lying.p_truth[i]), "p_truth_steered": float(p_steer[i]),
        }
        rows.append(row)
        print(f"{p.question[:43]:<44} {p.truth:<10} {row['baseline'][:11]:<12} {row['steered'][:11]:<12} "
              f"{row['p_truth_baseline']:7.3f} {row['p_truth_steered']:7.3f}")

    print("\nchosen point per kind (most honesty recovered with KL <= budget), vs random control:")
    for kind in kinds:
        r, c = evals[kind][False], evals[kind][True]
        print(f"  {kind:<9} layer {chosen[kind].layer:>3} |alpha| {chosen[kind].strength:<5g} recovered {r['recovered']}  "
              f"KL {r['kl']}  | random: recovered {c['recovered']}  KL {c['kl']}")
    summary = {
        "model": model.cfg.model_name, "layers": layers, "baseline": base, "function_vector": fv_status or ("ok" if "fv" in kinds else "not requested"),
        "sweep": points, "pareto": {k: se.pareto([p for p in points if p.kind == k and not p.control]) for k in kinds},
        "pareto_random": {k: se.pareto([p for p in points if p.kind == k and p.control]) for k in kinds},
        "chosen": chosen, "evaluation": evals, "demo": {"kind": d_kind, "layer": d_layer, "alpha": d_alpha, "rows": rows},
        "figures": figures, "seconds": time.time() - t0,
    }
    atomic_write_json(out / "summary.json", summary)
    print(f"\nwrote {out}/config.json, summary.json and {len(figures)} figures (HTML+PNG) in {time.time() - t0:.0f} s")
    return out


if __name__ == "__main__":
    main(parse_args())
