import pytest
import torch
from tiny_models import answers, tiny_model

from mechlie.causal.position_patching import align_from_end, differing_groups, differing_offsets, patch_positions_tokens
from mechlie.core.metrics import score_logits
from mechlie.core.pairs import AnswerSet, PairError, answer_set, tokenize


def test_align_from_end():
    assert align_from_end(5, 3) == [(2, 0), (3, 1), (4, 2)]
    assert align_from_end(3, 5) == [(0, 2), (1, 3), (2, 4)]
    assert align_from_end(6, 6, n_positions=2) == [(4, 4), (5, 5)]
    with pytest.raises(PairError):
        align_from_end(0, 3)


def _brute(model, clean, corrupt, layer, ci, ki, ans):
    """Full forward of ``corrupt`` with resid_pre at ``ki`` set to ``clean``'s at ``ci`` (aligned from the end)."""
    assert ci - len(clean) == ki - len(corrupt)
    return _brute_many(model, clean, corrupt, layer, [ki - len(corrupt)], ans)


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


def test_differing_offsets_and_groups():
    clean = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    corrupt = torch.tensor([9, 2, 30, 40, 5, 60, 7, 8])
    assert differing_offsets(clean, corrupt) == [-8, -6, -5, -3]
    assert differing_groups(clean, corrupt) == [[-8], [-6, -5], [-3]]
    # unequal lengths: only the common suffix is compared
    assert differing_offsets(torch.tensor([0, 1, 2, 3]), torch.tensor([5, 2, 3])) == [-3]


def _brute_many(model, clean, corrupt, layer, offs, ans):
    """Full forward of ``corrupt`` with resid_pre at every offset in ``offs`` set to ``clean``'s."""
    store = {}
    with (
        torch.no_grad(),
        model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", lambda a, hook: store.update(a=a.clone()))]),
    ):
        model(clean[None])

    def patch(act, hook):
        for o in offs:
            act[0, len(corrupt) + o] = store["a"][0, len(clean) + o]
        return act

    with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch)]):
        return score_logits(model(corrupt[None])[:, -1], ans).logit_diff[0]


def test_default_sweep_covers_every_differing_position_and_groups(tiny):
    from mechlie.causal.position_patching import patch_positions
    from mechlie.core.pairs import ContrastPair

    # Few-shot pairs whose prompts differ only in the demonstrations' answers, far from the end.
    def prompt(a1, a2, q):
        return f"Q: France ?\nA: {a1}\n\nQ: Spain ?\nA: {a2}\n\nQ: What is the capital of {q} ?\nA:"

    pairs = [
        ContrastPair(prompt("Paris", "Madrid", "Italy"), prompt("Rome", "Lima", "Italy"), "Rome", "Paris", fact_id="a"),
        ContrastPair(
            prompt("Paris", "Madrid", "Japan"), prompt("Cairo", "Tokyo", "Japan"), "Tokyo", "Lima", fact_id="b"
        ),
    ]
    res = patch_positions(tiny, pairs, layers=[0, 2], n_final=3, progress=False)
    clean = [tokenize(tiny, [p.honest]).tokens[0] for p in pairs]
    corrupt = [tokenize(tiny, [p.lying]).tokens[0] for p in pairs]
    differing = {o for c, k in zip(clean, corrupt) for o in differing_offsets(c, k)}
    assert len(differing) == 2 and min(differing) < -10  # the answers sit far from the end
    assert differing <= set(res.offsets)  # every differing position is patched
    assert {-3, -2, -1} <= set(res.offsets)
    assert len(res.offsets) == 5
    # one group per demonstration answer, and the group patch equals a brute-force full rerun
    assert res.groups == tuple(tuple((o,) for o in sorted(differing_offsets(c, k))) for c, k in zip(clean, corrupt))
    ans = answer_set(tiny.tokenizer, pairs)
    for i in range(2):
        for j, layer in enumerate([0, 2]):
            one = AnswerSet(*(t[i : i + 1] for t in (ans.truth, ans.lie, ans.choices)))
            want = _brute_many(tiny, clean[i], corrupt[i], layer, res.groups[i][0], one)
            assert abs(float(res.group_logit_diff[i, 0, j]) - float(want)) < 1e-4
            both = [o for g in res.groups[i] for o in g]
            want_all = _brute_many(tiny, clean[i], corrupt[i], layer, both, one)
            assert float((want_all - res.corrupt.logit_diff[i]).abs()) > 1e-3  # the answers matter at all
    assert res.group_effect().shape == (2, 2)


def test_explicit_offsets_and_bad_input():
    model = tiny_model(attn_only=False, n_layers=2)
    clean, corrupt = [torch.arange(5, 15)], [torch.arange(20, 30)]
    res = patch_positions_tokens(
        model, clean, corrupt, answers(1), offsets=[-7, -1], groups=[[[-9, -8], [-2]]], progress=False
    )
    assert res.offsets == (-7, -1)
    for j, layer in enumerate([0, 1]):
        want = _brute_many(model, clean[0], corrupt[0], layer, [-9, -8], answers(1))
        assert abs(float(res.group_logit_diff[0, 0, j]) - float(want)) < 1e-4
    with pytest.raises(ValueError, match="offsets"):
        patch_positions_tokens(model, clean, corrupt, answers(1), offsets=[-11], progress=False)
    with pytest.raises(ValueError, match="layers"):
        patch_positions_tokens(model, clean, corrupt, answers(1), layers=[5], progress=False)
    with pytest.raises(ValueError, match="group"):
        patch_positions_tokens(model, clean, corrupt, answers(1), groups=[[[0]]], progress=False)
