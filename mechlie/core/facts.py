"""Users' own facts and pairs, and the public lie/truth dataset formats researchers already have on disk.

A user gives *facts*, not prompts: ``question``, ``answer`` (the truth), optionally ``lie`` (a
designated false answer), ``relation`` and ``fact_id``, as a CSV, a JSONL file, a list of dicts
or a ``datasets.Dataset``. :func:`pairs_from_user_facts` renders them into honest/lying pairs in
any of the three formats with the same renderer as the built-in relations
(:func:`mechlie.core.pairs.pairs_from_facts`): per relation, the first ``n_demo_facts`` facts with
distinct answers are the demonstration pool (never targets; how many is logged), or, with
``demonstrations="loo"``, every fact is a target and draws its demonstrations from the others; a
fact without a ``lie`` gets another answer of its relation.

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

Files are read as UTF-8 (a byte-order mark, as Excel writes, is skipped), their suffix in any case
(``.CSV``, ``.JSONL``). Bad input fails early with one line naming the file, the 1-based line (a list of
records: ``record N``, also 1-based) and the field: a byte that is not UTF-8, invalid JSON, missing
columns, an empty question or answer, a lie equal to the truth, or a field of the wrong type (a list or
dict is never turned into its repr). Records repeated without a ``fact_id`` share the first copy's id
(logged), so that a split by fact never puts identical prompts on both sides.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

from mechlie.core.pairs import (
    FORMATS,
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


def read_text(path: Path, error: type[PairError] = PairError) -> str:
    """``path`` decoded as UTF-8, a leading byte-order mark skipped (as Excel writes CSVs). A byte that is
    not UTF-8 raises ``error`` naming the file and its 1-based line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        col = e.start - data.rfind(b"\n", 0, e.start)
        raise error(
            f"{path}, line {line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {col}); save the file as UTF-8"
        ) from None


def read_rows(
    path: Path, error: type[PairError] = PairError, kind: str = "facts", *, json_lines: tuple[str, ...] = (".jsonl",)
) -> list[tuple[int, dict]]:
    """``(1-based line, record)`` for each record of a ``.csv`` (header row first) or a JSON-lines file
    (suffixes ``json_lines``), the suffix in any case (``facts.CSV`` as Windows tools write it). A CSV
    record's line is the line it ends on."""
    if path.is_dir():
        raise error(f"{kind} file {path} is a directory; give a .csv or .jsonl file")
    if not path.is_file():
        raise error(f"{kind} file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path, error), newline=""))
        header = reader.fieldnames or []
        if repeated := sorted({c for c in header if header.count(c) > 1}):
            raise error(f"{path}, line 1: column(s) {repeated} appear more than once in the header")
        rows = []
        for r in reader:
            # DictReader files extra values under None and fills missing ones with None: a shifted row.
            if None in r or any(v is None for v in r.values()):
                n = len(header) + len(r.get(None) or []) - sum(v is None for k, v in r.items() if k is not None)
                raise error(
                    f"{path}, line {reader.line_num}: {n} values for {len(header)} columns "
                    "(an unquoted comma, or a missing value?); quote fields that hold commas"
                )
            rows.append((reader.line_num, r))
        return rows
    if suffix not in json_lines:
        raise error(f"{path}: expected a .csv or .jsonl {kind} file")
    out = []
    # Universal newlines, as Path.read_text reads; str.splitlines would also split a string at U+2028 and such.
    text = read_text(path, error).replace("\r\n", "\n").replace("\r", "\n")
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise error(f"{path}, line {lineno}: expected a JSON object, got {type(rec).__name__}")
        out.append((lineno, rec))
    return out


def _where(source: str, lines: Sequence[int] | None, i: int) -> str:
    """A record's place: the file and its 1-based line, or ``record N`` (1-based, as lines are; list index
    ``N - 1``) in memory."""
    return f"{source}, line {lines[i]}" if lines is not None else f"{source}, record {i + 1}"


def record_field(
    r: dict, key: str, where: str, error: type[PairError], *, number_ok: bool = False, required: bool = False
) -> str | None:
    """The text of field ``key`` of record ``r``: ``None`` when absent or empty (or ``error`` if
    ``required``). Only a string (or, with ``number_ok``, an int or float) is accepted: a list, dict or
    bool would be turned into its Python repr and scored as text, so it raises ``error`` naming the field."""
    v = r.get(key)
    # Empty, 0 and 0.0 count as absent, as they always have (a fact id 0 has always been the row's own id).
    if v is None or (not isinstance(v, bool) and isinstance(v, (str, int, float)) and not v):
        if required:
            hint = " (the file starts with a byte-order mark: save it as UTF-8 without BOM)" if _bom(r) else ""
            raise error(f"{where}: missing or empty field {key!r}; fields are {sorted(map(str, r))}{hint}")
        return None
    ok = (str, int, float) if number_ok else (str,)
    if isinstance(v, bool) or not isinstance(v, ok):
        want = "a string or a number" if number_ok else "a string"
        raise error(f"{where}: field {key!r} must be {want}, got {type(v).__name__} {_short(v)}")
    if isinstance(v, float) and not math.isfinite(v):  # JSON's NaN/Infinity: a missing value, never an answer
        raise error(f"{where}: field {key!r} is {v!r} (a missing value in the data?); give a string")
    return str(v)


def _bom(r: dict) -> bool:
    return any(isinstance(k, str) and k.startswith("\ufeff") for k in r)


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def facts_from_records(
    records: Iterable[dict], *, source: str = "records", lines: Sequence[int] | None = None
) -> list[UserFact]:
    """:class:`UserFact` s from dicts with ``question``, ``answer`` and optional ``lie``,
    ``relation``, ``fact_id``.

    Raises :class:`FactsError` naming the record (``lines``: each record's 1-based line in
    ``source``; else ``record N``, 1-based) on a missing or empty field, or a field of the wrong type
    (a question must be a string; an answer, lie, relation or fact id a string or a number).
    A record repeating an earlier one's relation, question and answer, without a ``fact_id``,
    gets the earlier one's id (logged), so that no split puts the copies on both sides.
    """
    out: list[UserFact] = []
    first: dict[tuple[str, str, str], tuple[str, str]] = {}  # content -> (fact id, where)
    repeats: list[str] = []
    for i, r in enumerate(records):
        where = _where(source, lines, i)
        if not isinstance(r, dict):
            raise FactsError(f"{where}: expected a record with question and answer, got {type(r).__name__}")
        missing = [k for k in ("question", "answer") if k not in r]
        if missing:
            raise FactsError(f"{where}: missing column(s) {missing}; columns are {sorted(map(str, r))}")
        q = (record_field(r, "question", where, FactsError) or "").strip()
        a = (record_field(r, "answer", where, FactsError, number_ok=True) or "").strip()
        if not q or not a:
            raise FactsError(f"{where}: empty {'question' if not q else 'answer'}")
        lie = (record_field(r, "lie", where, FactsError, number_ok=True) or "").strip() or None
        if lie is not None and lie.lower() == a.lower():
            raise FactsError(f"{where}: the lie {lie!r} equals the answer")
        rel = (record_field(r, "relation", where, FactsError, number_ok=True) or "custom").strip()
        fid = record_field(r, "fact_id", where, FactsError, number_ok=True)
        if fid is None:
            fid, seen = first.setdefault((rel, q, a), (f"{rel}/{i}", where))
            if seen != where:
                repeats.append(f"{where.removeprefix(source + ', ')} repeats {seen.removeprefix(source + ', ')}")
        out.append(UserFact(q, a, lie, fid, relation=rel))
    if not out:
        raise FactsError(f"{source}: no facts")
    _log_repeats(source, repeats, "relation, question and answer")
    return out


def _log_repeats(source: str, repeats: list[str], what: str) -> None:
    if repeats:
        shown = "; ".join(repeats[:5]) + (f"; and {len(repeats) - 5} more" if len(repeats) > 5 else "")
        log.warning(
            "%s: %d record(s) repeat the %s of an earlier one and have no fact_id (%s): each copy gets the "
            "fact id of its first, so train/test splits keep copies together",
            source,
            len(repeats),
            what,
            shown,
        )


def load_facts(source: str | Path | Sequence[dict] | object) -> list[UserFact]:
    """Facts from a ``.csv`` / ``.jsonl`` path, a list of dicts, or a ``datasets.Dataset``."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        rows = read_rows(path, FactsError)
        return facts_from_records([r for _, r in rows], source=str(path), lines=[n for n, _ in rows])
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
    demonstrations: Literal["pool", "loo"] = "pool",
) -> list[ContrastPair]:
    """Honest/lying pairs for users' facts, one relation at a time.

    Args:
        facts: from :func:`load_facts`.
        fmt: ``instruct`` | ``fewshot`` | ``both`` (see :mod:`mechlie.core.pairs`).
        n_demo_facts: per relation, the first facts with distinct answers that serve as
            demonstrations with ``demonstrations="pool"`` (ignored for ``instruct``, where every fact is a target).
        demonstrations: where the ``fewshot`` / ``both`` demonstrations come from.
            ``"pool"`` (the default, as every committed result used): the ``n_demo_facts`` pool, whose
            facts are never targets, so no fact is both a demonstration and a target and a train/test
            split by fact is clean; the pool's facts give no pair (logged per relation).
            ``"loo"``: leave one out within the relation: every fact is a target and its
            demonstrations are drawn from the relation's other facts (still never showing its truth or
            lie), so no fact is lost, but a test fact may appear as a demonstration in a train prompt.
        require_single_token: drop (and log) facts whose truth or lie has no one-token spelling;
            by default nothing is dropped and multi-token answers are scored by their full
            token sequence (:mod:`mechlie.core.metrics`).

    Returns:
        One pair per target fact, relations in first-seen order.

    Example:
        >>> pairs = pairs_from_user_facts(load_facts("my_facts.csv"), "fewshot", tokenizer=model.tokenizer)
    """
    if demonstrations not in ("pool", "loo"):
        raise FactsError(f"demonstrations must be 'pool' or 'loo', got {demonstrations!r}")
    if fmt not in FORMATS:  # before any count of demonstrations, which would name the bad format as real
        raise FactsError(f"unknown format {fmt!r}; formats: {FORMATS}")
    by_rel: dict[str, list[UserFact]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    out: list[ContrastPair] = []
    demo_only: dict[str, int] = {}
    for rel, fs in by_rel.items():
        if require_single_token and tokenizer is not None:
            fs = _single_token_facts(rel, fs, tokenizer)
        if fmt == "instruct":
            demos, targets = [], fs
        elif demonstrations == "loo":
            demos, targets = fs, fs  # pairs_from_facts never shows a target its own question or answers
        else:
            pool, tgt = demo_pool([(f.question, f.answer) for f in fs], n_demo_facts)
            if len(pool) < n_shots or not tgt:
                raise FactsError(
                    f"relation {rel!r}: {len(fs)} facts give {len(pool)} demonstration facts with distinct "
                    f"answers and {len(tgt)} targets; the {fmt} format needs {n_shots} demonstrations and a target"
                )
            demos, targets = [fs[i] for i in pool], [fs[i] for i in tgt]
            demo_only[rel] = len(pool)
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
    if demo_only:
        log.warning(
            "%s format: %d of %d facts are used only as demonstrations, never as targets (%s); "
            "demonstrations='loo' makes every fact a target",
            fmt,
            sum(demo_only.values()),
            sum(len(fs) for fs in by_rel.values()),
            ", ".join(f"{rel}: {n}" for rel, n in demo_only.items()),
        )
    return out


def _single_token_facts(rel: str, fs: list[UserFact], tokenizer) -> list[UserFact]:
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
    return ok


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
    out = []
    for line, r in read_rows(path, FactsError, "statements"):
        where = f"{path}, line {line}"
        if "statement" not in r or "label" not in r:
            raise FactsError(f"{where}: needs columns statement and label; columns are {sorted(map(str, r))}")
        text = (record_field(r, "statement", where, FactsError) or "").strip()
        if not text:
            raise FactsError(f"{where}: empty statement")
        out.append(Statement(text, _label(r["label"], where)))
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
        data = json.loads(read_text(path, FactsError))
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
    records: Iterable[dict],
    *,
    tokenizer=None,
    on_multitoken: Literal["keep", "error", "drop"] = "keep",
    source: str = "records",
    lines: Sequence[int] | None = None,
) -> list[ContrastPair]:
    """Pairs from dicts with keys honest, lying, truth and optionally lie, fact_id, relation, question.

    Prompts and the question must be strings; truth, lie, fact_id and relation strings or numbers;
    anything else raises :class:`PairError` naming the record (``lines``: each record's 1-based line
    in ``source``; else ``record N``, 1-based) and the field, as does a record whose lie equals its truth
    or whose honest and lying prompts are identical. A record without a ``fact_id`` is
    ``row<i>``, unless it repeats the honest and lying prompts of an earlier one: then it shares that
    one's id (logged), so that no split puts identical prompts on both sides.

    Multi-token answers are kept (``on_multitoken="keep"``, scored by their first token or in full),
    or raise (``"error"``), or are dropped with a logged count (``"drop"``)."""
    out = []
    first: dict[tuple[str, str], tuple[str, str]] = {}  # prompts -> (fact id, where)
    repeats: list[str] = []
    n = 0
    for i, r in enumerate(records):
        n += 1
        where = _where(source, lines, i)
        if not isinstance(r, dict):
            raise PairError(f"{where}: expected a record with honest, lying and truth, got {type(r).__name__}")
        honest, lying = (record_field(r, k, where, PairError, required=True) for k in ("honest", "lying"))
        truth = record_field(r, "truth", where, PairError, number_ok=True, required=True)
        lie = record_field(r, "lie", where, PairError, number_ok=True)
        fid = record_field(r, "fact_id", where, PairError, number_ok=True)
        if fid is None:
            fid, seen = first.setdefault((honest, lying), (f"row{i}", where))
            if seen != where:
                repeats.append(f"{where.removeprefix(source + ', ')} repeats {seen.removeprefix(source + ', ')}")
        pair = _record_pair(
            where,
            honest=honest,
            lying=lying,
            truth=truth,
            lie=lie,
            fact_id=fid,
            relation=record_field(r, "relation", where, PairError, number_ok=True) or "custom",
            question=record_field(r, "question", where, PairError) or "",
        )
        if tokenizer is not None and on_multitoken != "keep":
            try:
                answer_token_ids(tokenizer, pair.truth)
                if pair.lie:
                    answer_token_ids(tokenizer, pair.lie)
            except AnswerTokenError as e:
                if on_multitoken == "error":
                    raise AnswerTokenError(f"{where}: {e}") from None
                log.warning("dropping %s: %s", where, e)
                continue
        out.append(pair)
    if not out:
        raise PairError(f"{source}: no usable pairs")
    _log_repeats(source, repeats, "honest and lying prompts")
    if len(out) < n:
        log.warning("used %d of %d records (%d dropped, see above)", len(out), n, n - len(out))
    return out


def _record_pair(where: str, **fields) -> ContrastPair:
    """The record's :class:`ContrastPair`; a pair it refuses (lie equals truth, identical prompts, a blank
    truth) raises :class:`PairError` naming ``where`` (the file and line), not only the pair's fact id."""
    lie, truth = fields["lie"], fields["truth"]
    if lie is not None and not lie.strip():
        raise PairError(f"{where}: field 'lie' is blank; give a false answer or leave the field out")
    if lie is not None and lie.strip().casefold() == truth.strip().casefold():  # ContrastPair's rule, named
        case = "" if lie.strip() == truth.strip() else " apart from case"
        raise PairError(f"{where}: field 'lie' equals field 'truth'{case} ({truth.strip()!r}); give a false answer")
    if fields["honest"] == fields["lying"]:
        raise PairError(f"{where}: fields 'honest' and 'lying' are the same prompt")
    try:
        return ContrastPair(**fields)
    except PairError as e:
        raise type(e)(f"{where}: {e}") from None


def load_pairs_file(path: str | Path, **kw) -> list[ContrastPair]:
    """Pairs from a ``.csv`` or ``.jsonl`` file (columns as in :func:`pairs_from_records`), read as
    UTF-8 (a byte-order mark is skipped); errors name the file and the 1-based line.

    Every row is used; rows dropped for multi-token answers (``on_multitoken="drop"``) are logged.
    """
    path = Path(path)
    rows = read_rows(path, PairError, "pairs", json_lines=(".jsonl", ".json"))
    return pairs_from_records([r for _, r in rows], source=str(path), lines=[n for n, _ in rows], **kw)


def pairs_from_dataset(ds, **kw) -> list[ContrastPair]:
    """Pairs from a Hugging Face ``datasets.Dataset`` with the same columns."""
    return pairs_from_records(iter(ds), **kw)
