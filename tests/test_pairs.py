import json

import pytest

from mechlie.core.facts import load_pairs_file, pairs_from_dataset
from mechlie.core.io import OutputDirError, atomic_write_json, ensure_writable_dir
from mechlie.core.pairs import (
    RELATIONS,
    AnswerTokenError,
    ContrastPair,
    PairError,
    PromptTooLongError,
    answer_set,
    answer_token_ids,
    build_pairs,
    load_builtin,
    tokenize,
)


def test_builtin_has_enough_facts_and_formats_differ_only_in_framing(tiny):
    from mechlie.core.pairs import builtin_facts

    facts = builtin_facts()
    assert set(RELATIONS) <= set(facts) and len(RELATIONS) >= 4
    assert sum(len(facts[r]["facts"]) for r in RELATIONS) >= 150
    for fmt in ("instruct", "fewshot", "both"):
        pairs = build_pairs("capitals", fmt)
        for p in pairs:
            assert p.honest != p.lying and p.truth != p.lie
            # the question itself is the same and is the last thing asked
            assert p.honest.endswith(f"Q: {p.question}\nA:") and p.lying.endswith(f"Q: {p.question}\nA:")
            if fmt == "fewshot":
                assert "truth" not in p.lying.lower() and "lie" not in p.honest.lower()
                # same demo questions, different answers
                hq = [l for l in p.honest.splitlines() if l.startswith("Q:")]
                lq = [l for l in p.lying.splitlines() if l.startswith("Q:")]
                assert hq == lq and len(hq) == 5


def test_demo_facts_are_never_targets():
    pairs = build_pairs("capitals", "fewshot", n_demo_facts=8)
    targets = {p.question for p in pairs}
    for p in pairs:
        demo_qs = {l[3:] for l in p.honest.splitlines() if l.startswith("Q:")} - {p.question}
        assert not (demo_qs & targets)


def test_answer_variants_and_multitoken(tiny):
    tok = tiny.tokenizer
    assert answer_token_ids(tok, "Paris") == [tok.convert_tokens_to_ids("Paris")]
    with pytest.raises(AnswerTokenError, match="not a single token"):
        answer_token_ids(tok, "Paris Rome")


def test_answer_variants_real_tokenizer(smol):
    ids = answer_token_ids(smol.tokenizer, "Paris")
    assert len(ids) == 2  # " Paris" and "Paris" are both single tokens, and different ones
    assert [smol.tokenizer.decode([i]) for i in ids] == [" Paris", "Paris"]


def test_left_padding_and_context_length(tiny):
    b = tokenize(tiny, ["Q: hot?\nA:", "Q: What is the capital of France?\nA:"])
    assert b.tokens.shape == b.attention_mask.shape
    assert b.attention_mask[0, 0] == 0 and b.attention_mask[:, -1].all()
    assert b.lengths.tolist() == [6, 11]
    with pytest.raises(PromptTooLongError, match="exceeds the model context"):
        tokenize(tiny, ["hot " * 100])
    with pytest.raises(PairError):
        tokenize(tiny, [])


def test_mismatched_or_empty_pairs():
    with pytest.raises(PairError):
        ContrastPair(honest="", lying="x", truth="Paris")
    with pytest.raises(PairError):
        ContrastPair(honest="same", lying="same", truth="Paris")
    with pytest.raises(PairError):
        ContrastPair(honest="a", lying="b", truth="Paris", lie="Paris")


def test_load_csv_jsonl_and_dataset(tmp_path, tiny):
    rows = [
        {
            "honest": "Answer truthfully. Q: France?\nA:",
            "lying": "Lie. Q: France?\nA:",
            "truth": "Paris",
            "lie": "Rome",
        },
        {"honest": "Answer truthfully. Q: Spain?\nA:", "lying": "Lie. Q: Spain?\nA:", "truth": "Madrid", "lie": "Lima"},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import csv

    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    a = load_pairs_file(tmp_path / "p.jsonl", tokenizer=tiny.tokenizer)
    b = load_pairs_file(tmp_path / "p.csv", tokenizer=tiny.tokenizer)
    import datasets

    c = pairs_from_dataset(datasets.Dataset.from_list(rows), tokenizer=tiny.tokenizer)
    assert a == b == c and len(a) == 2 and a[1].truth == "Madrid"
    s = answer_set(tiny.tokenizer, a)
    assert s.truth.shape[0] == 2

    bad = rows + [{"honest": "x", "lying": "y", "truth": "Paris Rome", "lie": "Rome"}]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    assert len(load_pairs_file(tmp_path / "bad.jsonl", tokenizer=tiny.tokenizer)) == 3  # kept by default
    with pytest.raises(AnswerTokenError, match=r"bad\.jsonl, line 3: "):
        load_pairs_file(tmp_path / "bad.jsonl", tokenizer=tiny.tokenizer, on_multitoken="error")
    assert len(load_pairs_file(tmp_path / "bad.jsonl", tokenizer=tiny.tokenizer, on_multitoken="drop")) == 2
    (tmp_path / "missing.jsonl").write_text(json.dumps({"honest": "x", "truth": "Paris"}) + "\n")
    with pytest.raises(PairError, match="missing"):
        load_pairs_file(tmp_path / "missing.jsonl")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    with pytest.raises(OutputDirError, match="not writable"):
        ensure_writable_dir(blocker / "sub")
    assert blocker.read_text() == "keep me"


def _demo_answers(prompt: str, question: str) -> list[str]:
    """Every demonstration answer shown in a rendered prompt (plain-text or chat): the text after
    'A: ' on a line (the final 'A:' has none)."""
    return [line.split("A: ", 1)[1].strip() for line in prompt.splitlines() if "A: " in line]


@pytest.mark.parametrize("fmt", ["fewshot", "both"])
def test_no_copy_confound_truth_and_lie_never_in_demonstrations(fmt):
    pairs = load_builtin("all", fmt)
    assert len(pairs) > 150
    for p in pairs:
        shown = _demo_answers(p.honest, p.question) + _demo_answers(p.lying, p.question)
        assert len(shown) == 8  # 4 true demos + 4 false demos
        assert p.truth not in shown, (p.fact_id, p.truth, shown)
        assert p.lie not in shown, (p.fact_id, p.lie, shown)


def test_copy_confound_check_would_catch_a_copy():
    # The check above is not vacuous: a prompt that does show the truth is caught.
    from mechlie.core.pairs import Fact, pairs_from_facts

    demos = [Fact(f"q{i}?", a) for i, a in enumerate(["Paris", "Rome", "Lima", "Cairo", "Tokyo"])]
    with pytest.raises(PairError, match="avoid the answers"):
        # Only 2 demonstrations (Lima, Cairo) avoid Paris and Rome: fewer than the 4 shots asked.
        pairs_from_facts([Fact("target?", "Paris", "Rome")], demos[:4] + [Fact("q9?", "Paris")], n_shots=4)
    p = pairs_from_facts([Fact("target?", "Paris", "Rome")], demos + [Fact("q9?", "Madrid")], n_shots=4)[0]
    assert "Paris" not in _demo_answers(p.honest, p.question) + _demo_answers(p.lying, p.question)


def test_load_builtin_samples_not_the_first_facts():
    full = load_builtin("capitals", "fewshot")
    some = load_builtin("capitals", "fewshot", n=10)
    assert len(some) == 10 and {p.fact_id for p in some} <= {p.fact_id for p in full}
    assert [p.fact_id for p in some] != [p.fact_id for p in full[:10]]
    assert [p.fact_id for p in load_builtin("capitals", "fewshot", n=10)] == [p.fact_id for p in some]  # seeded
    assert [p.fact_id for p in load_builtin("capitals", "fewshot", n=10, seed=1)] != [p.fact_id for p in some]


def test_malformed_jsonl_names_file_and_real_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"honest": "Q: a\nA:", "lying": "Q: b\nA:", "truth": "Paris"})
    path.write_text("\n".join([good] * 3 + ["", good, '{"honest": "x", broken']) + "\n")
    with pytest.raises(PairError, match=r"pairs\.jsonl, line 6: not valid JSON"):
        load_pairs_file(path)
    with pytest.raises(PairError, match="does not exist"):
        load_pairs_file(tmp_path / "missing.jsonl")


def test_drawn_lie_never_shares_the_truths_first_token(tiny):
    from mechlie.core.pairs import Fact, pairs_from_facts

    demos = [Fact(f"q{i}?", a) for i, a in enumerate(["Tokyo", "Cairo", "Nairobi", "Havana", "Tehran", "Madrid"])]
    # Every seed would sometimes draw "Lima Peru" if the first token were not checked.
    for seed in range(20):
        (p,) = pairs_from_facts(
            [Fact("target?", "Lima Chile")],
            demos,
            "instruct",
            answers=["Lima Chile", "Lima Peru", "Rome"],
            tokenizer=tiny.tokenizer,
            seed=seed,
        )
        assert p.lie == "Rome"
    (p,) = pairs_from_facts([Fact("target?", "Lima Chile")], demos, "instruct", answers=["Lima Chile", "Lima Peru"])
    assert p.lie == "Lima Peru"  # without a tokenizer nothing is known about tokens


def test_neutral_lines_are_the_stripped_nonempty_lines():
    from importlib.resources import files

    from mechlie.core.pairs import neutral_lines

    lines = neutral_lines()
    raw = files("mechlie").joinpath("data/neutral.txt").read_text().splitlines()
    assert lines == [x.strip() for x in raw if x.strip()] and len(lines) > 100
