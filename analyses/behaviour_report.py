"""Behaviour before any interpretability: every built-in relation x format, honest vs. lying.

    python analyses/behaviour_report.py [--model gemma-3-270m] [--n-pairs 0]

For every relation and format, prints P(truth) honest vs lying for ALL pairs and for the KNOWN
pairs (facts the model answers correctly when honest), each with a 95% bootstrap CI over facts,
plus acc, lie rate and choice coverage; writes results/behaviour/<run>/summary.json.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from mechlie.core.cli import RunDir, run_script
from mechlie.core.models import DEFAULT_MODEL


@dataclass(frozen=True)
class BehaviourConfig:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "embedded name, .gguf file, HF dir, or TL name"})
    n_pairs: int = field(default=0, metadata={"help": "pairs per relation, a seeded sample (0 = all)"})
    formats: tuple[str, ...] = field(default=("instruct", "fewshot"), metadata={"help": "prompt formats"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples per CI"})
    seed: int = 0
    out_dir: str = "results/behaviour"
    run_name: str = ""

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in ("instruct", "fewshot")]
        if bad:
            raise ValueError(f"--formats must be instruct and/or fewshot, got {bad}")
        if self.n_pairs < 0 or self.n_boot < 100:
            raise ValueError("--n-pairs must be >= 0 and --n-boot >= 100")


def _ci(e: dict) -> str:
    return f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def main(cfg: BehaviourConfig, run: RunDir) -> dict:
    from mechlie.core.metrics import behaviour
    from mechlie.core.models import load_model
    from mechlie.core.pairs import RELATIONS, load_builtin
    from mechlie.studies.head_sweep import behaviour_report

    torch.set_grad_enabled(False)
    model = load_model(cfg.model)
    rows = {}
    print(
        f"{'format':8} {'relation':10} {'pairs':>8} {'n':>4}  {'P(truth) honest':>22}  {'P(truth) lying':>22}  "
        f"{'acc':>5} {'lie_rate':>8} {'cov_lie':>7}"
    )
    for fmt in cfg.formats:
        for rel in RELATIONS:
            pairs = load_builtin(rel, fmt, tokenizer=model.tokenizer, n=cfg.n_pairs or None, seed=cfg.seed)
            rep = behaviour_report(behaviour(model, pairs, progress=False), pairs, n_boot=cfg.n_boot, seed=cfg.seed)
            rep.pop("known")  # the per-pair mask
            rows[f"{fmt}/{rel}"] = rep
            s = rep["all"]
            for label, ci, n in (("all", rep["all_ci"], s["n"]), ("known", rep.get("known_ci"), s["n_known"])):
                if ci:
                    print(
                        f"{fmt:8} {rel:10} {label:>8} {n:>4}  {_ci(ci['p_truth_honest']):>22}  "
                        f"{_ci(ci['p_truth_lying']):>22}  {s['acc']:5.2f} {s['lie_rate']:8.2f} "
                        f"{s['choice_cov_lying']:7.2f}",
                        flush=True,
                    )
    return {"model": cfg.model, "rows": rows}


if __name__ == "__main__":
    sys.exit(run_script(BehaviourConfig, main, doc=__doc__))
