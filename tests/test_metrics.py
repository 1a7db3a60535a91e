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


# ---------------------------------------------------------------------------------------------
# one final-position logits path, soft-cap included


SOFTCAP_PROMPTS = ["Q What is the capital of France ? A", "Q hot ? A", "Q capital of Peru ? A :", "Q A"]


def _softcap_reference():
    from tiny_models import softcap_model

    from mechlie.core.pairs import tokenize

    model = softcap_model()
    batch = tokenize(model, SOFTCAP_PROMPTS)
    with torch.no_grad():
        want = model(batch.tokens, attention_mask=batch.attention_mask)[:, -1].float()
    return model, batch, want


def test_softcap_model_is_capped():
    model, batch, want = _softcap_reference()
    cap = model.cfg.output_logits_soft_cap
    with torch.no_grad():
        raw = model.unembed(model.ln_final(model(batch.tokens, attention_mask=batch.attention_mask, stop_at_layer=3)))
    assert raw[:, -1].abs().max() > 5 * cap  # the cap changes these logits a lot
    assert want.abs().max() <= cap


def test_core_final_logits_paths_apply_the_soft_cap():
    from mechlie.core.activations import collect
    from mechlie.core.kv import collect_batch, final_tokens, prefix_cache, run_rows

    model, batch, want = _softcap_reference()
    assert torch.equal(final_logits(model, SOFTCAP_PROMPTS, batch_size=4), want)
    assert torch.allclose(final_logits(model, SOFTCAP_PROMPTS, batch_size=3), want, atol=1e-5)
    assert torch.equal(final_logits(model, batch, batch_size=4), want)
    assert torch.allclose(final_logits(model, [batch], every_position=False), want, atol=1e-5)
    acts = collect(model, SOFTCAP_PROMPTS, kinds=("resid_post",), batch_size=4, progress=False, return_logits=True)
    assert torch.equal(acts.logits, want)
    assert torch.allclose(collect_batch(model, batch, ("resid_post",)).logits, want, atol=1e-5)
    rows = torch.arange(len(SOFTCAP_PROMPTS))
    kv = run_rows(model, prefix_cache(model, batch), rows, final_tokens(batch))[:, -1]
    assert torch.allclose(kv, want, atol=1e-5)
    from mechlie.core.generation import generate

    first = generate(model, batch, max_new_tokens=1, eos_token_id=None, return_logits=True).logits[:, 0]
    assert torch.allclose(first, want, atol=1e-5)


def test_steering_eval_last_logits_applies_the_soft_cap():
    """Failed on 9b34dbc (it unembedded the final residual without the cap); now metrics.final_logits."""
    from mechlie.studies.steering_eval import last_logits

    model, batch, want = _softcap_reference()
    assert torch.allclose(last_logits(model, [batch]), want, atol=1e-5)


def test_edits_truth_logprob_applies_the_soft_cap():
    """Failed on 9b34dbc (edits._truth_logprob unembedded without the cap)."""
    import importlib

    from mechlie.core.metrics import gather_logprob

    # The learned edits' training objective (private; it moved from edits to edit_training in issue 18).
    for name in ("mechlie.control.edit_training", "mechlie.control.edits"):
        mod = importlib.import_module(name)
        truth_logprob, rows_cls = getattr(mod, "_truth_logprob", None), getattr(mod, "_Rows", None)
        if truth_logprob is not None and rows_cls is not None:
            break
    else:
        pytest.skip("the learned edits no longer have their own final-logits helper")
    model, batch, want = _softcap_reference()
    truth = torch.arange(len(SOFTCAP_PROMPTS))[:, None] + 10
    idx = torch.arange(len(SOFTCAP_PROMPTS))
    with torch.no_grad():
        got = truth_logprob(model, rows_cls(batch.tokens, batch.attention_mask, 0, None), idx, truth, [])
    assert torch.allclose(got, gather_logprob(want.log_softmax(-1), truth), atol=1e-5)


def test_unembed_equals_transformer_lens_and_follows_the_weights(tiny):
    """mechlie's unembedding (the transposed W_U kept on the module) gives TransformerLens's numbers (the
    same F.linear; a BLAS may round differently with another memory alignment, so up to float noise),
    follows an in-place change of W_U, and leaves hooks on the unembedding to TL's own path."""
    from mechlie.core.metrics import unembed

    resid = torch.randn(3, 5, tiny.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny.unembed(resid)
        assert ref.abs().max() > 0.1 and (unembed(tiny, resid) - ref).abs().max() < 1e-5
        tiny.unembed.W_U.mul_(2.0)  # in place: the kept copy must not be reused (a stale one is off by ~|ref|)
        assert (unembed(tiny, resid) - 2 * ref).abs().max() < 1e-5
        tiny.unembed.W_U.div_(2.0)
    seen = []
    with tiny.hooks(fwd_hooks=[("unembed.hook_out", lambda a, hook: seen.append(1) or a * 0)]):
        assert unembed(tiny, resid).abs().max() == 0 and seen == [1]
    # a copy first made under inference mode still serves a pass under autograd
    del tiny.unembed.__dict__["_mechlie_w_u_t"]
    with torch.inference_mode():
        unembed(tiny, resid)
    # gradients to the residual are TL's
    r1, r2 = resid.clone().requires_grad_(True), resid.clone().requires_grad_(True)
    unembed(tiny, r1).pow(2).sum().backward()
    tiny.unembed(r2).pow(2).sum().backward()
    assert torch.allclose(r1.grad, r2.grad, atol=1e-5) and r1.grad.abs().max() > 0
