"""The data of the generalisation study (:mod:`mechlie.studies.generalisation`): facts, pairs, the
on-policy generation of one setup (saved as one stage), and the labelled rows of each reading.

- **Facts.** Per relation, a seeded order of its corpus facts; the first ``candidates_per_relation``
  are checked with :func:`mechlie.read.known.known_facts` (cached per model), and the first
  ``facts_per_relation`` known ones are used (fewer if fewer are known; a relation with fewer than 2
  is skipped and reported). Each fact keeps its corpus aliases (accepted truths).
- **Pairs.** Every fact is asked under every setup, in *one* of the setup's templates (assigned in
  turn down the relation's facts, the start rotated per relation), so each template gets about
  ``facts_per_relation / n_templates`` facts of each relation: prompts cost the most, and more facts
  buy more than every fact in every wording. Pairs are rendered by :func:`mechlie.core.setups.setup_pairs`
  from all candidate facts of the relation (so few-shot demonstrations come from that larger pool),
  keeping the used facts' pairs.
- **Generation** (one stage per setup): :func:`mechlie.read.labels.on_policy` (greedy honest, greedy
  lying and ``k`` samples of the lying prompt), the relation's valid answers from
  :func:`mechlie.core.corpus.relation_answers` telling a lie from junk. Kept: the states at the
  ``prompt_final`` position of both prompts and at ``answer_first`` / ``answer_mean`` of every lying
  answer (:func:`mechlie.read.detector.position_features`), at the read layers only; each answer's
  text, label and surprisal; lie rates with Wilson CIs (:func:`mechlie.read.rates.lie_rates`).
- **Rows.** On-policy: the lying prompts' answers (greedy and sampled) of pairs whose honest greedy
  answer is the truth, ``lie`` (1) vs ``truth_under_lie_framing`` (0); paraphrases, junk, unknown
  facts and answers without a state at the position are counted and left out. Framing: the honest
  (0) and lying (1) prompts of the same known pairs at ``prompt_final`` (no surprisal).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from mechlie.core.facts import UserFact
from mechlie.studies.generalisation_eval import Rows

log = logging.getLogger("mechlie")

ANSWER_READINGS: tuple[str, ...] = ("answer_first", "answer_mean")
READINGS: tuple[str, ...] = ("on-policy/answer_first", "on-policy/answer_mean", "framing/prompt_final")


@dataclass(frozen=True)
class AliasedFact(UserFact):
    """A corpus fact with its accepted truths (:func:`mechlie.core.setups.setup_pairs` honours ``aliases``)."""

    aliases: tuple[str, ...] = field(default=(), kw_only=True)


def read_layers(n_layers: int, n_read: int) -> list[int]:
    """``n_read`` blocks evenly spaced from 0 to the last (all when ``n_read >= n_layers``)."""
    if n_read >= n_layers:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (n_read - 1)) for i in range(n_read)})


def select_facts(model, ds, relations: Sequence[str], cfg: Any) -> tuple[dict, dict]:
    """Per relation: ``(candidates, used)`` facts and the counts (see the module docstring); ``model()``
    gives the model (called only for the known filter)."""
    from mechlie.core.corpus import corpus_facts, fact_aliases
    from mechlie.read.known import known_facts

    aliases = fact_aliases(ds)
    cands: dict[str, list[AliasedFact]] = {}
    for f in corpus_facts(ds, list(relations)):
        cands.setdefault(f.relation, []).append(
            AliasedFact(f.question, f.answer, f.lie, f.fact_id, relation=f.relation, aliases=aliases.get(f.fact_id, ()))
        )
    for rel in cands:
        cands[rel].sort(key=lambda f: f.fact_id)
        random.Random(f"{cfg.seed}/facts/{rel}").shuffle(cands[rel])
        cands[rel] = cands[rel][: cfg.candidates_per_relation]
    flat = [f for rel in relations for f in cands.get(rel, [])]
    known = known_facts(model(), flat, aliases=aliases) if cfg.known_filter else [True] * len(flat)
    is_known = {f.fact_id: k for f, k in zip(flat, known)}
    used, info = {}, {}
    for rel in relations:
        ok = [f for f in cands.get(rel, []) if is_known[f.fact_id]]
        info[rel] = {"candidates": len(cands.get(rel, [])), "known": len(ok)}
        if len(ok) < 2:
            info[rel]["skipped"] = f"{len(ok)} known of {len(cands.get(rel, []))} candidates (need >= 2)"
            continue
        used[rel] = ok[: cfg.facts_per_relation]
        info[rel]["used"] = len(used[rel])
    return {"candidates": cands, "used": used}, info


def setup_pairs_for(facts: dict, setup: str, tokenizer, answers: dict[str, list[str]], cfg: Any) -> list:
    """The pairs of one setup: each used fact in one template (see the module docstring)."""
    from mechlie.core.pairs import PairError
    from mechlie.core.setups import SETUPS, setup_pairs

    names = SETUPS[setup]
    out = []
    for rel, used in facts["used"].items():
        start = random.Random(f"{cfg.seed}/templates/{setup}/{rel}").randrange(len(names))
        want = {f.fact_id: names[(start + i) % len(names)] for i, f in enumerate(used)}
        pool = facts["candidates"][rel]
        for name in dict.fromkeys(want.values()):
            kw = dict(answers=answers, n_shots=cfg.n_shots, seed=cfg.seed)
            try:
                got = setup_pairs(pool, setup, name, tokenizer, **kw)
            except PairError as e:  # a candidate the pool cannot render: render the used facts alone
                log.info("%s/%s on %s: %s; rendering the used facts only", setup, name, rel, e)
                try:
                    got = setup_pairs(used, setup, name, tokenizer, **kw)
                except PairError as e2:
                    lost = sum(1 for v in want.values() if v == name)
                    log.warning("%s/%s on %s: %s; its %d fact(s) left out of this setup", setup, name, rel, e2, lost)
                    got = []
            out += [p for p in got if want.get(p.fact_id) == name]
    return out


def generate_setup(model, pairs: list, answers: dict[str, list[str]], layers: list[int], cfg: Any) -> tuple[dict, dict]:
    """On-policy answers of one setup's pairs: the tensors and metadata of its stage file."""
    from mechlie.read.detector import position_features
    from mechlie.read.labels import on_policy
    from mechlie.read.rates import lie_rates

    op = on_policy(
        model,
        pairs,
        k=cfg.k,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        layers=layers,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        progress=False,
        answers=answers,
    )
    n, k = len(pairs), cfg.k
    # rows: per pair the greedy lying answer (sample 0), then its k samples
    order = [(i, 0, i) for i in range(n)] + [(i // k, 1 + i % k, i) for i in range(n * k)]
    order.sort(key=lambda t: (t[0], t[1]))
    g, s = op.greedy, op.samples
    labels = [op.greedy_labels[src] if j == 0 else op.sample_labels[src] for _, j, src in order]
    classes = [op.greedy_classes[src] if j == 0 else op.sample_classes[src] for _, j, src in order]
    texts = [g.texts[src] if j == 0 else s.texts[src] for _, j, src in order]
    tensors: dict[str, torch.Tensor] = {}
    for pos in ANSWER_READINGS:
        a = position_features(g.states["resid_post"], g.new_mask, pos)
        b = position_features(s.states["resid_post"], s.new_mask, pos)
        tensors[pos] = torch.stack([(a if j == 0 else b)[0][src] for _, j, src in order])
        tensors[f"{pos}_ok"] = torch.tensor([bool((a if j == 0 else b)[1][src]) for _, j, src in order])
    for name, gs in (("surprisal_answer", "surprisal_answer"), ("surprisal_first", "surprisal_first")):
        ga, sa = getattr(g, gs), getattr(s, gs)
        tensors[name] = torch.stack([(ga if j == 0 else sa)[src] for _, j, src in order]).float()
    tensors["prompt_honest"] = op.honest.states["resid_post"][:, 0]
    tensors["prompt_lying"] = g.states["resid_post"][:, 0]
    meta = {
        "layers": layers,
        "pairs": [
            {
                "fact_id": p.fact_id,
                "relation": p.relation,
                "setup": p.setup,
                "template": f"{p.setup}/{p.template}",
                "truth": p.truth,
                "lie": p.lie,
                "honest_text": op.honest.texts[i],
                "known": bool(op.known[i]),
            }
            for i, p in enumerate(pairs)
        ],
        "rows": [
            {"pair": i, "sample": j, "label": lab, "class": c, "text": t}
            for (i, j, _), lab, c, t in zip(order, labels, classes, texts)
        ],
        "lie_rates": {
            "sampled": lie_rates(op, answers="sampled", group_by=("setup", "relation")),
            "greedy": lie_rates(op, answers="greedy", group_by=("setup", "relation")),
            "sampled_by_template": lie_rates(op, answers="sampled", group_by=("template",)),
        },
    }
    return tensors, meta


def save_stage(path: Path, data: tuple[dict, dict]) -> None:
    from mechlie.core.io import save_tensors

    tensors, meta = data
    save_tensors(path, {k: v.contiguous() for k, v in tensors.items()}, meta)


def load_stage(path: Path) -> tuple[dict, dict]:
    from mechlie.core.io import load_tensors

    return load_tensors(path)


# Without the known filter an answer's label is its class (:data:`mechlie.read.labels.LYING_LABELS` names).
_CLASS_LABEL = {"truth": "truth_under_lie_framing", "lie": "lie", "paraphrase": "paraphrase", "junk": "junk"}


def row_label(row: dict, known_only: bool) -> str:
    """A lying answer's label: the on-policy label (``unknown`` for a pair whose honest greedy answer is
    not the truth) with the known filter, else the label of its answer class."""
    return row["label"] if known_only else _CLASS_LABEL[row["class"]]


def answer_counts(stages: dict[str, tuple[dict, dict]], known_only: bool = True) -> dict:
    """Labels of every lying answer (greedy and sampled) per setup."""
    return {s: dict(Counter(row_label(r, known_only) for r in meta["rows"])) for s, (_, meta) in stages.items()}


def on_policy_rows(stages: dict[str, tuple[dict, dict]], position: str, known_only: bool = True) -> tuple[Rows, dict]:
    """``lie`` vs ``truth_under_lie_framing`` answers (of known pairs unless not ``known_only``) at
    ``position`` (module docstring); and the count of every row left out, by reason."""
    Xs, y, fact, rel, st, tp, pr, su = [], [], [], [], [], [], [], []
    dropped: Counter = Counter()
    for tensors, meta in stages.values():
        keep = []
        for r_i, r in enumerate(meta["rows"]):
            lab = row_label(r, known_only)
            if lab not in ("lie", "truth_under_lie_framing"):
                dropped[lab] += 1
            elif not bool(tensors[f"{position}_ok"][r_i]):
                dropped["no state at the position"] += 1
            else:
                keep.append(r_i)
        Xs.append(tensors[position][keep])
        su.append(tensors["surprisal_answer"][keep])
        for r_i in keep:
            r = meta["rows"][r_i]
            p = meta["pairs"][r["pair"]]
            y.append(float(row_label(r, known_only) == "lie"))
            _add_pair(p, fact, rel, st, tp, pr)
    X = torch.cat(Xs) if Xs else torch.zeros(0)
    return Rows(X, torch.tensor(y), fact, rel, st, tp, pr, torch.cat(su) if su else torch.zeros(0)), dict(dropped)


def _add_pair(p: dict, fact: list, rel: list, st: list, tp: list, pr: list) -> None:
    """One row's pair metadata (fact, relation, setup, template, prompt unit), shared by both row builders."""
    fact.append(p["fact_id"])
    rel.append(p["relation"])
    st.append(p["setup"])
    tp.append(p["template"])
    pr.append(f"{p['fact_id']}|{p['template']}")


def framing_rows(stages: dict[str, tuple[dict, dict]], known_only: bool = True) -> tuple[Rows, dict]:
    """Honest (0) vs lying (1) prompts (of known pairs unless not ``known_only``) at ``prompt_final``;
    the unknown pairs left out counted."""
    Xs, y, fact, rel, st, tp, pr = [], [], [], [], [], [], []
    unknown = 0
    for tensors, meta in stages.values():
        idx = [i for i, p in enumerate(meta["pairs"]) if p["known"] or not known_only]
        unknown += len(meta["pairs"]) - len(idx)
        for key, lab in (("prompt_honest", 0.0), ("prompt_lying", 1.0)):
            Xs.append(tensors[key][idx])
            for i in idx:
                p = meta["pairs"][i]
                y.append(lab)
                _add_pair(p, fact, rel, st, tp, pr)
    X = torch.cat(Xs) if Xs else torch.zeros(0)
    nan = torch.full((len(y),), float("nan"))
    return Rows(X, torch.tensor(y), fact, rel, st, tp, pr, nan), {"unknown pairs": unknown}
