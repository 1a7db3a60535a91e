"""Word-level contrast pairs for the conftest's tiny tokenizer (steering and edit tests)."""

from __future__ import annotations

from mechlie.core.pairs import ContrastPair

COUNTRIES = [
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Japan", "Tokyo"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Cuba", "Havana"),
    ("Iran", "Tehran"),
]


def word_pairs() -> list[ContrastPair]:
    """Few-shot pairs: four demonstrations answered truly (honest) or falsely (lying), then a question."""

    def q(c: str) -> str:
        return f"What is the capital of {c} ?"

    demos = COUNTRIES[:4]
    out = []
    for i, (c, cap) in enumerate(COUNTRIES[4:]):
        false = [COUNTRIES[(j + 1) % 4][1] for j in range(4)]
        h = "\n\n".join([f"Q: {q(x)}\nA: {y}" for x, y in demos] + [f"Q: {q(c)}\nA:"])
        lie = "\n\n".join([f"Q: {q(x)}\nA: {f}" for (x, _), f in zip(demos, false)] + [f"Q: {q(c)}\nA:"])
        out.append(
            ContrastPair(
                h, lie, cap, COUNTRIES[4 + (i + 1) % 6][1], fact_id=f"custom/{c}", relation="custom", question=q(c)
            )
        )
    return out
