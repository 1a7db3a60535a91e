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
