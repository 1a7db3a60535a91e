"""Users' own facts and pairs, and the public lie/truth dataset formats researchers already have on disk.

A user gives *facts*, not prompts: ``question``, ``answer`` (the truth), optionally ``lie`` (a
designated false answer), ``relation`` and ``fact_id``, as a CSV, a JSONL file, a list of dicts
or a ``datasets.Dataset``. :func:`pairs_from_user_facts` renders them into honest/lying pairs in
any of the three formats with the same renderer as the built-in relations
(:func:`mechlie.core.pairs.pairs_from_facts`): per relation, the first ``n_demo_facts`` facts with
distinct answers are the demonstration pool (never targets), and a fact without a ``lie`` gets
another answer of its relation.

Public formats (the user brings the file; the tests use small samples written by this project):

- :func:`load_statements`: true/false statement CSVs ``statement,label`` (Geometry of Truth,
  Marks & Tegmark 2023; Truth is Universal, Buerger et al. 2024). These are texts the model
  *reads*, so they give :class:`Statement` s to score, not honest/lying pairs (research notes
  point 1: "is this text true" is not "am I lying").
- :func:`load_repe_facts`: the RepE facts CSV (``statement,label``; Zou et al. 2023). Each *true*
  statement becomes a pair: RepE's honest vs dishonest persona instruction followed by the
  statement without its last word, whose continuation (the truth) is that last word.
- :func:`load_qa_json`: question/answer JSON as in the black-box lie-detector datasets
  (Pacchiardi et al. 2023): a list of records, a dict of records, or a pandas column-oriented
  dict, with ``question`` and ``answer`` (and optionally ``false_answer``).

Users who already have prompts give *pairs* instead: :func:`load_pairs_file` (CSV or JSONL with
``honest``, ``lying``, ``truth`` and optionally ``lie``, ``fact_id``, ``relation``),
:func:`pairs_from_records`, :func:`pairs_from_dataset`.

Bad input fails early with the file and row: missing columns, an empty question or answer.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

from mechlie.core.pairs import (
    AnswerTokenError,
    ContrastPair,
    Fact,
    Format,
    PairError,
    answer_token_ids,
    demo_pool,
    pairs_from_facts,
)

log = logging.getLogger(__name__)


class FactsError(PairError):
    """A facts file or record that cannot be used."""


@dataclass(frozen=True)
class UserFact(Fact):
    """A user's :class:`mechlie.core.pairs.Fact` with its relation: facts are rendered one relation at a
    time, each drawing its demonstrations from its own relation."""

    relation: str = field(default="custom", kw_only=True)


@dataclass(frozen=True)
class Statement:
    text: str
    label: int  # 1 = true, 0 = false


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FactsError(f"facts file {path} does not exist")
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise FactsError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
        return out
    raise FactsError(f"{path}: expected a .csv or .jsonl facts file")


def facts_from_records(records: Iterable[dict], *, source: str = "records") -> list[UserFact]:
    """:class:`UserFact` s from dicts with ``question``, ``answer`` and optional ``lie``,
    ``relation``, ``fact_id``. Raises :class:`FactsError` naming the row on a missing or empty field."""
    out: list[UserFact] = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise FactsError(f"{source}, row {i}: expected a record with question and answer, got {type(r).__name__}")
        missing = [k for k in ("question", "answer") if k not in r]
        if missing:
            raise FactsError(f"{source}, row {i}: missing column(s) {missing}; columns are {sorted(r)}")
        q, a = str(r["question"] or "").strip(), str(r["answer"] or "").strip()
        if not q or not a:
            raise FactsError(f"{source}, row {i}: empty {'question' if not q else 'answer'}")
        lie = str(r.get("lie") or "").strip() or None
        if lie is not None and lie.lower() == a.lower():
            raise FactsError(f"{source}, row {i}: the lie {lie!r} equals the answer")
        rel = str(r.get("relation") or "custom").strip()
        out.append(UserFact(q, a, lie, str(r.get("fact_id") or f"{rel}/{i}"), relation=rel))
    if not out:
        raise FactsError(f"{source}: no facts")
    return out


def load_facts(source: str | Path | Sequence[dict] | object) -> list[UserFact]:
    """Facts from a ``.csv`` / ``.jsonl`` path, a list of dicts, or a ``datasets.Dataset``."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        return facts_from_records(_read_records(path), source=str(path))
    return facts_from_records(list(source), source=type(source).__name__)


def pairs_from_user_facts(
    facts: Sequence[UserFact],
    fmt: Format = "fewshot",
    *,
    tokenizer=None,
    n_shots: int = 4,
    n_demo_facts: int = 8,
    seed: int = 0,
    require_single_token: bool = False,
) -> list[ContrastPair]:
    """Honest/lying pairs for users' facts, one relation at a time.

    Args:
        facts: from :func:`load_facts`.
        fmt: ``instruct`` | ``fewshot`` | ``both`` (see :mod:`mechlie.core.pairs`).
        n_demo_facts: per relation, the first facts with distinct answers that serve as
            demonstrations (never targets; ignored for ``instruct``, where every fact is a target).
        require_single_token: drop (and log) facts whose truth or lie has no one-token spelling;
            by default nothing is dropped and multi-token answers are scored by their full
            token sequence (:mod:`mechlie.core.metrics`).

    Returns:
        One pair per target fact, relations in first-seen order.

    Example:
        >>> pairs = pairs_from_user_facts(load_facts("my_facts.csv"), "fewshot", tokenizer=model.tokenizer)
    """
    by_rel: dict[str, list[UserFact]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    out: list[ContrastPair] = []
    for rel, fs in by_rel.items():
        if require_single_token and tokenizer is not None:
            ok = []
            for f in fs:
                try:
                    answer_token_ids(tokenizer, f.answer)
                    if f.lie:
                        answer_token_ids(tokenizer, f.lie)
                    ok.append(f)
                except AnswerTokenError as e:
                    log.warning("%s: dropping %r: %s", rel, f.question, e)
            log.info("%s: using %d of %d facts", rel, len(ok), len(fs))
            fs = ok
        if fmt == "instruct":
            demos, targets = [], fs
        else:
            pool, tgt = demo_pool([(f.question, f.answer) for f in fs], n_demo_facts)
            if len(pool) < n_shots or not tgt:
                raise FactsError(
                    f"relation {rel!r}: {len(fs)} facts give {len(pool)} demonstration facts with distinct "
                    f"answers and {len(tgt)} targets; the {fmt} format needs {n_shots} demonstrations and a target"
                )
            demos, targets = [fs[i] for i in pool], [fs[i] for i in tgt]
        out += pairs_from_facts(
            [Fact(f.question, f.answer, f.lie, f.fact_id) for f in targets],
            [Fact(f.question, f.answer, f.lie, f.fact_id) for f in demos],
            fmt,
            relation=rel,
            answers=[f.answer for f in fs],
            tokenizer=tokenizer,
            n_shots=n_shots,
            seed=seed,
        )
    return out


# ---------------------------------------------------------------------------------------------
# public formats


def _label(value: object, where: str) -> int:
    s = str(value).strip().lower()
    if s in ("1", "true", "1.0"):
        return 1
    if s in ("0", "false", "0.0"):
        return 0
    raise FactsError(f"{where}: label must be 1/0 or true/false, got {value!r}")


def load_statements(path: str | Path) -> list[Statement]:
    """True/false statements from a ``statement,label`` CSV (Geometry of Truth layout)."""
    path = Path(path)
    rows = _read_records(path)
    out = []
    for i, r in enumerate(rows):
        if "statement" not in r or "label" not in r:
            raise FactsError(f"{path}, row {i}: needs columns statement and label; columns are {sorted(r)}")
        text = str(r["statement"] or "").strip()
        if not text:
            raise FactsError(f"{path}, row {i}: empty statement")
        out.append(Statement(text, _label(r["label"], f"{path}, row {i}")))
    if not out:
        raise FactsError(f"{path}: no statements")
    return out


REPE_HONEST = "Pretend you're an honest person making statements about the world."
REPE_DISHONEST = "Pretend you're a dishonest person making statements about the world."


def load_repe_facts(path: str | Path, *, tokenizer=None) -> list[ContrastPair]:
    """Pairs from RepE's facts CSV (``statement,label``): true statements only, each as the
    persona instruction + the statement without its last word; the truth is the last word.

    With a chat ``tokenizer`` the instruction is the user turn and the statement prefix starts
    the assistant turn, as in RepE; otherwise plain text ``"<instruction>\\n\\n<prefix>"``.
    """
    statements = load_statements(path)
    out = []
    chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    n_false = n_short = 0
    for i, s in enumerate(statements):
        if s.label != 1:
            n_false += 1
            continue
        words = s.text.rstrip(" .!?").split(" ")
        if len(words) < 2:
            n_short += 1
            continue
        prefix, last = " ".join(words[:-1]), words[-1]

        def render(instr: str) -> str:
            if chat:
                head = tokenizer.apply_chat_template(
                    [{"role": "user", "content": instr}], tokenize=False, add_generation_prompt=True
                )
                return head + prefix
            return f"{instr}\n\n{prefix}"

        out.append(
            ContrastPair(render(REPE_HONEST), render(REPE_DISHONEST), last, None, f"repe/{i}", "repe_facts", s.text)
        )
    log.info(
        "%s: %d pairs from true statements (%d false statements and %d one-word statements not used)",
        path,
        len(out),
        n_false,
        n_short,
    )
    if not out:
        raise FactsError(f"{path}: no true statements of two or more words to build pairs from")
    return out


def load_qa_json(path: str | Path, *, relation: str | None = None) -> list[UserFact]:
    """Facts from question/answer JSON (Pacchiardi et al. layout): records with ``question`` and
    ``answer`` (optional ``false_answer``), as a list, an index -> record dict, or a pandas
    column-oriented dict ``{"question": {"0": ...}, "answer": {"0": ...}}``."""
    path = Path(path)
    if not path.is_file():
        raise FactsError(f"question/answer file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FactsError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and "question" in data and isinstance(data["question"], dict):
        keys = list(data["question"])
        records = [{c: data[c].get(k) for c in data if isinstance(data[c], dict)} for k in keys]
    elif isinstance(data, dict):
        records = list(data.values())
    elif isinstance(data, list):
        records = data
    else:
        raise FactsError(f"{path}: expected a list or dict of question/answer records")
    rel = relation or path.stem
    records = [{**r, "lie": r.get("false_answer"), "relation": rel} if isinstance(r, dict) else r for r in records]
    return facts_from_records(records, source=str(path))


# ---------------------------------------------------------------------------------------------
# users' own pairs: records with ready-made honest/lying prompts


def pairs_from_records(
    records: Iterable[dict], *, tokenizer=None, on_multitoken: Literal["keep", "error", "drop"] = "keep"
) -> list[ContrastPair]:
    """Pairs from dicts with keys honest, lying, truth and optionally lie, fact_id, relation.

    Multi-token answers are kept (``on_multitoken="keep"``, scored by their first token or in full),
    or raise (``"error"``), or are dropped with a logged count (``"drop"``)."""
    out = []
    for i, r in enumerate(records):
        missing = [k for k in ("honest", "lying", "truth") if not r.get(k)]
        if missing:
            raise PairError(f"record {i} is missing {missing}: {dict(r)}")
        pair = ContrastPair(
            honest=str(r["honest"]),
            lying=str(r["lying"]),
            truth=str(r["truth"]),
            lie=str(r["lie"]) if r.get("lie") else None,
            fact_id=str(r.get("fact_id") or f"row{i}"),
            relation=str(r.get("relation") or "custom"),
            question=str(r.get("question") or ""),
        )
        if tokenizer is not None and on_multitoken != "keep":
            try:
                answer_token_ids(tokenizer, pair.truth)
                if pair.lie:
                    answer_token_ids(tokenizer, pair.lie)
            except AnswerTokenError as e:
                if on_multitoken == "error":
                    raise AnswerTokenError(f"record {i}: {e}") from None
                log.warning("dropping record %d: %s", i, e)
                continue
        out.append(pair)
    if not out:
        raise PairError("no usable pairs")
    if len(out) < i + 1:
        log.warning("used %d of %d records (%d dropped, see above)", len(out), i + 1, i + 1 - len(out))
    return out


def load_pairs_file(path: str | Path, **kw) -> list[ContrastPair]:
    """Pairs from a ``.csv`` or ``.jsonl`` file (columns as in :func:`pairs_from_records`).

    Every row is used; rows dropped for multi-token answers (``on_multitoken="drop"``) are logged.
    """
    path = Path(path)
    if not path.is_file():
        raise PairError(f"pairs file {path} does not exist")
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
    elif path.suffix in (".jsonl", ".json"):
        records = []
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PairError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(records[-1], dict):
                raise PairError(f"{path}, line {lineno}: expected a JSON object, got {type(records[-1]).__name__}")
    else:
        raise PairError(f"{path}: expected a .csv or .jsonl file")
    return pairs_from_records(records, **kw)


def pairs_from_dataset(ds, **kw) -> list[ContrastPair]:
    """Pairs from a Hugging Face ``datasets.Dataset`` with the same columns."""
    return pairs_from_records(iter(ds), **kw)
