import pytest
import torch

from mechlie.metrics import score_logits
from mechlie.pairs import PairError
from mechlie.position_patching import align_from_end, patch_positions_tokens
from tiny_models import answers, tiny_model


def test_align_from_end():
    assert align_from_end(5, 3) == [(2, 0), (3, 1), (4, 2)]
    assert align_from_end(3, 5) == [(0, 2), (1, 3), (2, 4)]
    assert align_from_end(6, 6, n_positions=2) == [(4, 4), (5, 5)]
    with pytest.raises(PairError):
        align_from_end(0, 3)


def _brute(model, clean, corrupt, layer, ci, ki, ans):
    store = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", lambda a, hook: store.update(a=a.clone()))]):
        model(clean[None])

    def patch(act, hook):
        act[0, ki] = store["a"][0, ci]
        return act

    with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch)]):
        return score_logits(model(corrupt[None])[:, -1], ans).logit_diff[0]


def test_prompts_of_different_lengths_align_from_the_end():
    model = tiny_model(attn_only=False, n_layers=2)
    # Hand-made prompts: a shared ending "20 21 22" preceded by differing, unequal beginnings.
    clean = [torch.tensor([5, 6, 7, 8, 9, 20, 21, 22]), torch.tensor([11, 12, 20, 21, 22])]
    corrupt = [torch.tensor([30, 31, 20, 21, 22]), torch.tensor([33, 34, 35, 36, 20, 21, 22])]
    ans = answers(2)
    res = patch_positions_tokens(model, clean, corrupt, ans, progress=False)
    assert res.offsets == (-5, -4, -3, -2, -1)  # the shorter prompt of a pair, and of all pairs
    assert res.p_truth.shape == (2, 5, 2)
    for i in range(2):
        for j, (ci, ki) in enumerate(align_from_end(len(clean[i]), len(corrupt[i]), 5)):
            for layer in range(2):
                want = _brute(model, clean[i], corrupt[i], layer, ci, ki, answers(1))
                assert torch.allclose(res.logit_diff[i, j, layer], want, atol=1e-4), (i, j, layer)
    # Pair 0, offset -5: clean token 9 (index 4) goes into corrupt index 0.
    assert align_from_end(8, 5, 5)[0] == (3, 0)
    # The shared suffix at layer 0 is the same token in both prompts, and with rotary positions
    # resid_pre of block 0 is just the token embedding: patching it must change nothing.
    assert torch.allclose(res.logit_diff[:, -3:, 0], res.corrupt.logit_diff[:, None].expand(-1, 3), atol=1e-5)
    # The corrupt baseline is the plain forward pass.
    base = torch.stack([score_logits(model(c[None])[:, -1], answers(1)).logit_diff[0] for c in corrupt])
    assert torch.allclose(res.corrupt.logit_diff, base, atol=1e-5)


def test_n_positions_and_layers_subset():
    model = tiny_model(attn_only=False, n_layers=3)
    clean, corrupt = [torch.arange(5, 15)], [torch.arange(20, 30)]
    res = patch_positions_tokens(model, clean, corrupt, answers(1), layers=[2], n_positions=3, progress=False)
    assert res.offsets == (-3, -2, -1) and res.layers == (2,)
    want = _brute(model, clean[0], corrupt[0], 2, 9, 9, answers(1))
    assert torch.allclose(res.logit_diff[0, -1, 0], want, atol=1e-4)
