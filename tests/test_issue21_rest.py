"""Issue 21, the rest of the bad-input probe: each unclear or silent case now gives one line that names
the file, line, record, flag or field, or is accepted (tiny models and hand-made files; no weights)."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field

import pytest

from mechlie.core.cli import RunDir, run_script
from mechlie.core.facts import FactsError, load_facts, load_pairs_file, pairs_from_records
from mechlie.core.pairs import PairError
from tests.test_facts import facts_rows
from tests.tiny_models import tiny_tokenizer, word_model

PAIRS = [
    {"honest": f"Q capital of {c} ? A :", "lying": f"Q liar capital of {c} ? A :", "truth": t, "lie": "Rome"}
    for c, t in (("France", "Paris"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Spain", "Madrid"))
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@dataclass(frozen=True)
class Cfg:
    n_pairs: int = 30
    out_dir: str = "results/x"
    run_name: str = field(default="", metadata={"run": False})


# 1: a foreign hidden file in a run folder is named -------------------------------------------------------


def test_a_foreign_hidden_file_in_a_run_folder_is_named_and_stale_temps_still_go(tmp_path, capsys):
    run = tmp_path / "out" / "mine"
    run.mkdir(parents=True)
    (run / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    stale = run / ".summary.json.k2j3h4g5.tmp"  # mechlie's own: removed, not named
    stale.write_text("{")
    argv = ["--out-dir", str(tmp_path / "out"), "--run-name", "mine"]
    assert run_script(Cfg, lambda c, r: {"ok": 1}, argv=argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json (.DS_Store)" in err, err
    assert not stale.exists() and (run / ".DS_Store").exists()  # the user's file is left alone
    for i in range(7):
        (run / f"f{i}.txt").write_text("x")
    assert run_script(Cfg, lambda c, r: {"ok": 1}, argv=argv) == 2
    assert "(.DS_Store, f0.txt, f1.txt, f2.txt, f3.txt and 3 more)" in capsys.readouterr().err


# 2: records in memory are numbered from 1, as lines are ---------------------------------------------------


def test_in_memory_records_are_numbered_from_1(caplog):
    with pytest.raises(FactsError, match=r"^list, record 2: missing column\(s\) \['answer'\]"):
        load_facts([{"question": "a?", "answer": "b"}, {"question": "c?"}])
    with pytest.raises(FactsError, match=r"^list, record 1: empty answer"):
        load_facts([{"question": "a?", "answer": "  "}])
    with pytest.raises(PairError, match=r"^records, record 3: field 'truth' must be a string or a number, got list"):
        pairs_from_records([PAIRS[0], PAIRS[1], {**PAIRS[2], "truth": ["Havana"]}])
    with caplog.at_level(logging.WARNING):
        pairs_from_records([PAIRS[0], PAIRS[1], PAIRS[0]])
    assert "record 3 repeats record 1" in caplog.text


# 3: extensions in any case -------------------------------------------------------------------------------


def test_upper_case_extensions_are_read_like_lower_case(tmp_path):
    from mechlie.studies.head_sweep import HeadSweepConfig, load_sweep_pairs

    facts = facts_rows()
    assert load_facts(write_csv(tmp_path / "facts.CSV", facts)) == load_facts(write_csv(tmp_path / "f.csv", facts))
    assert load_facts(write_jsonl(tmp_path / "facts.JSONL", facts)) == load_facts(facts)
    upper = write_csv(tmp_path / "pairs.CSV", PAIRS)
    assert load_pairs_file(upper) == load_pairs_file(write_csv(tmp_path / "p.csv", PAIRS))
    assert load_pairs_file(write_jsonl(tmp_path / "pairs.Jsonl", PAIRS)) == load_pairs_file(upper)
    cfg = HeadSweepConfig(dataset=str(upper))
    assert cfg.is_file
    pairs, info = load_sweep_pairs(cfg, tokenizer=tiny_tokenizer())
    # the row count reads it as a CSV too (as JSON lines it would count the header: 5 rows, 1 "dropped")
    assert len(pairs) == 4 and info["rows_read"] == 4 and info["rows_dropped_multitoken_answer"] == 0
    with pytest.raises(FactsError, match=r"facts\.txt: expected a \.csv or \.jsonl facts file"):
        load_facts(write_csv(tmp_path / "facts.txt", facts))


# 4: the "too few pairs" hint depends on --known-only -------------------------------------------------------


def test_too_few_pairs_suggests_no_known_only_only_when_it_was_not_given(tiny, tmp_path):
    from mechlie.studies.head_sweep import HeadSweepConfig, run_head_sweep

    path = write_jsonl(tmp_path / "one.jsonl", PAIRS[:1])
    for known_only in (False, True):
        cfg = HeadSweepConfig(dataset=str(path), known_only=known_only, n_perm=20, n_random=20, n_boot=100)
        run = RunDir(tmp_path / f"run{known_only}", {"config": {"known_only": known_only}})
        with pytest.raises(PairError) as e:
            run_head_sweep(cfg, tiny, run, progress=False)
        run.close()
        msg = str(e.value)
        assert "usable pairs" in msg and "needs 4" in msg, msg
        assert ("only 1 usable pairs (--no-known-only keeps every pair)" in msg) == (not known_only), msg
        assert ("or --no-known-only" in msg) == known_only, msg  # never suggested when it was given


# 5: a refused pair names the file and line ------------------------------------------------------------------


def test_a_lie_equal_to_its_truth_names_the_file_and_line(tmp_path):
    rows = [PAIRS[0], {**PAIRS[1], "lie": "Lima"}]
    with pytest.raises(PairError, match=r"p\.csv, line 3: field 'lie' equals field 'truth' \('Lima'\)"):
        load_pairs_file(write_csv(tmp_path / "p.csv", rows))
    with pytest.raises(PairError, match=r"p\.jsonl, line 2: field 'lie' equals field 'truth'"):
        load_pairs_file(write_jsonl(tmp_path / "p.jsonl", rows))
    with pytest.raises(PairError, match=r"records, record 2: field 'lie' equals field 'truth'"):
        pairs_from_records(rows)
    same = {**PAIRS[1], "lying": PAIRS[1]["honest"]}
    with pytest.raises(PairError, match=r"q\.jsonl, line 2: fields 'honest' and 'lying' are the same prompt"):
        load_pairs_file(write_jsonl(tmp_path / "q.jsonl", [PAIRS[0], same]))
    blank = {**PAIRS[1], "truth": "   "}  # refused by ContrastPair itself: its message gets the place
    with pytest.raises(PairError, match=r"b\.jsonl, line 2: pair .*empty truth"):
        load_pairs_file(write_jsonl(tmp_path / "b.jsonl", [PAIRS[0], blank]))


# 6: the head sweep reads its pairs file before the model loads --------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """``load_model`` that records the call and refuses: a test fails if a bad file lets the model load."""
    import mechlie.core.models as models

    calls = []

    def refuse(*a, **kw):
        calls.append(a)
        raise AssertionError("the model loaded before the pairs file was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    return calls


@pytest.mark.parametrize(
    "rows, message",
    [
        ([PAIRS[0], {**PAIRS[1], "lie": "Lima"}, PAIRS[2], PAIRS[3]], r"p\.jsonl, line 2: field 'lie' equals"),
        ([PAIRS[0], PAIRS[1], {**PAIRS[2], "truth": ["Havana"]}, PAIRS[3]], r"p\.jsonl, line 3: field 'truth'"),
        (PAIRS[:1], r"p\.jsonl: 1 pairs; the head sweep needs at least 4"),
    ],
)
def test_the_head_sweep_checks_its_pairs_file_before_loading_the_model(tmp_path, capsys, no_model, rows, message):
    import re

    from mechlie.studies.base import launch
    from mechlie.studies.head_sweep import STUDY

    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert launch(STUDY, argv=["--dataset", str(path), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert no_model == [] and not (tmp_path / "out").exists()


def test_the_head_sweep_check_passes_a_good_file_and_counts_max_rows(tmp_path):
    from mechlie.studies.head_sweep import HeadSweepConfig, check_dataset

    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    check_dataset(HeadSweepConfig(dataset=str(path)))
    check_dataset(HeadSweepConfig(dataset="capitals"))  # built-in: nothing to read
    with pytest.raises(PairError, match=r"4 pairs, 2 used \(--max-rows 2\); the head sweep needs at least 4"):
        check_dataset(HeadSweepConfig(dataset=str(path), max_rows=2))


# 7 (issue item 9): the behaviour study reports both definitions of known ------------------------------------


def test_the_behaviour_study_reports_both_definitions_of_known(tmp_path):
    from mechlie.studies.behaviour import BehaviourConfig, BehaviourResult, run

    cfg = BehaviourConfig(model="tiny", n_pairs=4, formats=("fewshot",), n_boot=100)
    res = run(cfg, word_model(n_ctx=256), RunDir(tmp_path / "run", {"config": {}}))  # fewshot prompts are long
    rows = res.summary()["rows"]
    assert len(rows) >= 4
    for key, rep in rows.items():
        side = rep["known_side_by_side"]
        assert side["n"] == rep["all"]["n"] and side["known_first_token"] == rep["all"]["n_known"], key
        assert side["known_both"] + side["known_first_token_only"] == side["known_first_token"]
        assert side["known_both"] + side["known_greedy_only"] == side["known_greedy"]
    head = "\n".join(res.headline())
    assert "greedy text" in head and "first token" in head and "greedy honest answer" in head
    assert "known by two definitions" in res.report()
    # a run made before the key existed (the committed docs) keeps its old headline
    old = {k: {kk: v for kk, v in rep.items() if kk != "known_side_by_side"} for k, rep in rows.items()}
    old_head = "\n".join(BehaviourResult(tmp_path, {"model": "tiny", "rows": old}).headline())
    assert "greedy" not in old_head and old_head.count("\n") == len(rows) - 1


def test_the_two_definitions_of_known_differ_where_they_should():
    """A model that always says "Paris": a truth "Paris" is known both ways, "Paris Madrid" by its first
    token only (the greedy text goes on "Paris Paris"), "Lima" neither way."""
    import torch

    from mechlie.core.metrics import behaviour
    from mechlie.core.pairs import ContrastPair
    from mechlie.studies.behaviour import known_definitions

    model = word_model(n_ctx=256)
    with torch.no_grad():
        model.b_U[model.tokenizer.convert_tokens_to_ids("Paris")] += 100.0
    pairs = [
        ContrastPair(f"Q capital of {c} ? A :", f"Q liar capital of {c} ? A :", t, "Rome", c, "capitals")
        for c, t in (("France", "Paris"), ("Spain", "Paris Madrid"), ("Peru", "Lima"))
    ]
    beh = behaviour(model, pairs, progress=False)
    assert beh.known.tolist() == [True, True, False]
    assert known_definitions(model, pairs, beh) == {
        "n": 3,
        "known_first_token": 2,
        "known_greedy": 1,
        "known_both": 1,
        "known_first_token_only": 1,
        "known_greedy_only": 0,
    }


def test_sae_features_suggests_no_known_only_only_when_it_was_not_given():
    from mechlie.studies.sae_features import SAEFeaturesConfig, known_pairs

    model = word_model(n_ctx=256)
    for known_only in (False, True):
        with pytest.raises(ValueError, match="usable pairs") as e:
            known_pairs(model, SAEFeaturesConfig(n_pairs=1, known_only=known_only))
        assert ("--no-known-only" in str(e.value)) == known_only, str(e.value)


# The re-run probe (stop 18): a user's own hidden .tmp files are never deleted; inputs that were silently wrong --


def test_a_users_hidden_tmp_files_survive_a_run_in_their_folder(tmp_path, capsys):
    from mechlie.core.manifest import STALE_TEMP

    argv = ["--out-dir", str(tmp_path / "out"), "--run-name", "mine"]
    assert run_script(Cfg, lambda c, r: {"ok": 1}, argv=argv) == 0
    run = tmp_path / "out" / "mine"
    notes, draft = run / ".notes.tmp", run / "sub" / ".draft.tmp"
    draft.parent.mkdir()
    notes.write_text("my notes")
    draft.write_text("draft")
    ours = run / ".summary.json.k2j3h4g5.tmp"  # what mechlie's atomic write leaves when interrupted
    ours.write_text("{")
    assert run_script(Cfg, lambda c, r: {"ok": 1}, argv=argv) == 0
    assert notes.read_text() == "my notes" and draft.read_text() == "draft" and not ours.exists()
    assert not STALE_TEMP.match(".my.backup12.tmp") and STALE_TEMP.match(".patching.safetensors.a_9b8c7d.tmp")


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_a_lie_equal_to_the_truth_apart_from_case_is_refused_with_its_line(tmp_path):
    rows = [dict(PAIRS[i]) for i in range(3)] + [{**PAIRS[0], "truth": "Paris", "lie": "paris"}]
    f = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(PairError, match=r"p\.jsonl, line 4: field 'lie' equals field 'truth' apart from case"):
        load_pairs_file(f)
    with pytest.raises(PairError, match=r"line 2: field 'lie' is blank"):
        load_pairs_file(
            _write(tmp_path / "b.jsonl", json.dumps(PAIRS[0]) + "\n" + json.dumps({**PAIRS[1], "lie": "  "}))
        )


def test_nan_and_infinity_are_not_answers(tmp_path):
    line = json.dumps({**PAIRS[1], "truth": float("nan")})  # json writes NaN, as pandas' missing values do
    with pytest.raises(PairError, match=r"line 2: field 'truth' is nan"):
        load_pairs_file(_write(tmp_path / "n.jsonl", json.dumps(PAIRS[0]) + "\n" + line + "\n"))
    with pytest.raises(FactsError, match=r"record 1: field 'answer' is inf"):
        load_facts([{"question": "a?", "answer": float("inf")}])


def test_a_repeated_csv_column_and_a_shifted_csv_row_are_refused(tmp_path):
    dup = _write(tmp_path / "d.csv", "honest,lying,truth,truth,lie\nQ1 A:,L Q1 A:,Paris,Madrid,Rome\n")
    with pytest.raises(PairError, match=r"d\.csv, line 1: column\(s\) \['truth'\] appear more than once"):
        load_pairs_file(dup)
    shifted = "question,answer\nWhat is the capital of France, the country?,Paris\n"
    with pytest.raises(FactsError, match=r"s\.csv, line 2: 3 values for 2 columns \(an unquoted comma"):
        load_facts(_write(tmp_path / "s.csv", shifted))
    short = "honest,lying,truth,lie\nQ1 A:,L Q1 A:,Paris\n"
    with pytest.raises(PairError, match=r"h\.csv, line 2: 3 values for 4 columns"):
        load_pairs_file(_write(tmp_path / "h.csv", short))


class _FakeResult:
    study = "head_sweep"

    def __init__(self, run_dir):
        self.run_dir = run_dir

    def title(self):
        return "fake"

    def headline(self):
        return ["- one line"]

    def figures(self):
        return {}

    def captions(self):
        return {}


def test_make_figures_names_clashing_runs_and_an_out_under_a_file(tmp_path):
    from mechlie.core.io import UserError
    from mechlie.report.markdown import write_report

    a, b = tmp_path / "hs" / "run1", tmp_path / "other" / "run1"
    with pytest.raises(UserError, match=r"hs/run1 and .*other/run1 both give the figure folder head_sweep-run1"):
        write_report([_FakeResult(a), _FakeResult(b)], tmp_path / "r" / "report.md")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"afile is a file, not a folder"):
        write_report([_FakeResult(a)], tmp_path / "afile" / "report.md")
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_an_unknown_format_is_named_before_the_demonstration_count():
    """Run as a user runs it: outside pytest's runtime type checks, which would refuse the Literal first."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from mechlie.core.facts import load_facts, pairs_from_user_facts\n"
        "facts = load_facts([{'question': f'q{i}?', 'answer': f'a{i}'} for i in range(4)])\n"
        "pairs_from_user_facts(facts, 'chat')\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode != 0 and "FactsError: unknown format 'chat'; formats" in out.stderr, out.stderr[-500:]
