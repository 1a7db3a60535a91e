"""Two checks of steering off its training distribution: a small capability check (does an edit keep
the answers the model gives correctly to questions that have nothing to do with lying or with the
relations it was fitted on?) and the pairs of a held-out setup (:func:`setup_heldout_pairs`).

Questions come from the offline fact corpus (:mod:`mechlie.core.corpus`), from relations used nowhere
else in the study (by default country -> continent, country -> currency, postal abbreviation -> US
state and country -> demonym; none shares its answers with the built-in relations the edits are fitted,
chosen or reported on). Each is asked as the few-shot setup's *honest* prompt (three demonstrations
with their true answers, :func:`mechlie.core.setups.setup_pairs`), so the prompt is the format the
edits were trained on, minus the lie. A seeded sample of ``n_candidates`` questions is scored once
unedited; the first ``n`` whose top-1 first answer token is the truth are kept (the check is "answers
it still gets right", so its accuracy before is 1 by construction). Each method then costs one forward
per kept question: the share still answered correctly, with a Wilson 95% CI over questions
(:func:`mechlie.read.rates.wilson`). The prompting baseline is checked on the same questions read after
its honesty instruction and reminder.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import Sequence

from transformer_lens import HookedTransformer

from mechlie.control.steering import Intervention
from mechlie.core.pairs import AnswerSet, Batch, ContrastPair, PairError, answer_set, shared_first_token
from mechlie.read.rates import wilson
from mechlie.studies.steering_data import batches, prompt_baseline, score_prompts

log = logging.getLogger("mechlie")

# Corpus relations whose answers (continents, currencies, US states, demonyms) are not those of any
# built-in relation the study fits, chooses or reports on (capitals, cities, languages, opposites, symbols).
CAPABILITY_RELATIONS: tuple[str, ...] = (
    "country_continent",
    "country_currency",
    "abbreviation_us_state",
    "country_demonym",
)


def corpus_pairs(relations: Sequence[str], n_per_relation: int, tokenizer, seed: int) -> list[ContrastPair]:
    """A seeded sample of ``n_per_relation`` corpus facts per relation, as few-shot pairs (honest side used)."""
    from mechlie.core.corpus import corpus, corpus_facts, fact_aliases, relation_answers
    from mechlie.core.setups import setup_pairs

    ds = corpus()
    facts = []
    for rel in relations:
        fs = corpus_facts(ds, [rel])
        facts += random.Random(f"{seed}/capability/{rel}").sample(fs, min(n_per_relation, len(fs)))
    answers = {rel: relation_answers(ds, rel) for rel in relations}
    return setup_pairs(facts, "fewshot", "qa", tokenizer, answers=answers, seed=seed, aliases=fact_aliases(ds))


class PlainText:
    """A tokenizer seen without its chat template (everything else passed through), so that
    :func:`mechlie.core.setups.setup_pairs` renders plain text: the instruction as a preamble, then
    ``Q: ... A:``, the layout the few-shot prompts use. SmolLM2's chat-template answers are sentences
    ("The opposite of hot is cold."), whose first token is not the answer: read at the first answer
    token, 0 of 16 held-out facts were known in the chat rendering (measured: a smoke run of this study)."""

    chat_template = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def setup_heldout_pairs(
    relations: Sequence[str],
    setup: str,
    template: str,
    n_per_relation: int,
    tokenizer,
    seed: int,
    corpus: bool,
    chat: bool = False,
    fact_ids: set[str] | None = None,
    demos: int = 0,
) -> list[ContrastPair]:
    """The held-out relations asked in another setup than the few-shot one everything is fitted on
    (:func:`mechlie.core.setups.setup_pairs`; ``template`` '' = the setup's first): a seeded sample of
    ``n_per_relation`` facts per relation, from the built-in relations or (``corpus``) the fact corpus;
    rendered in plain text unless ``chat`` (see :class:`PlainText`). ``fact_ids``: only these facts
    (e.g. the fitted relations' test facts, none of them trained on). ``demos`` > 0 (an instruction
    setup only): the setup's honest / lying instruction, then the few-shot *honest* prompt (``demos``
    demonstrations with their true answers, plain text): the lie is asked for in words, never shown,
    and the demonstrations only show the answer format. Without them SmolLM2-135M rarely starts its
    answer with the answer (read at the first token, 0 of 24 held-out-relation facts and 0 of 24
    capitals / cities known in plain text, 3 of 24 with the chat template; measured)."""
    from mechlie.core.setups import SETUPS, builtin_setup_facts, get_template, setup_pairs

    aliases = None
    if corpus:
        from mechlie.core.corpus import corpus as load_corpus
        from mechlie.core.corpus import corpus_facts, fact_aliases, relation_answers

        ds = load_corpus()
        facts, answers = corpus_facts(ds, relations), {r: relation_answers(ds, r) for r in relations}
        aliases = fact_aliases(ds)
    else:
        facts, answers = builtin_setup_facts(relations)
    picked = []
    for rel in relations:
        fs = [f for f in facts if f.relation == rel and (fact_ids is None or f.fact_id in fact_ids)]
        picked += random.Random(f"{seed}/setup/{rel}").sample(fs, min(n_per_relation, len(fs)))
    name = template or SETUPS[setup][0]
    tok = tokenizer if chat or tokenizer is None else PlainText(tokenizer)
    if not demos:
        return setup_pairs(picked, setup, name, tok, answers=answers, seed=seed, aliases=aliases)
    tpl = get_template(setup, name)
    if tpl.where != "instruction":
        raise PairError(f"demonstrations go with an instruction setup (instructed, roleplay), not {setup!r}")
    shots = setup_pairs(picked, "fewshot", "qa", tok, answers=answers, n_shots=demos, seed=seed, aliases=aliases)
    return [
        replace(p, honest=f"{tpl.honest}\n\n{p.honest}", lying=f"{tpl.lying}\n\n{p.honest}", setup=setup, template=name)
        for p in shots
    ]


@dataclass
class CapabilitySet:
    """The kept questions (answered correctly unedited), tokenized once."""

    pairs: list[ContrastPair]
    answers: AnswerSet
    honest: list[Batch]
    n_candidates: int
    known_per_relation: dict[str, int]

    def check(self, model: HookedTransformer, interventions: Sequence[Intervention] = ()) -> dict:
        """Share of the kept questions still answered correctly (top-1) under ``interventions``."""
        s = score_prompts(model, self.pairs, "honest", interventions, answers=self.answers, bs=self.honest)
        return _share(int(s.correct.sum()), len(self.pairs))

    def check_prompt(self, model: HookedTransformer, batch_size: int = 16) -> dict:
        """The same questions read after the prompting baseline's instruction and reminder."""
        ps = [replace(p, honest=prompt_baseline(p.honest)) for p in self.pairs]
        bs = batches(model, [p.honest for p in ps], batch_size)
        s = score_prompts(model, ps, "honest", answers=self.answers, bs=bs)
        return _share(int(s.correct.sum()), len(ps))


def _share(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"correct": k, "n": n, "accuracy": k / n, "lo": lo, "hi": hi}


def capability_set(
    model: HookedTransformer, pairs: Sequence[ContrastPair], n: int, batch_size: int = 16
) -> CapabilitySet:
    """Score ``pairs``' honest prompts unedited and keep the first ``n`` answered correctly; refuse
    fewer than 10 (the check would say nothing), log how many were dropped and why."""
    pairs = list(pairs)
    # Only the truth is read here, but the scoring needs a lie with another first token: drop the rest.
    shared = set(shared_first_token(model.tokenizer, pairs))
    if shared:
        log.info(
            "capability check: %d of %d questions left out (truth and drawn lie share a first token)",
            len(shared),
            len(pairs),
        )
        pairs = [p for i, p in enumerate(pairs) if i not in shared]
    answers = answer_set(model.tokenizer, pairs)
    s = score_prompts(model, pairs, "honest", answers=answers, batch_size=batch_size)
    ok = [i for i in range(len(pairs)) if bool(s.correct[i])][:n]
    if len(ok) < 10:
        raise PairError(
            f"capability check: only {len(ok)} of {len(pairs)} corpus questions answered correctly unedited "
            "(need 10); choose other --capability-relations or set --capability-n 0"
        )
    kept = [pairs[i] for i in ok]
    per: dict[str, int] = {}
    for p in kept:
        per[p.relation] = per.get(p.relation, 0) + 1
    log.info(
        "capability check: %d of %d corpus questions kept (%d answered wrongly unedited, %d beyond --capability-n)",
        len(kept),
        len(pairs),
        int((~s.correct).sum()),
        int(s.correct.sum()) - len(kept),
    )
    kept_answers = answer_set(model.tokenizer, kept)
    return CapabilitySet(kept, kept_answers, batches(model, [p.honest for p in kept], batch_size), len(pairs), per)


__all__ = [
    "CAPABILITY_RELATIONS",
    "CapabilitySet",
    "PlainText",
    "capability_set",
    "corpus_pairs",
    "setup_heldout_pairs",
]
