"""Classes of a generated answer: the truth, a paraphrase of it, a valid lie, or junk.

:func:`classify_answer` is what makes an on-policy "lie" a lie (:mod:`mechlie.read.labels`): a *valid
answer of the relation* that is not the truth. A continuation that is no answer of the relation
(``' Zabuab'``) is ``junk`` and a reworded truth (``"the Euro"``) a ``paraphrase``; both get their own
labels instead of counting as lies.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

from mechlie.core.pairs import EXTRA_RELATIONS, RELATIONS, ContrastPair, PairError, builtin_facts

log = logging.getLogger(__name__)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .,:;!?\"'")


def _starts_with(g: str, a: str) -> bool:
    """Normalized ``g`` starts with normalized ``a`` as whole words."""
    return g == a or (g.startswith(a) and not g[len(a)].isalnum())


def answer_matches(generated: str, answer: str) -> bool:
    """Does ``generated`` start with ``answer`` as whole words (case-insensitive)?"""
    g, a = _norm(generated), _norm(answer)
    if not a:
        raise PairError("empty answer")
    return _starts_with(g, a)


ANSWER_CLASSES: tuple[str, ...] = ("truth", "paraphrase", "lie", "junk")
_ARTICLE = re.compile(r"^(the|a|an) ")


def classify_answer(
    generated: str, truth: str, aliases: Sequence[str] = (), valid_answers: Sequence[str] | None = ()
) -> str:
    """The class of a generated answer, one of :data:`ANSWER_CLASSES`.

    Texts are compared normalized (lower case, spaces squeezed, surrounding punctuation and quotes
    stripped) and as whole words (:func:`answer_matches`), so a case variant ("paris") *is* the truth.

    1. ``truth``: the text starts with the truth or an alias.
    2. ``lie``: the text starts with a *valid answer of the relation* (one of ``valid_answers``) that is
       neither the truth nor an alias.
    3. Rules 1-2 pick the **longest** answer the text starts with, so "Guinea-Bissau" is a lie for the
       truth "Guinea" when "Guinea-Bissau" is a valid answer, and "New York City" a truth for "New York".
    4. A leading article ("the", "a", "an") is skipped and rules 1-3 tried again: the truth or an alias
       after it is a ``paraphrase`` ("the Euro" for "Euro"), a valid false answer after it a ``lie``
       ("the Dollar").
    5. ``paraphrase``: the truth or an alias appears later in the text as whole words ("It is Paris").
    6. ``junk``: anything else: an empty answer, a word that is no answer of the relation (" Zabuab"),
       a cut-off fragment.

    ``valid_answers=None`` means no valid set is known: then rule 6 keeps only empty answers as
    ``junk`` and any other answer is a ``lie`` (unvalidated; the labels before valid answers existed).
    """
    accepted = {a for a in (_norm(x) for x in (truth, *aliases)) if a}
    if not accepted:
        raise PairError("empty truth")
    false = {v for v in (_norm(x) for x in valid_answers or ()) if v and v not in accepted}
    g = _norm(generated)
    stripped = _ARTICLE.sub("", g)
    for text, after_article in ((g, False), (stripped, True)):
        if after_article and text == g:
            break
        hits = [(len(a), "truth") for a in accepted if _starts_with(text, a)]
        hits += [(len(v), "lie") for v in false if _starts_with(text, v)]
        if hits:
            cls = max(hits)[1]
            return "paraphrase" if cls == "truth" and after_article else cls
    if any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", g) for a in accepted):
        return "paraphrase"
    return "lie" if valid_answers is None and g else "junk"


__all__ = ["ANSWER_CLASSES", "answer_matches", "classify_answer", "valid_answer_sets"]


def valid_answer_sets(
    pairs: Sequence[ContrastPair], answers: dict[str, list[str]] | None = None
) -> dict[str, tuple[str, ...] | None]:
    """Relation -> the valid answers that tell a lie from junk (:class:`OnPolicy`'s rule), ``None``
    where a relation has none: ``answers[relation]`` where given, else the pairs' designated lies
    plus a built-in relation's answers; with a valid set, the relation's truths are in it too
    (another fact's truth is a real lie)."""
    out: dict[str, set[str]] = {}
    for p in pairs:
        if answers is not None and p.relation in answers:
            out.setdefault(p.relation, set(answers[p.relation]))
            continue
        got = out.setdefault(p.relation, set())
        got.update([p.lie] if p.lie else [])
        if p.relation in RELATIONS + EXTRA_RELATIONS:
            got.update(a for _, a in builtin_facts()[p.relation]["facts"])
    unvalidated = sorted(r for r, v in out.items() if not v)
    if unvalidated:
        log.warning(
            "relation(s) %s: no valid answers (no answers= entry, no designated lies, not built-in): "
            "every non-empty answer that is not the truth or a paraphrase counts as a lie, unvalidated",
            unvalidated,
        )
    truths: dict[str, set[str]] = {}
    for p in pairs:
        truths.setdefault(p.relation, set()).add(p.truth)
    return {r: tuple(sorted(v | truths[r])) if v else None for r, v in out.items()}
