"""Generation on tiny random models: KV cache, left padding, phases, stopping, cleanup."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model as _tiny
from transformer_lens import HookedTransformer

from mechlie.control.steering import AddVectors, SteeringState, steer
from mechlie.core.generation import GenerationError, generate
from mechlie.core.pairs import Batch


def tiny_model(pos: str = "rotary", seed: int = 0) -> HookedTransformer:
    return _tiny(n_layers=3, attn_only=False, positional_embedding=pos, d_vocab=61, seed=seed)


def left_pad(rows: list[list[int]], pad: int = 0) -> Batch:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return Batch(tokens, mask)


ROWS = [[5, 9, 17, 3, 22, 40, 8], [11, 2, 33], [7, 7, 19, 60, 1]]


@pytest.mark.parametrize("pos", ["rotary", "standard"])
@pytest.mark.parametrize("policy", ["all", "prompt", "generated"])
def test_batched_equals_one_at_a_time_under_steering(pos, policy):
    model = tiny_model(pos)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    iv = AddVectors({1: v}, alpha=2.0, policy=policy)
    batched = generate(
        model, left_pad(ROWS), max_new_tokens=6, interventions=[iv], eos_token_id=None, return_logits=True
    )
    for i, r in enumerate(ROWS):
        single = generate(
            model, left_pad([r]), max_new_tokens=6, interventions=[iv], eos_token_id=None, return_logits=True
        )
        assert torch.equal(batched.tokens[i], single.tokens[0])
        torch.testing.assert_close(batched.logits[i], single.logits[0], atol=1e-4, rtol=1e-4)


def test_kv_cache_generation_matches_full_forward():
    model = tiny_model()
    b = left_pad(ROWS)
    out = generate(model, b, max_new_tokens=4, eos_token_id=None, return_logits=True)
    full_tokens = torch.cat([b.tokens, out.tokens], 1)
    full_mask = torch.cat([b.attention_mask, torch.ones_like(out.tokens)], 1)
    with torch.no_grad():
        logits = model(full_tokens, attention_mask=full_mask)
    w = b.tokens.shape[1]
    torch.testing.assert_close(out.logits, logits[:, w - 1 : w - 1 + 4], atol=1e-4, rtol=1e-4)


def test_alpha_zero_is_exactly_unsteered():
    model = tiny_model()
    b = left_pad(ROWS)
    clean = generate(model, b, max_new_tokens=5, eos_token_id=None, return_logits=True)
    zero = generate(
        model,
        b,
        max_new_tokens=5,
        eos_token_id=None,
        return_logits=True,
        interventions=[AddVectors({0: torch.ones(32), 2: torch.ones(32)}, alpha=0.0)],
    )
    assert torch.equal(clean.tokens, zero.tokens)
    assert torch.equal(clean.logits, zero.logits)


def test_phase_policy_positions_are_logged():
    model = tiny_model()
    b = left_pad(ROWS)
    w = b.tokens.shape[1]
    for policy, expect in [
        ("prompt", [(0, tuple(range(w)))]),
        ("generated", [(1, (w,)), (2, (w + 1,))]),
        ("all", [(0, tuple(range(w))), (1, (w,)), (2, (w + 1,))]),
    ]:
        with steer(model, AddVectors({1: torch.ones(32)}, 1.0, policy)) as st:
            generate(model, b, max_new_tokens=3, state=st, eos_token_id=None)
        assert [(t.step, t.positions) for t in st.log] == expect, policy


def test_generated_policy_leaves_first_token_unsteered():
    model = tiny_model()
    b = left_pad(ROWS)
    clean = generate(model, b, max_new_tokens=3, eos_token_id=None, return_logits=True)
    gen = generate(
        model,
        b,
        max_new_tokens=3,
        eos_token_id=None,
        return_logits=True,
        interventions=[AddVectors({1: 5 * torch.ones(32)}, 1.0, "generated")],
    )
    assert torch.equal(clean.logits[:, 0], gen.logits[:, 0])
    assert not torch.allclose(clean.logits[:, 1], gen.logits[:, 1])


def test_hooks_removed_after_exception_mid_generation():
    model = tiny_model()
    b = left_pad(ROWS)
    clean = generate(model, b, max_new_tokens=3, eos_token_id=None, return_logits=True)
    calls = {"n": 0}

    class Boom(RuntimeError):
        pass

    def exploding(act, hook):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-generation: the third pass
            raise Boom()
        return act

    with pytest.raises(Boom):
        with steer(model, AddVectors({1: torch.ones(32)}, 3.0)) as st:
            with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", exploding)]):
                generate(model, b, max_new_tokens=5, state=st, eos_token_id=None)
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())
    again = generate(model, b, max_new_tokens=3, eos_token_id=None, return_logits=True)
    assert torch.equal(clean.logits, again.logits)


def test_sampling_is_seeded_and_stops_at_eos():
    model = tiny_model()
    b = left_pad(ROWS)
    a = generate(model, b, max_new_tokens=8, do_sample=True, seed=3, eos_token_id=None)
    c = generate(model, b, max_new_tokens=8, do_sample=True, seed=3, eos_token_id=None)
    assert torch.equal(a.tokens, c.tokens)
    greedy = generate(model, b, max_new_tokens=4, eos_token_id=None)
    eos = int(greedy.tokens[0, 1])
    stopped = generate(model, b, max_new_tokens=4, eos_token_id=eos)
    assert stopped.stop_reason[0] == "eos"
    assert stopped.new_mask[0].tolist()[:2] == [1, 1] and stopped.new_mask[0, 2:].sum() == 0


def test_bad_generation_arguments():
    model = tiny_model()
    b = left_pad(ROWS)
    with pytest.raises(GenerationError):
        generate(model, b, max_new_tokens=0)
    with pytest.raises(GenerationError):
        generate(model, b, stop_strings=["\n"])  # no tokenizer
    with pytest.raises(ValueError):
        generate(model, [], max_new_tokens=2)
    with pytest.raises(GenerationError):
        generate(model, b, interventions=[AddVectors({0: torch.ones(32)}, 1.0)], state=SteeringState())


def test_string_prompts_and_stop_strings(tiny):
    prompts = ["Q What is the capital of France ? A :", "Q Spain ?"]
    out = generate(tiny, prompts, max_new_tokens=5, eos_token_id=None)
    for i, p in enumerate(prompts):
        single = generate(tiny, [p], max_new_tokens=5, eos_token_id=None)
        assert torch.equal(out.tokens[i], single.tokens[0])
        assert out.texts[i] == single.texts[0]
    first = out.texts[0].split()[1] if len(out.texts[0].split()) > 1 else out.texts[0].split()[0]
    stopped = generate(tiny, prompts[:1], max_new_tokens=5, eos_token_id=None, stop_strings=[first])
    assert stopped.stop_reason[0] == "stop_string"
    assert first not in stopped.texts[0]
