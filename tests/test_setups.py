from dataclasses import dataclass, field

import pytest

from mechlie.core.facts import UserFact
from mechlie.core.pairs import ContrastPair, PairError, fewshot_demos
from mechlie.core.setups import SETUPS, all_setup_pairs, builtin_setup_facts, get_template, setup_pairs

CHAT = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@dataclass(frozen=True)
class AliasFact(UserFact):
    aliases: tuple[str, ...] = field(default=(), kw_only=True)


@pytest.fixture(scope="module")
def builtin():
    facts, answers = builtin_setup_facts(("capitals", "languages"))
    # A seeded sample keeps the test fast; every relation keeps enough facts for leave-one-out demos.
    return facts[::4], answers


def _strip_framing(pair: ContrastPair) -> tuple[str, str]:
    """The two prompts with their framing removed: equal iff they differ only in the framing."""
    tpl = get_template(pair.setup, pair.template)
    if tpl.where == "demos":
        q, a = tpl.labels
        keep = lambda p: "\n".join(l for l in p.splitlines() if not l.startswith(a + " "))  # noqa: E731
        return keep(pair.honest), keep(pair.lying)
    return pair.honest.replace(tpl.honest.format(lie=pair.lie), "<F>"), pair.lying.replace(
        tpl.lying.format(lie=pair.lie), "<F>"
    )


def test_every_setup_has_at_least_two_distinct_templates():
    assert set(SETUPS) == {"fewshot", "instructed", "roleplay", "sycophancy"}
    for setup, names in SETUPS.items():
        assert len(names) >= 2
        tpls = [get_template(setup, n) for n in names]
        assert len({(t.honest, t.lying, t.labels) for t in tpls}) == len(tpls)
        for t in tpls:
            assert t.honest != t.lying or t.where == "demos"


@pytest.mark.parametrize("chat", [False, True])
def test_prompts_differ_only_in_framing_and_every_fact_is_a_target(tiny, builtin, chat):
    facts, answers = builtin
    tok = tiny.tokenizer
    tok.chat_template = CHAT if chat else None
    for setup, names in SETUPS.items():
        for name in names:
            pairs = setup_pairs(facts, setup, name, tok, answers=answers)
            assert [p.fact_id for p in pairs] == [f.fact_id for f in facts]  # every fact a target, in order
            for p, f in zip(pairs, facts):
                assert (p.setup, p.template, p.question, p.truth) == (setup, name, f.question, f.answer)
                assert p.honest != p.lying
                h, l = _strip_framing(p)
                assert h == l, (setup, name)
                label = get_template(setup, name).labels[1]
                assert p.honest.endswith(label) and p.lying.endswith(label)
                assert p.lie in answers[f.relation] and p.lie != p.truth
                # Chat only where the setup is not few-shot (today's few-shot is always plain text).
                assert ("<system>" in p.honest or "<user>" in p.honest) == (chat and setup != "fewshot")
                if setup == "sycophancy":
                    # The user asserts the lie; the honest opener names no answer (the question may).
                    h_open, l_open = (x.replace(p.question, "") for x in (p.honest, p.lying))
                    assert p.lie in l_open and p.lie not in h_open and p.truth not in h_open


def test_fewshot_demos_are_leave_one_out_and_show_no_copyable_answer(builtin):
    facts, answers = builtin
    pairs = setup_pairs(facts, "fewshot", "qa", None, answers=answers, n_shots=3)
    questions = {f.question: f for f in facts}
    for p in pairs:
        h, q = fewshot_demos(p.honest)
        l, q2 = fewshot_demos(p.lying)
        assert q == q2 == p.question and len(h) == 3
        assert [d[0] for d in h] == [d[0] for d in l]
        for (dq, true), (_, false) in zip(h, l):
            demo = questions[dq]
            assert demo.relation == p.relation and dq != p.question  # same relation, another fact
            assert true == demo.answer and false != demo.answer and false in answers[p.relation]
            assert {true, false}.isdisjoint({p.truth, p.lie})  # no copy confound
    # The same demonstrations for both few-shot templates.
    other = setup_pairs(facts, "fewshot", "question_answer", None, answers=answers, n_shots=3)
    assert [p.lying.replace("Question:", "Q:").replace("Answer:", "A:") for p in other] == [p.lying for p in pairs]


def test_lie_never_an_alias_and_aliases_kept():
    facts = [
        AliasFact(f"What is the capital of {c}?", a, None, f"c/{c}", relation="caps", aliases=al)
        for c, a, al in [
            ("Netherlands", "Amsterdam", ("amsterdam", "The Hague")),
            ("Bolivia", "Sucre", ("La Paz",)),
            ("France", "Paris", ()),
            ("Peru", "Lima", ()),
            ("Chile", "Santiago", ()),
            ("Cuba", "Havana", ()),
        ]
    ]
    answers = {"caps": ["Amsterdam", "the Hague", "La Paz", "Sucre", "Paris", "Lima", "Santiago", "Havana"]}
    for seed in range(30):
        for setup in SETUPS:
            for p in setup_pairs(facts, setup, SETUPS[setup][0], None, answers=answers, n_shots=2, seed=seed):
                accepted = {p.truth.lower(), *(a.lower().removeprefix("the ") for a in p.aliases)}
                assert p.lie.lower().removeprefix("the ") not in accepted
                if setup == "fewshot":  # a false demonstration never shows an alias of its own truth
                    for (dq, _), (_, false) in zip(*(fewshot_demos(x)[0] for x in (p.honest, p.lying))):
                        demo = next(f for f in facts if f.question == dq)
                        assert false.lower().removeprefix("the ") not in {
                            demo.answer.lower(),
                            *(a.lower().removeprefix("the ") for a in demo.aliases),
                        }
    p = setup_pairs(facts, "instructed", "quiz", None, answers=answers)[0]
    assert p.aliases == ("amsterdam", "The Hague")
    with pytest.raises(PairError, match="alias"):
        ContrastPair("h", "l", "Amsterdam", "The Hague", aliases=("The Hague",))


def test_deterministic_under_seed_and_same_lie_across_setups(builtin):
    facts, answers = builtin
    a = all_setup_pairs(facts, None, answers=answers, seed=3)
    b = all_setup_pairs(facts, None, answers=answers, seed=3)
    c = all_setup_pairs(facts, None, answers=answers, seed=4)
    assert a == b
    assert [p.lie for p in a] != [p.lie for p in c]
    by_fact: dict[str, set] = {}
    for p in a:
        by_fact.setdefault(p.fact_id, set()).add(p.lie)
    assert all(len(lies) == 1 for lies in by_fact.values())  # one designated lie per fact, every setup
    assert len(a) == len(facts) * sum(len(n) for n in SETUPS.values())


def test_bad_setup_template_relation_and_too_few_facts(builtin):
    facts, answers = builtin
    with pytest.raises(PairError, match="unknown setup"):
        setup_pairs(facts, "bribery", "x", None, answers=answers)
    with pytest.raises(PairError, match="no template"):
        setup_pairs(facts, "roleplay", "qa", None, answers=answers)
    with pytest.raises(PairError, match="languages"):
        setup_pairs(facts, "instructed", "quiz", None, answers={"capitals": answers["capitals"]})
    few = [f for f in facts if f.relation == "capitals"][:3]
    with pytest.raises(PairError, match="capitals"):
        setup_pairs(few, "fewshot", "qa", None, answers=answers, n_shots=3)
    assert len(setup_pairs(few, "instructed", "quiz", None, answers=answers)) == 3  # no demonstrations needed


def test_first_token_of_lie_differs_from_truth_with_tokenizer(tiny, builtin):
    facts, answers = builtin
    tok = tiny.tokenizer
    tok.chat_template = None
    from mechlie.core.pairs import shared_first_token

    pairs = setup_pairs(facts, "instructed", "quiz", tok, answers=answers)
    assert shared_first_token(tok, pairs) == []


def test_aliases_by_fact_id_as_the_corpus_gives_them():
    facts = [UserFact(f"Q{i}?", a, None, f"r/{i}", relation="r") for i, a in enumerate(["Myanmar", "Peru", "Chile"])]
    answers = {"r": ["Myanmar", "Burma", "Peru", "Chile"]}
    for seed in range(20):
        p = setup_pairs(facts, "instructed", "quiz", None, answers=answers, seed=seed, aliases={"r/0": ("Burma",)})[0]
        assert p.aliases == ("Burma",) and p.lie in ("Peru", "Chile")
    lies = {setup_pairs(facts, "instructed", "quiz", None, answers=answers, seed=s)[0].lie for s in range(40)}
    assert "Burma" in lies  # without the alias, Burma is just another answer
