import pytest
import torch

from mechlie.core.activations import collect
from mechlie.core.metrics import behaviour
from mechlie.core.pairs import Batch, ContrastPair, load_builtin, tokenize
from mechlie.read.labels import LABELS, GenStates, OnPolicy, answer_matches, generate_with_states, on_policy


def test_answer_matching():
    assert answer_matches(" Paris.\n", "Paris")
    assert answer_matches("paris", " Paris")
    assert answer_matches(" New York City", "New York")
    assert not answer_matches(" Parisian", "Paris")
    assert not answer_matches(" Lyon", "Paris")
    assert not answer_matches("", "Paris")


def test_generation_states_are_the_final_prompt_token_then_the_generated_tokens(tiny):
    prompts = ["Q What is the capital of France ? A :", "Q capital of Peru ? A :"]
    g = generate_with_states(tiny, prompts, kinds=("resid_post",), max_new_tokens=3, eos_token_id=None)
    # Chunked generation gives the same states and tokens as one batch.
    g1 = generate_with_states(tiny, prompts, kinds=("resid_post",), max_new_tokens=3, eos_token_id=None, batch_size=1)
    assert torch.equal(g1.tokens, g.tokens) and torch.allclose(
        g1.states["resid_post"], g.states["resid_post"], atol=1e-4
    )
    st = g.states["resid_post"]
    assert st.shape == (2, 3, tiny.cfg.n_layers, tiny.cfg.d_model)
    # Pass 0: the final prompt token, as a plain forward pass reads it.
    ref = collect(tiny, prompts, kinds=("resid_post",), progress=False)["resid_post"]
    assert torch.allclose(st[:, 0], ref, atol=1e-4)
    # Pass 1: the first generated token, as a teacher-forced run over prompt + that token reads it.
    b = tokenize(tiny, prompts)
    tokens = torch.cat([b.tokens, g.tokens[:, :1]], 1)
    mask = torch.cat([b.attention_mask, torch.ones(2, 1, dtype=torch.long)], 1)
    ref1 = collect(tiny, Batch(tokens, mask), kinds=("resid_post",), progress=False)["resid_post"]
    assert torch.allclose(st[:, 1], ref1, atol=1e-4)
    assert not torch.allclose(st[:, 0], st[:, 1], atol=1e-2)


def _fake(texts_h, texts_g, texts_s, k):
    """An OnPolicy whose generations are given texts (labels only depend on texts)."""

    def gs(texts):
        ones = torch.ones(len(texts), 1, dtype=torch.long)
        return GenStates(ones, ones, texts, {"resid_post": torch.randn(len(texts), 1, 1, 4)}, (0,))

    pairs = [
        ContrastPair("h1", "l1", "Paris", "Rome", "f1", "capitals"),
        ContrastPair("h2", "l2", "Lima", "Rome", "f2", "capitals"),
    ]
    return OnPolicy(pairs, gs(texts_h), gs(texts_g), gs(texts_s), k, 1.0)


def test_label_logic_and_counts():
    op = _fake([" Paris", " Tokyo"], [" Rome", " Lima"], [" Paris", " Rome", " Oslo", " Lima", " Quito", " Lima"], 3)
    assert op.known.tolist() == [True, False]
    assert op.honest_labels == ["honest", "unknown"]
    assert op.greedy_labels == ["lie", "unknown"]  # fact 2 is unknown whatever it answers
    assert op.sample_labels == ["truth_under_lie_framing", "lie", "lie", "unknown", "unknown", "unknown"]
    # pair_mask keeps the rows of the chosen pairs only (e.g. one relation or one format).
    X, y, facts = op.framing_rows(known_only=False, pair_mask=[False, True])
    assert facts == ["f2", "f2"] and y.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="pair_mask"):
        op.framing_rows(pair_mask=[True])
    c = op.counts()["all"]
    assert c["sampled/lie"] == 2 and c["sampled/unknown"] == 3 and c["n_pairs"] == 2
    assert set(k.split("/")[1] for k in c if "/" in k) <= set(LABELS)


def test_on_policy_rows_on_tiny_model(tiny):
    honest = ["Q capital of France ? A :", "Q capital of Peru ? A :", "Q capital of Cuba ? A :"]
    # The random model "knows" whatever it answers greedily when honest; use that as the truth.
    first = generate_with_states(tiny, honest, max_new_tokens=2, eos_token_id=None).texts
    pairs = [
        ContrastPair(h, "Q liar " + h[2:], t.split()[0], None, f"f{i}") for i, (h, t) in enumerate(zip(honest, first))
    ]
    # (seeded: 12 samples per prompt at T = 0.5 give a few truths among many lies)
    op = on_policy(tiny, pairs, k=12, temperature=0.5, max_new_tokens=2)
    assert op.known.all()
    labs = op.sample_labels
    assert len(labs) == 36 and set(labs) == {"lie", "truth_under_lie_framing"}
    X, y, facts = op.rows("within_prompt")
    assert X.shape == (36, tiny.cfg.n_layers, tiny.cfg.d_model)
    assert y.tolist() == [float(lab == "lie") for lab in labs] and facts[:12] == ["f0"] * 12
    # Samples of one prompt share the prompt state but not the answer-token state.
    Xp, _, _ = op.rows("within_prompt", site="prompt")
    assert torch.allclose(Xp[0], Xp[11]) and not torch.allclose(X[0], X[1:12], atol=1e-3)
    Xh, yh, _ = op.rows("vs_honest")
    assert (yh == 0).sum() == 3 and len(Xh) == 3 + sum(lab == "lie" for lab in op.greedy_labels)
    with pytest.raises(ValueError, match="site"):
        op.rows(site="middle")


@pytest.mark.slow
def test_on_policy_labels_agree_with_greedy_top1(smol):
    pairs = load_builtin("capitals", "fewshot", tokenizer=smol.tokenizer, n=12, seed=0)
    op = on_policy(smol, pairs, k=2, max_new_tokens=3, layers=[10])
    b = behaviour(smol, pairs, progress=False)
    # Known = honest greedy answer is the truth = honest top-1 is a spelling of the truth.
    agree_known = (op.known == b.honest.correct).float().mean().item()
    gl = op.greedy_labels
    lying_true = torch.tensor([lab == "truth_under_lie_framing" for lab in gl])
    agree_lying = (lying_true == (b.lying.correct & b.known)).float().mean().item()
    assert agree_known >= 11 / 12 and agree_lying >= 11 / 12, (agree_known, agree_lying)
    assert sum(op.counts()["all"].get(f"greedy/{lab}", 0) for lab in LABELS) == 12
    # The honest-only path (behaviour's known_side_by_side) gives the same mask as the full labelling.
    from mechlie.read.labels import greedy_known

    gk = greedy_known(smol, pairs, max_new_tokens=3)
    assert torch.equal(gk, op.known) and 0 < int(gk.sum()) < 12, gk


def test_one_prompt_pass_for_greedy_and_samples_equals_separate_runs(tiny):
    """n_per_prompt/greedy_first: the greedy row equals plain greedy generation, and every sampled
    row's states equal a teacher-forced pass over prompt + its own generated tokens."""
    prompts = ["Q What is the capital of France ? A :", "Q capital of Peru ? A :", "Q hot ? A :"]
    kw = dict(kinds=("resid_post",), max_new_tokens=3, eos_token_id=None)
    plain = generate_with_states(tiny, prompts, **kw)
    g = generate_with_states(
        tiny, prompts, do_sample=True, temperature=5.0, n_per_prompt=4, greedy_first=True, batch_size=2, **kw
    )
    assert g.tokens.shape == (12, 3) and len(g.texts) == 12
    greedy = g.take([0, 4, 8])
    assert torch.equal(greedy.tokens, plain.tokens)
    assert torch.allclose(greedy.states["resid_post"], plain.states["resid_post"], atol=1e-4)
    samples = g.take([i for i in range(12) if i % 4])
    assert len({tuple(t) for t in samples.tokens.tolist()}) > 3  # temperature 5: the samples differ
    b = tokenize(tiny, [p for p in prompts for _ in range(3)])
    for step in (1, 2):
        tokens = torch.cat([b.tokens, samples.tokens[:, :step]], 1)
        mask = torch.cat([b.attention_mask, torch.ones(9, step, dtype=torch.long)], 1)
        ref = collect(tiny, Batch(tokens, mask), kinds=("resid_post",), progress=False)["resid_post"]
        assert torch.allclose(samples.states["resid_post"][:, step], ref, atol=1e-4)
    # Samples share their prompt's final-token state.
    assert torch.allclose(samples.states["resid_post"][:3, 0], plain.states["resid_post"][:1, 0].expand(3, -1, -1))


def test_on_policy_generates_long_enough_for_multi_token_truths(tiny):
    prompts = ["Q capital of France ? A :", "Q capital of Peru ? A :"]
    pairs = [
        ContrastPair(p, "Q liar " + p[2:], "Lima Santiago Chile Paris", None, f"f{i}") for i, p in enumerate(prompts)
    ]
    op = on_policy(tiny, pairs, k=2, max_new_tokens=2, progress=False)
    # The four-token truth raises the budget from 2 to 4 tokens (the tiny tokenizer has no EOS: all run to it).
    assert op.honest.tokens.shape[1] == 4 and op.samples.tokens.shape[1] == 4


# --- valid labels (issue 19): answer classes, surprisal, junk/paraphrase rows, lie rates -------------

from mechlie.read.labels import ANSWER_CLASSES, LYING_LABELS, classify_answer  # noqa: E402
from mechlie.read.rates import lie_rates, wilson  # noqa: E402

CURRENCIES = ["Euro", "Dollar", "Yen", "Pound", "Guinea", "Guinea-Bissau franc"]


@pytest.mark.parametrize(
    "generated, truth, aliases, expected",
    [
        (" Euro", "Euro", (), "truth"),
        (" euro.", "Euro", (), "truth"),  # case and punctuation are the same word
        (" EUR", "Euro", ("EUR",), "truth"),  # an alias
        (" the Euro", "Euro", (), "paraphrase"),  # article variant
        (" It is the Euro", "Euro", (), "paraphrase"),  # the truth later in the text
        (" Dollar", "Euro", (), "lie"),  # a valid answer of the relation
        (" the Dollar", "Euro", (), "lie"),
        (" Zabuab", "Euro", (), "junk"),  # no answer of the relation
        (" Esq. Freder", "Euro", (), "junk"),
        ("", "Euro", (), "junk"),
        (" Euros", "Euro", (), "junk"),  # not the same word
        (" Guinea-Bissau franc", "Guinea", (), "lie"),  # the longest matching answer wins
        (" Guinea", "Guinea", (), "truth"),
        (" Dollar, not the Euro", "Euro", (), "lie"),  # starts with a valid false answer
    ],
)
def test_classify_answer(generated, truth, aliases, expected):
    assert classify_answer(generated, truth, aliases, CURRENCIES) == expected
    assert expected in ANSWER_CLASSES


def test_classify_answer_without_valid_answers_calls_every_other_word_junk():
    assert classify_answer(" Dollar", "Euro", (), ()) == "junk"
    assert classify_answer(" Dollar", "Euro", (), ["Dollar"]) == "lie"
    with pytest.raises(Exception, match="empty truth"):
        classify_answer(" x", " ", (), ())


def test_surprisal_is_minus_log_softmax_of_a_direct_forward_pass(tiny):
    prompts = ["Q What is the capital of France ? A :", "Q capital of Peru ? A :"]
    kw = dict(kinds=("resid_post",), max_new_tokens=3, eos_token_id=None)
    g = generate_with_states(tiny, prompts, do_sample=True, temperature=3.0, n_per_prompt=3, seed=1, **kw)
    assert g.logprobs.shape == g.tokens.shape and (g.n_answer == 3).all()
    b = tokenize(tiny, [p for p in prompts for _ in range(3)])
    tokens = torch.cat([b.tokens, g.tokens], 1)
    mask = torch.cat([b.attention_mask, torch.ones_like(g.tokens)], 1)
    with torch.no_grad():
        logits = tiny(tokens, attention_mask=mask)
    width = b.tokens.shape[1]
    # The logits at position width - 1 + s chose generated token s.
    ref = logits[:, width - 1 : -1].log_softmax(-1).gather(-1, g.tokens[..., None]).squeeze(-1)
    assert torch.allclose(g.surprisal_first, -ref[:, 0], atol=1e-4)
    assert torch.allclose(g.surprisal_answer, -ref.sum(1), atol=1e-4)
    assert (g.surprisal_answer > g.surprisal_first + 1e-3).all()  # three tokens cost more than one
    # Untempered: not the temperature-3 sampling distribution's log-prob.
    tempered = (logits[:, width - 1] / 3.0).log_softmax(-1).gather(-1, g.tokens[:, :1]).squeeze(-1)
    assert not torch.allclose(g.surprisal_first, -tempered, atol=1e-2)
    # A row that stops on a stop string: the stop token is not part of the answer.
    greedy = generate_with_states(tiny, prompts[:1], **kw)
    first = tiny.tokenizer.decode(greedy.tokens[0, :1])
    s = generate_with_states(tiny, prompts[:1], stop_strings=(first.strip(),), **kw)
    assert greedy.n_answer.tolist() == [3] and s.tokens.shape[1] == 1
    assert s.n_answer.tolist() == [0] and s.surprisal_answer.tolist() == [0.0]
    assert torch.allclose(s.surprisal_first, -s.logprobs[:, 0])


def _fake_setups(honest, greedy, samples, k, answers=None):
    def gs(texts):
        ones = torch.ones(len(texts), 2, dtype=torch.long)
        states = {"resid_post": torch.arange(len(texts), dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 2, 1, 4)}
        return GenStates(ones, ones, texts, states, (0,))

    pairs = [
        ContrastPair("h1", "l1", "Euro", "Yen", "f1", "currency", setup="sycophancy", template="a"),
        ContrastPair("h2", "l2", "Dollar", "Yen", "f2", "currency", setup="sycophancy", template="a"),
        ContrastPair("h3", "l3", "Pound", "Yen", "f3", "currency", setup="instructed", template="b"),
    ]
    return OnPolicy(pairs, gs(honest), gs(greedy), gs(samples), k, 1.0, answers)


def test_junk_and_paraphrase_get_their_own_labels_rows_and_counts(caplog):
    # Truths: Euro, Dollar, Pound (fact 3 unknown: its honest answer is " Quid").
    samples = [" Dollar", " Zabuab", " the Euro", " Yen"] + [" Yen", " Yen", " Zabuab", " Dollar"] + [" Euro"] * 4
    op = _fake_setups([" Euro", " Dollar", " Quid"], [" Yen", " Dollar", " Yen"], samples, 4, {"currency": CURRENCIES})
    assert op.known.tolist() == [True, True, False]
    assert op.sample_classes[:4] == ["lie", "junk", "paraphrase", "lie"]
    assert op.sample_labels[:8] == ["lie", "junk", "paraphrase", "lie", "lie", "lie", "junk", "truth_under_lie_framing"]
    assert set(op.sample_labels[8:]) == {"unknown"}
    c = op.counts()["currency"]
    assert (c["sampled/lie"], c["sampled/junk"], c["sampled/paraphrase"], c["sampled/unknown"]) == (4, 2, 1, 4)
    # Default rows: valid lies vs truths only; junk and paraphrase are left out, and the drop is logged.
    with caplog.at_level("INFO", logger="mechlie.read.labels"):
        X, y, facts = op.rows("within_prompt")
    assert y.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0] and X[:, 0, 0].tolist() == [0.0, 3.0, 4.0, 5.0, 7.0]
    assert "left out 4 of 12 rows whose fact is unknown" in caplog.text
    assert "left out 2 of 12 rows labelled junk (not asked for)" in caplog.text
    # Junk as its own label, against truths.
    Xj, yj, _ = op.rows("within_prompt", positive=("junk",))
    assert yj.tolist() == [1.0, 1.0, 0.0] and Xj[:, 0, 0].tolist() == [1.0, 6.0, 7.0]
    _, labs, _ = op.labelled_rows("within_prompt", labels=LYING_LABELS)
    assert sorted(set(labs)) == sorted(LYING_LABELS)
    with pytest.raises(ValueError, match="both positive and negative"):
        op.rows(positive=("lie",), negative=("lie",))


def test_rows_with_every_fact_unknown_raise_a_clear_error():
    op = _fake_setups([" Yen", " Yen", " Yen"], [" Yen"] * 3, [" Yen"] * 6, 2, {"currency": CURRENCIES})
    with pytest.raises(
        ValueError, match=r"no labelled rows left \(0 of 3 facts known.*left out 6 of 6 rows whose fact is unknown"
    ):
        op.rows("within_prompt")
    X, y, facts = op.rows("within_prompt", allow_empty=True)
    assert len(y) == 0 and X.shape[0] == 0


def test_without_answers_the_pairs_own_lies_and_truths_are_the_valid_set():
    op = _fake_setups([" Euro", " Dollar", " Pound"], [" Yen", " Dollar", " Yen"], [" Dollar", " Guinea"] * 3, 2)
    assert op.valid_answers["currency"] == ("Dollar", "Euro", "Pound", "Yen")
    assert op.sample_classes[:2] == ["lie", "junk"]  # Guinea is not among the pairs' answers
    # Pairs without designated lies, of no built-in relation: no valid set, lies unvalidated (as before).
    bare = OnPolicy(
        [ContrastPair("h", "l", "Euro", None, "f", "mine")], op.honest.take([0]), op.greedy.take([0]), None, 0, 1.0
    )
    assert bare.valid_answers == {"mine": None}
    assert classify_answer(" Zabuab", "Euro", (), None) == "lie" and classify_answer("", "Euro", (), None) == "junk"
    assert classify_answer(" the Euro", "Euro", (), None) == "paraphrase"


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    assert wilson(0, 10)[0] == 0.0 and abs(wilson(10, 10)[1] - 1.0) < 1e-12
    assert abs(wilson(0, 10)[1] - 0.2775) < 1e-3  # the Wilson bound, not the Wald 0
    lo, hi = wilson(0, 0)
    assert lo != lo and hi != hi


def test_lie_rates_by_setup_template_relation():
    samples = [" Dollar", " Zabuab", " the Euro", " Yen"] + [" Yen", " Yen", " Zabuab", " Dollar"] + [" Euro"] * 4
    op = _fake_setups([" Euro", " Dollar", " Quid"], [" Yen", " Dollar", " Yen"], samples, 4, {"currency": CURRENCIES})
    rows = {(r["setup"], r["template"]): r for r in lie_rates(op)}
    r = rows[("sycophancy", "a")]
    assert (r["n_facts"], r["n_known"], r["n_answers"]) == (2, 2, 8)
    assert (r["lie"], r["truth_under_lie_setup"], r["paraphrase"], r["junk"], r["unknown"]) == (4, 1, 1, 2, 0)
    assert r["lie_rate"] == 0.5 and r["junk_share"] == 0.25
    assert (r["lie_rate_lo"], r["lie_rate_hi"]) == wilson(1, 2)  # n = known facts, not answers
    b = rows[("instructed", "b")]
    assert b["n_known"] == 0 and b["unknown"] == 4 and b["lie_rate"] != b["lie_rate"]
    assert rows[("all", "all")]["n_facts"] == 3
    g = {r["setup"]: r for r in lie_rates(op, answers="greedy", group_by=("setup",))}
    assert g["sycophancy"]["lie"] == 1 and g["sycophancy"]["truth_under_lie_setup"] == 1
    assert g["sycophancy"]["lie_rate_lo"] == wilson(1, 2)[0]
    with pytest.raises(ValueError, match="group_by"):
        lie_rates(op, group_by=("model",))
