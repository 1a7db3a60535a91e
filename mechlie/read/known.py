"""Which facts a model knows, by the greedy-text definition, cached per model on disk.

A fact is *known* when the model's greedy answer to its honest few-shot prompt is the truth: the
text starts with the truth or one of its aliases, as whole words, case-insensitive, and no longer
valid answer of the relation matches it better (``classify_answer(...) == "truth"``,
:mod:`mechlie.read.answers`; "Guinea-Bissau" is not "Guinea"). This is the definition
:attr:`mechlie.read.labels.OnPolicy.known` uses, not the first-token one of
:attr:`mechlie.core.metrics.Behaviour.known`.

The prompt is the honest side of :func:`mechlie.core.facts.pairs_from_user_facts` (format ``fewshot``,
``demonstrations="loo"``, no tokenizer: ``n_shots`` true Q/A demonstrations drawn from the other facts
of the fact's own relation *in* ``facts``, never showing its truth, seeded per fact). So whether a
fact is known depends a little on which facts it is passed with (its demonstrations come from them).
Decoding: greedy, stopped at a newline, at most as many tokens as the shortest accepted spelling of
the truth takes plus :data:`SLACK` (a longer answer cannot start with it anyway), capped at
:data:`MAX_NEW_TOKENS`. Prompts are batched by token length, so little padding is run.

Cache: ``<cache_dir>/known/<model_id>/<key>.json`` holding ``fact_id -> bool``, where ``model_id`` is
:func:`mechlie.core.models.model_id` (a hash of the weights, not the model's name) and ``key`` hashes
every fact's id, relation, question, answer and aliases, ``n_shots``, ``seed`` and
:data:`KNOWN_VERSION`. Written atomically; a file that does not hold exactly these facts is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from tqdm.auto import tqdm

from mechlie.core.facts import FactsError, UserFact, pairs_from_user_facts
from mechlie.core.generation import generate
from mechlie.core.io import atomic_write_json, read_json
from mechlie.core.models import default_cache_dir, model_id
from mechlie.read.answers import classify_answer
from mechlie.read.rates import wilson

if TYPE_CHECKING:
    import datasets
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)

KNOWN_VERSION = 1  # raise when the prompt or the decision changes: part of the cache key
SLACK = 2  # tokens beyond the shortest spelling of the truth (a generated split may differ)
MAX_NEW_TOKENS = 24


def _as_facts(
    facts: Sequence[UserFact] | datasets.Dataset, aliases: Mapping[str, Sequence[str]] | None
) -> tuple[list[UserFact], dict[str, tuple[str, ...]]]:
    if hasattr(facts, "column_names"):  # a corpus Dataset: its aliases column unless given
        from mechlie.core.corpus import corpus_facts, fact_aliases

        aliases = fact_aliases(facts) if aliases is None else aliases
        facts = corpus_facts(facts)
    facts = list(facts)
    if not facts:
        raise FactsError("known_facts: no facts")
    ids = [f.fact_id for f in facts]
    if len(set(ids)) < len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise FactsError(f"known_facts: fact ids must be unique (repeated: {dup})")
    aliases = aliases or {}
    return facts, {f.fact_id: tuple(dict.fromkeys([f.answer, *aliases.get(f.fact_id, ())])) for f in facts}


def facts_key(facts: Sequence[UserFact], aliases: Mapping[str, Sequence[str]], n_shots: int, seed: int) -> str:
    """16 hex digits identifying the fact set, its aliases and the prompt settings."""
    h = hashlib.sha256(json.dumps({"v": KNOWN_VERSION, "n_shots": n_shots, "seed": seed}).encode())
    for f in facts:
        h.update(json.dumps([f.fact_id, f.relation, f.question, f.answer, list(aliases[f.fact_id])]).encode())
    return h.hexdigest()[:16]


def known_facts(
    model: HookedTransformer,
    facts: Sequence[UserFact] | datasets.Dataset,
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    n_shots: int = 3,
    seed: int = 0,
    batch_size: int = 16,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> list[bool]:
    """Whether ``model`` knows each fact (see the module docstring), in the order of ``facts``.

    Args:
        facts: :class:`mechlie.core.facts.UserFact` s (unique ``fact_id``), or a corpus ``Dataset``
            (:func:`mechlie.core.corpus.corpus`), whose ``aliases`` column is then used.
        aliases: ``fact_id -> accepted truths`` besides the answer (e.g. :func:`mechlie.core.corpus.fact_aliases`).
        batch_size: prompts per forward pass; 16 keeps Gemma-3's full-vocabulary prompt logits near 1 GB.
        cache: read and write ``<cache_dir>/known/<model_id>/<key>.json``.

    Example:
        >>> ds = corpus()
        >>> known = known_facts(model, ds)
    """
    facts, accepted = _as_facts(facts, aliases)
    path = None
    if cache:
        key = facts_key(facts, accepted, n_shots, seed)
        path = Path(cache_dir or default_cache_dir()) / "known" / model_id(model) / f"{key}.json"
        hit = _read_cache(path, facts)
        if hit is not None:
            return hit
    # No tokenizer: only the honest prompt is used, and the lies' first-token check is moot here.
    pairs = pairs_from_user_facts(facts, "fewshot", n_shots=n_shots, seed=seed, demonstrations="loo")
    prompts = {p.fact_id: p.honest for p in pairs}
    texts = _greedy_answers(model, facts, prompts, accepted, batch_size, progress)
    valid: dict[str, set[str]] = {}
    for f in facts:
        valid.setdefault(f.relation, set()).add(f.answer)
    out = [
        classify_answer(texts[f.fact_id], f.answer, accepted[f.fact_id][1:], sorted(valid[f.relation])) == "truth"
        for f in facts
    ]
    if path is not None:
        atomic_write_json(
            path,
            {
                "model_id": model_id(model),
                "n_shots": n_shots,
                "seed": seed,
                "n_facts": len(facts),
                "known": {f.fact_id: k for f, k in zip(facts, out)},
            },
        )
    log.info("known facts: %d of %d (%s)", sum(out), len(out), path or "not cached")
    return out


def _read_cache(path: Path, facts: Sequence[UserFact]) -> list[bool] | None:
    if not path.is_file():
        return None
    try:
        known = read_json(path)["known"]
        if set(known) == {f.fact_id for f in facts} and all(isinstance(v, bool) for v in known.values()):
            log.info("known facts: read from %s", path)
            return [known[f.fact_id] for f in facts]
    except (ValueError, KeyError, TypeError) as e:
        log.warning("known-facts cache %s is unreadable (%s); recomputing", path, e)
        return None
    log.warning("known-facts cache %s holds other facts; recomputing", path)
    return None


def _greedy_answers(
    model: HookedTransformer,
    facts: Sequence[UserFact],
    prompts: Mapping[str, str],
    accepted: Mapping[str, Sequence[str]],
    batch_size: int,
    progress: bool,
) -> dict[str, str]:
    """The greedy continuation of each fact's prompt, cut at the first newline."""
    tok = model.tokenizer
    length = {f.fact_id: len(tok.encode(prompts[f.fact_id], add_special_tokens=False)) for f in facts}
    need = {
        f.fact_id: min(len(tok.encode(" " + a, add_special_tokens=False)) for a in accepted[f.fact_id]) + SLACK
        for f in facts
    }
    order = sorted((f.fact_id for f in facts), key=lambda i: (length[i], need[i]))
    out: dict[str, str] = {}
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    for ids in tqdm(batches, desc="known facts", disable=not progress):
        res = generate(
            model,
            [prompts[i] for i in ids],
            max_new_tokens=min(MAX_NEW_TOKENS, max(need[i] for i in ids)),
            stop_strings=("\n",),
        )
        out.update(zip(ids, res.texts))
    return out


def known_share(known: Sequence[bool]) -> dict:
    """The share of known facts with its Wilson 95% interval over facts: ``{"mean", "lo", "hi", "n", "k"}``."""
    k, n = int(sum(known)), len(known)
    lo, hi = wilson(k, n)
    return {"mean": k / n if n else float("nan"), "lo": lo, "hi": hi, "n": n, "k": k}


__all__ = ["KNOWN_VERSION", "facts_key", "known_facts", "known_share"]
