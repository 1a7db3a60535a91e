"""Steering off its training distribution (issue 20), on tiny models: the capability check from
unrelated questions, the held-out setup's pairs, the representation-level (ReFT-like) objective, and
the flags that choose them."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model as word_model
from steer_fixtures import self_answered_pairs, word_pairs

from mechlie.control import edits
from mechlie.control.steering import AddVectors
from mechlie.core.hooks import hook_name
from mechlie.core.pairs import PairError, tokenize
from mechlie.studies import steering_capability as sc

NEUTRAL = ["the opposite of hot is cold", "you are an assistant . Answer truthfully", "What is the capital of Spain ?"]


def test_capability_check_keeps_a_zero_edit_and_loses_under_a_push():
    model = word_model(n_ctx=256)
    cap = sc.capability_set(model, self_answered_pairs(model, 14), n=12)
    assert len(cap.pairs) == 12 and cap.n_candidates == 14 and cap.known_per_relation == {"self": 12}
    zero = cap.check(model, [AddVectors({1: torch.ones(32)}, 0.0)])
    assert zero["accuracy"] == 1.0 and zero["correct"] == 12 and zero["lo"] < 1.0 and zero["hi"] == 1.0
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    pushed = cap.check(model, [AddVectors({1: v}, 40.0)])
    assert pushed["accuracy"] < 0.7 and pushed["lo"] <= pushed["accuracy"] <= pushed["hi"]
    # the prompting baseline's check reads the same questions after its instruction: a valid share
    pb = cap.check_prompt(model)
    assert pb["n"] == 12 and 0.0 <= pb["accuracy"] <= 1.0


def test_capability_check_refuses_too_few_known_questions_with_its_count():
    model = word_model(n_ctx=256)
    wrong = [p.__class__(**{**p.__dict__, "truth": p.lie, "lie": p.truth}) for p in self_answered_pairs(model, 12)]
    with pytest.raises(PairError, match=r"only 0 of 12 corpus questions"):
        sc.capability_set(model, wrong, n=12)


def test_heldout_setup_pairs_are_the_setup_seeded_and_per_relation():
    ps = sc.setup_heldout_pairs(("opposites", "symbols"), "instructed", "", 5, None, seed=0, corpus=False)
    assert len(ps) == 10 and {p.relation for p in ps} == {"opposites", "symbols"}
    assert {p.setup for p in ps} == {"instructed"} and {p.template for p in ps} == {"assistant"}
    assert all(p.honest != p.lying and p.question in p.honest for p in ps)
    again = sc.setup_heldout_pairs(("opposites", "symbols"), "instructed", "", 5, None, seed=0, corpus=False)
    other = sc.setup_heldout_pairs(("opposites", "symbols"), "instructed", "", 5, None, seed=1, corpus=False)
    assert [p.fact_id for p in again] == [p.fact_id for p in ps] != [p.fact_id for p in other]
    role = sc.setup_heldout_pairs(("opposites",), "roleplay", "spy", 3, None, seed=0, corpus=False)
    assert {p.template for p in role} == {"spy"} and all("spy" in p.lying for p in role)


def _final_resid(model, prompts, layer, edit=None):
    from mechlie.control.steering import steer

    name = hook_name("resid_post", layer)
    with torch.no_grad(), steer(model, *([edit] if edit else [])):
        b = tokenize(model, prompts)
        _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask, names_filter=lambda n: n == name)
    return cache[name][:, -1]


def test_reft_objective_maps_lying_residuals_onto_honest_ones():
    model = word_model(n_ctx=256)
    pairs = word_pairs()
    cfg = edits.TrainConfig(lam=0.0, steps=30, progress=False, objective="honest_resid")
    edit = edits.train_lowrank(model, pairs, NEUTRAL, 1, cfg, component="resid_post", rank=4)
    hist = [h["honest_resid"] for h in edit.info["history"]]
    # B starts at 0: the first loss is the unedited distance over itself
    assert abs(hist[0] - 1.0) < 1e-4 and hist[-1] < 0.5
    honest = _final_resid(model, [p.honest for p in pairs], 1)
    before = (_final_resid(model, [p.lying for p in pairs], 1) - honest).pow(2).sum(-1).mean()
    after = (_final_resid(model, [p.lying for p in pairs], 1, edit) - honest).pow(2).sum(-1).mean()
    assert after < 0.5 * before
    # a truth-objective edit on the same data is another edit (the objectives differ)
    truth = edits.train_lowrank(model, pairs, NEUTRAL, 1, cfg.__class__(lam=0.0, steps=3, progress=False))
    assert "honest_resid" not in truth.info["history"][0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--heldout-setup", "fewshot"], "--heldout-setup must be one of"),
        (["--heldout-template", "spy"], "is not a template of 'instructed'"),
        (["--capability-relations", "no_such_relation"], "--capability-relations needs corpus relations"),
        (["--capability-n", "-1"], "--capability-n must be >= 0"),
        (["--reft-rank", "0"], "--reft-rank 1..16"),
    ],
)
def test_transfer_flags_are_checked(flags, message, tmp_path, capsys):
    from mechlie.core.cli import run_script
    from mechlie.studies.steering import Config

    loaded = []
    rc = run_script(Config, lambda cfg, run: loaded.append(1), argv=flags + ["--out-dir", str(tmp_path / "out")])
    assert rc == 2 and not loaded and message in capsys.readouterr().err


def test_capability_relations_must_not_be_steering_relations():
    from mechlie.studies.steering import Config

    with pytest.raises(ValueError, match="also steering relations"):
        Config(corpus=True, relations=("country_continent",), capability_relations=("country_continent",))


def test_heldout_setup_renders_plain_text_unless_chat_is_asked_for():
    tok = word_model(n_ctx=256).tokenizer
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    plain = sc.setup_heldout_pairs(("opposites",), "instructed", "", 3, tok, seed=0, corpus=False)
    chat = sc.setup_heldout_pairs(("opposites",), "instructed", "", 3, tok, seed=0, corpus=False, chat=True)
    assert all("<system>" not in p.honest and p.honest.endswith("A:") for p in plain)
    assert all(p.honest.startswith("<system>") and "<assistant>" in p.honest for p in chat)
    assert [p.lie for p in plain] == [p.lie for p in chat]  # the same facts and lies, only the rendering differs
    assert sc.PlainText(tok).chat_template is None and sc.PlainText(tok).vocab_size == tok.vocab_size


def test_heldout_setup_can_ask_only_given_facts():
    ids = {"capitals/France", "capitals/Japan", "cities/Osaka"}
    ps = sc.setup_heldout_pairs(("capitals", "cities"), "roleplay", "", 12, None, seed=0, corpus=False, fact_ids=ids)
    assert {p.fact_id for p in ps} == ids and {p.relation for p in ps} == {"capitals", "cities"}


def test_heldout_setup_with_true_demonstrations_asks_the_lie_in_words_only():
    ps = sc.setup_heldout_pairs(("opposites",), "instructed", "quiz", 4, None, seed=0, corpus=False, demos=3)
    for p in ps:
        assert p.honest.startswith("Answer the next question correctly") and p.lying.startswith(
            "Answer the next question incorrectly"
        )
        # the same true demonstrations after either instruction: the lie is asked for, never shown
        assert p.honest.split("\n\n", 1)[1] == p.lying.split("\n\n", 1)[1] and p.honest.count("\nA: ") == 3
        assert p.setup == "instructed" and p.template == "quiz"
    with pytest.raises(PairError, match="instruction setup"):
        sc.setup_heldout_pairs(("opposites",), "sycophancy", "", 4, None, seed=0, corpus=False, demos=3)
