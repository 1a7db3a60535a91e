"""Behaviour before any interpretability: P(truth) honest vs lying, per relation and format.

For every built-in relation and prompt format, P(truth) and the logit difference under the honest
and the lying framing, for ALL pairs and for the KNOWN pairs (facts the model answers correctly when
honest), each with a 95% bootstrap CI over facts (all pairs of a resampled fact come along), plus
accuracy, lie rate and choice coverage. :func:`behaviour_report` is also the head sweep's stage 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mechlie.core import stats
from mechlie.core.cli import RunDir
from mechlie.core.metrics import Behaviour
from mechlie.core.pairs import ContrastPair
from mechlie.studies.base import Study, StudyResult, register
from mechlie.studies.flags import model_flag

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)


def _fact_units(fact_ids: list[str]) -> list[torch.Tensor]:
    """Row indices of each distinct fact, in first-seen order (the bootstrap's units)."""
    order = list(dict.fromkeys(fact_ids))
    pos = {f: i for i, f in enumerate(order)}
    rows: list[list[int]] = [[] for _ in order]
    for j, f in enumerate(fact_ids):
        rows[pos[f]].append(j)
    return [torch.tensor(r) for r in rows]


BEHAVIOUR_CI_METRICS = ("p_truth_honest", "p_truth_lying", "logit_diff_honest", "logit_diff_lying", "p_truth_gap")


def behaviour_cis(beh: Behaviour, fact_ids: list[str], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean P(truth) and logit difference, honest and lying, and the P(truth) gap, with 95% CIs
    bootstrapped over facts (all pairs of a resampled fact come along)."""
    units = _fact_units(fact_ids)
    series = {
        "p_truth_honest": beh.honest.p_truth,
        "p_truth_lying": beh.lying.p_truth,
        "logit_diff_honest": beh.honest.logit_diff,
        "logit_diff_lying": beh.lying.logit_diff,
        "p_truth_gap": beh.honest.p_truth - beh.lying.p_truth,
    }
    single = all(len(u) == 1 for u in units)
    first = torch.stack([u[0] for u in units])
    out = {}
    for name, x in series.items():
        x = x.float()
        if single:  # one pair per fact: a unit is a row
            stat = lambda i, x=x: x[first[i]].mean()  # noqa: E731
        else:
            stat = lambda i, x=x: x[torch.cat([units[j] for j in i.tolist()])].mean()  # noqa: E731
        out[name] = stats.bootstrap(stat, len(units), n_boot=n_boot, seed=seed).to_dict()
    return out


def behaviour_report(beh: Behaviour, pairs: list[ContrastPair], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Behaviour for all pairs and for the known pairs, overall (with CIs) and per relation."""
    fact_ids = [p.fact_id for p in pairs]
    known = beh.known
    kidx = torch.nonzero(known).flatten()
    report: dict = {"all": beh.summary(), "all_ci": behaviour_cis(beh, fact_ids, n_boot=n_boot, seed=seed)}
    if len(kidx):
        report["known_pairs"] = beh.subset(kidx).summary()
        report["known_ci"] = behaviour_cis(
            beh.subset(kidx), [fact_ids[i] for i in kidx.tolist()], n_boot=n_boot, seed=seed
        )
    report["relations"] = {}
    rel = [p.relation for p in pairs]
    for r in sorted(set(rel)):
        idx = torch.tensor([i for i, x in enumerate(rel) if x == r])
        sub = beh.subset(idx)
        report["relations"][r] = {
            "all": sub.summary(),
            "all_ci": behaviour_cis(sub, [fact_ids[i] for i in idx.tolist()], n_boot=n_boot, seed=seed),
        }
    report["known"] = [bool(k) for k in known.tolist()]  # per pair: the mask the later stages use
    return report


@dataclass(frozen=True)
class BehaviourConfig:
    model: str = model_flag()
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


def _n(x, spec: str) -> str:
    # JSON stores NaN (e.g. a lie rate with no known facts) as null
    return format(float("nan") if x is None else x, spec)


def _ci(e: dict) -> str:
    return f"{_n(e['mean'], '.3f')} [{_n(e['lo'], '.3f')}, {_n(e['hi'], '.3f')}]"


TABLE_HEADER = (
    f"{'format':8} {'relation':10} {'pairs':>8} {'n':>4}  {'P(truth) honest':>22}  {'P(truth) lying':>22}  "
    f"{'acc':>5} {'lie_rate':>8} {'cov_lie':>7}"
)


def table_rows(key: str, rep: dict) -> list[str]:
    """The printed table's lines for one ``format/relation`` row of the summary."""
    fmt, rel = key.split("/", 1)
    s = rep["all"]
    out = []
    for label, ci, n in (("all", rep["all_ci"], s["n"]), ("known", rep.get("known_ci"), s["n_known"])):
        if ci:
            out.append(
                f"{fmt:8} {rel:10} {label:>8} {n:>4}  {_ci(ci['p_truth_honest']):>22}  "
                f"{_ci(ci['p_truth_lying']):>22}  {_n(s['acc'], '5.2f')} {_n(s['lie_rate'], '8.2f')} "
                f"{_n(s['choice_cov_lying'], '7.2f')}"
            )
    return out


class BehaviourResult(StudyResult):
    """``summary.json``: ``model``, ``rows`` (``"format/relation"`` -> :func:`behaviour_report`
    without the per-pair mask)."""

    study = "behaviour"
    required = ("model", "rows")

    def title(self) -> str:
        return f"Behaviour: {self._summary['model']}, {len(self._summary['rows'])} relation x format rows"

    def figures(self) -> dict[str, go.Figure]:
        from mechlie.report import figures as F

        rows = self._summary["rows"]
        series = {}
        for m, name in (("p_truth_honest", "P(truth) honest"), ("p_truth_lying", "P(truth) lying")):
            cis = [
                r.get("known_ci", {}).get(m) or dict.fromkeys(("mean", "lo", "hi"), float("nan")) for r in rows.values()
            ]
            series[name] = tuple([c[k] for c in cis] for k in ("mean", "lo", "hi"))
        n = sum(r["all"]["n_known"] for r in rows.values())
        fig = F.errorbars(
            list(rows),
            series,
            f"P(truth) by framing on known pairs, 95% CI over facts ({self._summary['model']}, n={n} known pairs)",
            y_label="P(truth)",
        )
        return {"behaviour_known": fig}

    def captions(self) -> dict[str, str]:
        return {"behaviour_known": "P(truth) under the honest and the lying framing, known facts, 95% CIs over facts."}

    def headline(self) -> list[str]:
        out = []
        for key, rep in self._summary["rows"].items():
            ci = rep.get("known_ci")
            if ci:
                out.append(
                    f"- {key}: {rep['all']['n_known']}/{rep['all']['n']} known; P(truth) honest "
                    f"{_ci(ci['p_truth_honest'])} vs lying {_ci(ci['p_truth_lying'])}; "
                    f"lie rate {_n(rep['all']['lie_rate'], '.2f')}."
                )
            else:
                out.append(f"- {key}: no known facts of {rep['all']['n']}.")
        return out

    def report(self) -> str:
        lines = [TABLE_HEADER]
        for key, rep in self._summary["rows"].items():
            lines += table_rows(key, rep)
        return "\n".join(lines)


def run(cfg: BehaviourConfig, model: HookedTransformer, run_dir: RunDir) -> BehaviourResult:
    from mechlie.core.metrics import behaviour
    from mechlie.core.pairs import RELATIONS, load_builtin

    rows = {}
    with torch.no_grad():  # a context, not set_grad_enabled: later studies in one process train SAEs
        for fmt in cfg.formats:
            for rel in RELATIONS:
                pairs = load_builtin(rel, fmt, tokenizer=model.tokenizer, n=cfg.n_pairs or None, seed=cfg.seed)
                rep = behaviour_report(behaviour(model, pairs, progress=False), pairs, n_boot=cfg.n_boot, seed=cfg.seed)
                rep.pop("known")  # the per-pair mask
                rows[f"{fmt}/{rel}"] = rep
                log.info("%s/%s: %d pairs done", fmt, rel, len(pairs))  # a slow run shows its progress
    return BehaviourResult(run_dir.path, {"kind": "behaviour", "model": cfg.model, "rows": rows})


STUDY = register(Study("behaviour", BehaviourConfig, run, BehaviourResult))
