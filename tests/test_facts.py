import json

import pytest

from mechlie.core.facts import (
    REPE_DISHONEST,
    REPE_HONEST,
    FactsError,
    load_facts,
    load_qa_json,
    load_repe_facts,
    load_statements,
    pairs_from_user_facts,
)
from mechlie.core.pairs import FORMATS, build_pairs, fewshot_demos
from tests.conftest import tiny_tokenizer

# Small samples in each format, written for this project.
ANIMALS = [
    ("cat", "meow"),
    ("dog", "woof"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("owl", "hoot"),
    ("lion", "roar"),
    ("snake", "hiss"),
    ("sheep", "baa"),
    ("horse", "neigh"),
    ("pig", "oink"),
    ("bee", "buzz"),
    ("mouse", "squeak"),
]


def facts_rows(relation="sounds"):
    return [{"question": f"What sound does a {a} make?", "answer": s, "relation": relation} for a, s in ANIMALS]


def test_facts_from_csv_jsonl_and_dataset_render_in_all_formats(tmp_path):
    import csv

    from datasets import Dataset

    rows = facts_rows()
    rows[9]["lie"] = "moo"
    p_csv = tmp_path / "f.csv"
    with open(p_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer", "lie", "relation"])
        w.writeheader()
        w.writerows(rows)
    p_jsonl = tmp_path / "f.jsonl"
    p_jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from_csv, from_jsonl = load_facts(p_csv), load_facts(p_jsonl)
    from_ds = load_facts(Dataset.from_list([{**r, "lie": r.get("lie", "")} for r in rows]))
    assert from_csv == from_jsonl == from_ds
    assert len(from_csv) == 12 and from_csv[9].lie == "moo"
    for fmt in FORMATS:
        pairs = pairs_from_user_facts(from_csv, fmt, n_demo_facts=8)
        n_expected = 12 if fmt == "instruct" else 4
        assert len(pairs) == n_expected, fmt
        for p in pairs:
            assert p.question in p.honest and p.question in p.lying and p.lie != p.truth
    fewshot = pairs_from_user_facts(from_csv, "fewshot")
    pig = next(p for p in fewshot if p.truth == "oink")
    assert pig.lie == "moo"  # the user's designated lie is kept
    demos, q = fewshot_demos(pig.honest)
    assert q == "What sound does a pig make?" and len(demos) == 4
    assert all(a not in ("oink", "moo") for _, a in demos)  # no copy confound


def test_bad_facts_are_clear_errors(tmp_path):
    with pytest.raises(FactsError, match=r"record 2: missing column\(s\) \['answer'\]"):
        load_facts([{"question": "a?", "answer": "b"}, {"question": "c?"}])
    with pytest.raises(FactsError, match="record 1: empty answer"):
        load_facts([{"question": "a?", "answer": "  "}])
    with pytest.raises(FactsError, match="does not exist"):
        load_facts(tmp_path / "nope.csv")
    with pytest.raises(FactsError, match="equals the answer"):
        load_facts([{"question": "a?", "answer": "b", "lie": "B"}])
    with pytest.raises(FactsError, match="demonstration"):
        pairs_from_user_facts(load_facts(facts_rows()[:5]), "fewshot", n_demo_facts=8)


def test_statement_csv(tmp_path):
    p = tmp_path / "cities.csv"
    p.write_text("statement,label\nThe city of Paris is in France.,1\nThe city of Lima is in Spain.,0\n")
    s = load_statements(p)
    assert [x.label for x in s] == [1, 0] and s[0].text.startswith("The city of Paris")
    p.write_text("text,label\nx,1\n")
    with pytest.raises(FactsError, match="statement and label"):
        load_statements(p)
    p.write_text("statement,label\nx,maybe\n")
    with pytest.raises(FactsError, match="label must be"):
        load_statements(p)


def test_repe_facts_csv(tmp_path):
    p = tmp_path / "facts_true_false.csv"
    p.write_text("statement,label\nThe Earth orbits the Sun.,1\nWater boils at ten degrees.,0\nBees make honey.,1\n")
    pairs = load_repe_facts(p)
    assert [x.truth for x in pairs] == ["Sun", "honey"]
    assert pairs[0].honest == f"{REPE_HONEST}\n\nThe Earth orbits the"
    assert pairs[0].lying == f"{REPE_DISHONEST}\n\nThe Earth orbits the"


def test_qa_json_layouts(tmp_path):
    recs = [
        {"question": "What colour is the sky?", "answer": "blue", "false_answer": "green"},
        {"question": "What do cows drink?", "answer": "water"},
    ]
    for name, data in (
        ("list", recs),
        ("index", {"0": recs[0], "1": recs[1]}),
        (
            "columns",
            {
                "question": {"0": recs[0]["question"], "1": recs[1]["question"]},
                "answer": {"0": "blue", "1": "water"},
                "false_answer": {"0": "green", "1": None},
            },
        ),
    ):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(data))
        facts = load_qa_json(p)
        assert [f.answer for f in facts] == ["blue", "water"] and facts[0].lie == "green" and facts[1].lie is None
        assert facts[0].relation == name
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"question": "q?"}]))
    with pytest.raises(FactsError, match="missing"):
        load_qa_json(p)


@pytest.mark.parametrize("relation", ["numbers", "symbols"])
def test_new_builtin_relations(relation):
    pairs = build_pairs(relation, "fewshot")
    assert len(pairs) >= 20
    assert all(p.relation == relation and p.lie and p.lie != p.truth for p in pairs)
    tok_pairs = build_pairs(relation, "instruct", tokenizer=tiny_tokenizer(), chat=False)
    assert tok_pairs == [] or all(p.truth for p in tok_pairs)
