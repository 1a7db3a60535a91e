"""Users' data is never re-purposed or dropped without a word (issue 21, items 5-10 and the readers'
unclear errors). Each test here fails on 89c4f3d."""

import csv
import json
import logging

import pytest
import torch

from mechlie.core.facts import FactsError, load_facts, load_pairs_file, pairs_from_user_facts
from mechlie.core.metrics import behaviour
from mechlie.core.pairs import (
    HONEST_INSTRUCTION,
    LYING_INSTRUCTION,
    AnswerTokenError,
    ContrastPair,
    PairError,
    answer_token_ids,
    fewshot_demos,
)
from mechlie.read.directions import split_by_fact
from mechlie.read.labels import GenStates, OnPolicy
from tests.test_facts import facts_rows

PAIRS = [
    {"honest": f"Q capital of {c} ? A :", "lying": f"Q liar capital of {c} ? A :", "truth": t, "lie": "Rome"}
    for c, t in (("France", "Paris"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Spain", "Madrid"))
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# item 5 -----------------------------------------------------------------------------------------


def test_duplicate_rows_share_a_fact_id_and_stay_on_one_side_of_a_split(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS + PAIRS)  # every row twice, no fact_id
    with caplog.at_level(logging.WARNING):
        pairs = load_pairs_file(path)
    ids = [p.fact_id for p in pairs]
    assert ids[:4] == ["row0", "row1", "row2", "row3"] and ids[4:] == ids[:4]  # unique rows keep their ids
    assert "4 record(s) repeat" in caplog.text and "line 5 repeats line 1" in caplog.text
    for seed in range(5):
        split = split_by_fact(ids, 0.5, seed)
        assert not {pairs[i].honest for i in split.train} & {pairs[i].honest for i in split.test}
    # Users' facts too: a repeated fact shares its first copy's id.
    facts = load_facts(facts_rows() + facts_rows()[:2])
    assert [f.fact_id for f in facts[12:]] == [f.fact_id for f in facts[:2]]


# item 6 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("truth", ["Moscow", "moscow"], r"p\.jsonl, line 2: field 'truth' must be a string or a number, got list"),
        ("honest", {"text": "Q a"}, r"p\.jsonl, line 2: field 'honest' must be a string, got dict"),
        ("lie", True, r"p\.jsonl, line 2: field 'lie' must be a string or a number, got bool"),
    ],
)
def test_wrong_types_in_a_pairs_file_name_file_line_and_field(tmp_path, field, value, match):
    rows = [PAIRS[0], {**PAIRS[1], field: value}]
    with pytest.raises(PairError, match=match):
        load_pairs_file(write_jsonl(tmp_path / "p.jsonl", rows))


def test_wrong_types_in_a_facts_file_name_file_line_and_field(tmp_path):
    rows = facts_rows()
    rows[2]["answer"] = ["meow", "Meow"]
    with pytest.raises(FactsError, match=r"f\.jsonl, line 3: field 'answer' must be a string or a number, got list"):
        load_facts(write_jsonl(tmp_path / "f.jsonl", rows))
    rows[2] = {"question": {"q": "?"}, "answer": "moo"}
    with pytest.raises(FactsError, match=r"line 3: field 'question' must be a string, got dict"):
        load_facts(write_jsonl(tmp_path / "f.jsonl", rows))
    # A number is an answer's text, as before.
    assert load_facts([{"question": "What is 2+2?", "answer": 4}])[0].answer == "4"


# readers' errors --------------------------------------------------------------------------------


def test_non_utf8_files_name_the_file_and_line(tmp_path):
    rows = [PAIRS[0], {**PAIRS[1], "truth": "Bogotá"}]
    with pytest.raises(PairError, match=r"p\.csv, line 3: not UTF-8 \(byte 0xe1"):
        load_pairs_file(write_csv(tmp_path / "p.csv", rows, encoding="latin-1"))
    facts = facts_rows()
    facts[1]["answer"] = "miaú"
    path = tmp_path / "f.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in facts).encode("latin-1"))
    with pytest.raises(FactsError, match=r"f\.jsonl, line 2: not UTF-8"):
        load_facts(path)
    with pytest.raises(PairError, match="is a directory"):
        load_pairs_file(tmp_path)


def test_the_head_sweep_names_a_bad_pairs_file_and_line(tmp_path):
    """Through the script's own path: a non-UTF-8 file names its line (the row count used to read
    it first and fail with a bare codec error); a directory named like a pairs file says so."""
    from mechlie.studies.head_sweep import HeadSweepConfig, load_sweep_pairs

    path = write_csv(tmp_path / "p.csv", [PAIRS[0], {**PAIRS[1], "truth": "Bogotá"}], encoding="latin-1")
    with pytest.raises(PairError, match=r"p\.csv, line 3: not UTF-8"):
        load_sweep_pairs(HeadSweepConfig(dataset=str(path)), tokenizer=None)
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(IsADirectoryError, match="dir.jsonl is a directory"):
        HeadSweepConfig(dataset=str(tmp_path / "dir.jsonl"))


def test_a_bom_csv_is_read_and_facts_errors_give_1_based_lines(tmp_path):
    plain = load_pairs_file(write_csv(tmp_path / "p.csv", PAIRS))
    assert load_pairs_file(write_csv(tmp_path / "bom.csv", PAIRS, encoding="utf-8-sig")) == plain
    facts = facts_rows()
    assert load_facts(write_csv(tmp_path / "f.csv", facts, encoding="utf-8-sig")) == load_facts(facts)
    facts[1]["answer"] = ""
    with pytest.raises(FactsError, match=r"f\.csv, line 3: empty answer"):  # header is line 1
        load_facts(write_csv(tmp_path / "f.csv", facts))
    with pytest.raises(FactsError, match=r"f\.jsonl, line 2: empty answer"):
        load_facts(write_jsonl(tmp_path / "f.jsonl", facts))


# item 7 -----------------------------------------------------------------------------------------


def test_fewshot_says_which_facts_are_only_demonstrations_and_loo_uses_every_fact(caplog):
    facts = load_facts(facts_rows())
    with caplog.at_level(logging.WARNING):
        pool = pairs_from_user_facts(facts, "fewshot")
    assert len(pool) == 4 and "8 of 12 facts are used only as demonstrations" in caplog.text
    assert "sounds: 8" in caplog.text
    assert pairs_from_user_facts(facts, "fewshot", demonstrations="pool") == pool  # the default
    loo = pairs_from_user_facts(facts, "fewshot", demonstrations="loo")
    assert sorted(p.fact_id for p in loo) == sorted(f.fact_id for f in facts)
    for p in loo:
        demos, q = fewshot_demos(p.honest)
        assert q == p.question and len(demos) == 4
        assert all(dq != q and da not in (p.truth, p.lie) for dq, da in demos)  # never its own fact


# item 8 -----------------------------------------------------------------------------------------


def instruct_pair(country: str, truth: str) -> ContrastPair:
    q = f"Q: capital of {country} ?\nA:"
    return ContrastPair(f"{HONEST_INSTRUCTION}\n\n{q}", f"{LYING_INSTRUCTION}\n\n{q}", truth, "Rome", country)


def test_behaviour_warns_when_few_facts_of_a_format_are_known(tiny, caplog):
    pairs = [instruct_pair("Peru", "Lima"), instruct_pair("Cuba", "Havana"), instruct_pair("France", "Paris")]
    with caplog.at_level(logging.WARNING):
        b = behaviour(tiny, pairs, progress=False, warn_known_below=1.01)
    n_known = int(b.known.sum())
    assert f"format 'instruct': {n_known} of 3 pairs known (share {n_known / 3:.3f}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = behaviour(tiny, pairs, progress=False, warn_known_below=0.0)
    assert "known" not in caplog.text and torch.equal(again.honest.p_truth, b.honest.p_truth)


# item 9 -----------------------------------------------------------------------------------------


def fake_on_policy(honest_texts, answer_steps=None):
    n = len(honest_texts)
    mask = torch.ones(n, 2, dtype=torch.long)
    if answer_steps is not None:
        mask[:, 1] = torch.tensor(answer_steps)
    gs = GenStates(mask.clone(), mask, list(honest_texts), {"resid_post": torch.randn(n, 2, 1, 4)}, (0,))
    pairs = [ContrastPair(f"h{i}", f"l{i}", "Paris", "Rome", f"f{i}", "capitals") for i in range(n)]
    lying = GenStates(mask.clone(), mask, [" Rome"] * n, {"resid_post": torch.randn(n, 2, 1, 4)}, (0,))
    return OnPolicy(pairs, gs, lying, None, 0, 1.0)


def test_both_definitions_of_known_are_named_and_reported_side_by_side(tiny):
    from mechlie.read.labels import known_side_by_side

    pairs = [instruct_pair("Peru", "Lima"), instruct_pair("Cuba", "Havana")]
    s = behaviour(tiny, pairs, progress=False).summary()
    assert s["n_known_first_token"] == s["n_known"]  # the old key stays
    op = fake_on_policy([" Paris", " Paris is big", " Lyon"])
    assert op.counts()["all"]["n_known_greedy"] == op.counts()["all"]["honest/honest"] == 2
    first_token = torch.tensor([True, False, True])
    assert known_side_by_side(first_token, op) == {
        "n": 3,
        "known_first_token": 2,
        "known_greedy": 2,
        "known_both": 1,
        "known_first_token_only": 1,
        "known_greedy_only": 1,
    }


# item 10 ----------------------------------------------------------------------------------------


def test_on_policy_rows_log_the_rows_they_leave_out(caplog):
    op = fake_on_policy([" Paris", " Paris", " Paris"], answer_steps=[1, 0, 1])  # row 1 stopped at its first token
    with caplog.at_level(logging.WARNING):
        X, y, facts = op.rows("vs_honest", site="answer")
    assert facts == ["f0", "f2", "f0", "f2"]
    assert "left out 2 of 6 rows whose answer stopped before the answer site" in caplog.text


def test_behaviour_can_drop_pairs_whose_truth_and_lie_share_a_first_token(tiny, caplog):
    pairs = [
        ContrastPair("Q capital of Peru ? A :", "Q liar capital of Peru ? A :", "Lima Chile", "Rome", "f1"),
        ContrastPair("Q a", "Q liar a", "Lima Chile", "Lima Peru", "f_shared"),
        ContrastPair("Q capital of Cuba ? A :", "Q liar capital of Cuba ? A :", "Havana", "Cairo", "f2"),
    ]
    with pytest.raises(PairError, match="share a first token"):
        behaviour(tiny, pairs, progress=False)  # the default is unchanged
    with caplog.at_level(logging.WARNING):
        b = behaviour(tiny, pairs, progress=False, on_shared_first_token="drop")
    assert b.kept == (0, 2) and "left out 1 of 3 pairs" in caplog.text and "'f_shared'" in caplog.text
    ref = behaviour(tiny, [pairs[0], pairs[2]], progress=False)
    assert torch.equal(b.honest.p_truth, ref.honest.p_truth) and ref.kept is None
    assert b.subset(torch.tensor([1])).kept == (2,)


def test_answer_token_error_no_longer_says_one_token_answers_only(tiny):
    with pytest.raises(AnswerTokenError) as e:
        answer_token_ids(tiny.tokenizer, "Lima Chile")
    assert "one-token answers only" not in str(e.value) and "answer_logprob" in str(e.value)


# load_edit --------------------------------------------------------------------------------------


def test_load_edit_on_a_detector_file_says_it_is_not_an_edit(tiny, tmp_path):
    from mechlie.control.learned import load_edit
    from mechlie.core.hooks import SteeringError
    from mechlie.core.pairs import neutral_lines
    from mechlie.read.detector import fit_detector

    pairs = [ContrastPair(p["honest"], p["lying"], p["truth"], p["lie"], f"f{i}") for i, p in enumerate(PAIRS)]
    path = fit_detector(tiny, pairs * 3, neutral_lines(), probe="diff_of_means", layers=(0,)).save(
        tmp_path / "det.safetensors"
    )
    with pytest.raises(SteeringError, match=r"det\.safetensors is not a saved edit .* a saved detector"):
        load_edit(path)
