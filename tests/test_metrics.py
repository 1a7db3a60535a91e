import pytest
import torch

from mechlie.core.metrics import answer_logprob, behaviour, final_logits
from mechlie.core.pairs import ContrastPair, PairError, answer_sequences, answer_set


def token_by_token(model, prompt: str, answer: str) -> float:
    """Reference: one forward pass per answer token, each on the text so far."""
    words = answer.split()
    total = 0.0
    for j, w in enumerate(words):
        text = prompt + "".join(" " + x for x in words[:j])
        lp = final_logits(model, [text])[0].log_softmax(-1)
        total += lp[model.tokenizer.convert_tokens_to_ids(w)].item()
    return total


def test_full_answer_logprob_matches_token_by_token(tiny):
    prompts = ["Q What is the capital of France ? A :", "Q capital of Peru ? A :", "Q hot ? A :"]
    answers = ["Paris", "Lima Santiago Chile", "cold opposite"]
    got = answer_logprob(tiny, prompts, answers, batch_size=2)
    want = torch.tensor([token_by_token(tiny, p, a) for p, a in zip(prompts, answers)])
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    # A longer answer is a product of more probabilities: strictly below its own first token.
    first = answer_logprob(tiny, prompts[1:2], ["Lima"])
    assert got[1] < first[0] - 1e-3


def test_answer_sequences_spellings(tiny):
    assert answer_sequences(tiny.tokenizer, "Lima Santiago") == [
        [tiny.tokenizer.convert_tokens_to_ids("Lima"), tiny.tokenizer.convert_tokens_to_ids("Santiago")]
    ]
    with pytest.raises(PairError, match="empty"):
        answer_sequences(tiny.tokenizer, "  ")


def test_behaviour_accepts_multi_token_answers(tiny):
    pairs = [
        ContrastPair("Q capital of Peru ? A :", "Q liar capital of Peru ? A :", "Lima Chile", "Rome Italy", "f1"),
        ContrastPair("Q capital of Cuba ? A :", "Q liar capital of Cuba ? A :", "Havana", "Cairo", "f2"),
    ]
    with pytest.raises(PairError):
        answer_set(tiny.tokenizer, pairs, multi_token="error")  # single-token mode refuses
    first = answer_set(tiny.tokenizer, pairs)  # the default: first token of each spelling
    shared = [ContrastPair("Q a", "Q liar a", "Lima Chile", "Lima Peru", "f3")]
    with pytest.raises(PairError, match="share a first token"):
        answer_set(tiny.tokenizer, shared)
    assert first.truth[0, 0].item() == tiny.tokenizer.convert_tokens_to_ids("Lima")
    b = behaviour(tiny, pairs, progress=False, full_answer=True)
    ref = answer_logprob(tiny, [p.lying for p in pairs], [p.truth for p in pairs])
    assert torch.allclose(b.lying.logp_truth_seq, ref, atol=1e-5)
    # For a one-token answer the full-answer log-prob is the first-token log-prob.
    lp1 = final_logits(tiny, [pairs[1].honest])[0].log_softmax(-1)[tiny.tokenizer.convert_tokens_to_ids("Havana")]
    assert b.honest.logp_truth_seq[1].item() == pytest.approx(lp1.item(), abs=1e-4)
    s = b.summary()
    assert "logit_diff_seq_honest" in s and s["n"] == 2
    sub = b.subset(torch.tensor([1]))
    assert sub.honest.logp_truth_seq.shape == (1,)
