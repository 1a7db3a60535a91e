"""Behaviour before any interpretability: P(truth) honest vs lying, per relation and format.

For every built-in relation and prompt format, P(truth) and the logit difference under the honest
and the lying framing, for ALL pairs and for the KNOWN pairs (facts the model answers correctly when
honest), each with a 95% bootstrap CI over facts (all pairs of a resampled fact come along), plus
accuracy, lie rate and choice coverage. :func:`behaviour_report` is also the head sweep's stage 2.

"Known" has two definitions in mechlie, and the study reports both side by side per row (summary key
``known_side_by_side``, :func:`mechlie.read.labels.known_side_by_side`): ``known_first_token`` (the
honest prompt's top-1 next token is the truth's first token; :attr:`mechlie.core.metrics.Behaviour.known`,
the one every P(truth) "known" number here and the head sweep's known filter use) and ``known_greedy``
(the greedy honest answer's text starts with the truth; :attr:`mechlie.read.labels.OnPolicy.known`, the
one the on-policy labels use), with how many pairs each alone counts. The greedy answers cost one
generation per prompt (:func:`mechlie.read.labels.on_policy` with ``k=0``: honest and lying greedy, a
few tokens each, states kept at the last block only), about as much again as the scoring passes.
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
    without the per-pair mask, plus ``known_side_by_side``: both definitions of known, see the module
    docstring; absent from runs made before it was added)."""

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
        """One line per row; a run made before ``known_side_by_side`` was recorded keeps its old lines."""
        out = []
        for key, rep in self._summary["rows"].items():
            ci = rep.get("known_ci")
            side = rep.get("known_side_by_side")
            if ci:
                known = f"{rep['all']['n_known']}/{rep['all']['n']} known"
                if side:
                    known += f" ({known_text(side)})"
                out.append(
                    f"- {key}: {known}; P(truth) honest "
                    f"{_ci(ci['p_truth_honest'])} vs lying {_ci(ci['p_truth_lying'])}; "
                    f"lie rate {_n(rep['all']['lie_rate'], '.2f')}."
                )
            else:
                extra = f" by first token ({known_text(side)})" if side else ""
                out.append(f"- {key}: no known facts of {rep['all']['n']}{extra}.")
        if any("known_side_by_side" in rep for rep in self._summary["rows"].values()):
            out.append(
                "- Known = the honest prompt's top-1 token is the truth's first token (all P(truth) numbers "
                "above); greedy = the greedy honest answer's text starts with the truth."
            )
        return out

    def report(self) -> str:
        lines = [TABLE_HEADER]
        for key, rep in self._summary["rows"].items():
            lines += table_rows(key, rep)
        sides = {
            k: rep["known_side_by_side"] for k, rep in self._summary["rows"].items() if "known_side_by_side" in rep
        }
        if sides:
            lines.append("\nknown by two definitions (first token: top-1 token; greedy: the greedy answer's text):")
            lines += [f"{k:20} {known_text(v)}" for k, v in sides.items()]
        return "\n".join(lines)


def known_text(side: dict) -> str:
    """``known_side_by_side`` counts as text: both definitions, and how many pairs each alone counts."""
    return (
        f"first token {side['known_first_token']}, greedy text {side['known_greedy']}, both {side['known_both']}, "
        f"first token only {side['known_first_token_only']}, greedy only {side['known_greedy_only']}"
    )


def known_definitions(model: HookedTransformer, pairs: list[ContrastPair], beh: Behaviour) -> dict[str, int]:
    """Both definitions of "known" over ``pairs`` (:func:`mechlie.read.labels.known_side_by_side`): the
    first-token one of ``beh`` and the greedy-text one (:func:`mechlie.read.labels.greedy_known`, the
    honest prompts' greedy answers only: the lying prompts are not generated, as only known is read)."""
    from mechlie.read.labels import greedy_known, known_side_by_side

    return known_side_by_side(beh.known, greedy_known(model, pairs))


def run(cfg: BehaviourConfig, model: HookedTransformer, run_dir: RunDir) -> BehaviourResult:
    from mechlie.core.metrics import behaviour
    from mechlie.core.pairs import RELATIONS, load_builtin

    rows = {}
    with torch.no_grad():  # a context, not set_grad_enabled: later studies in one process train SAEs
        for fmt in cfg.formats:
            for rel in RELATIONS:
                pairs = load_builtin(rel, fmt, tokenizer=model.tokenizer, n=cfg.n_pairs or None, seed=cfg.seed)
                beh = behaviour(model, pairs, progress=False)
                rep = behaviour_report(beh, pairs, n_boot=cfg.n_boot, seed=cfg.seed)
                rep.pop("known")  # the per-pair mask
                rep["known_side_by_side"] = known_definitions(model, pairs, beh)
                rows[f"{fmt}/{rel}"] = rep
                log.info("%s/%s: %d pairs done", fmt, rel, len(pairs))  # a slow run shows its progress
    return BehaviourResult(run_dir.path, {"kind": "behaviour", "model": cfg.model, "rows": rows})


STUDY = register(Study("behaviour", BehaviourConfig, run, BehaviourResult))
