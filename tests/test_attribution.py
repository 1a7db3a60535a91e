import pytest
import torch
from tiny_models import answers, random_batch, tiny_model

from mechlie.causal.attribution import attribution_patching, spearman
from mechlie.core.metrics import score_logits
from mechlie.core.pairs import Batch, PairError


def _exact(model, clean, corrupt, ans, hook, pos, index=None):
    """Patch clean's activation at ``hook``/``pos`` (and head ``index``) into corrupt, by brute force."""
    store = {}

    def save(act, hook):
        store["a"] = act.detach().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[(hook, save)]):
        model(clean.tokens, attention_mask=clean.attention_mask)

    def patch(act, hook):
        if index is None:
            act[:, pos] = store["a"][:, pos]
        else:
            act[:, pos, index] = store["a"][:, pos, index]
        return act

    with torch.no_grad():
        base = score_logits(model(corrupt.tokens, attention_mask=corrupt.attention_mask)[:, -1], ans).logit_diff
        with model.hooks(fwd_hooks=[(hook, patch)]):
            patched = score_logits(model(corrupt.tokens, attention_mask=corrupt.attention_mask)[:, -1], ans).logit_diff
    return patched - base


def test_exact_for_a_metric_linear_in_the_patched_activation():
    # No layer norm and logit_diff with one spelling each: the metric is linear in the last
    # layer's z and resid_post, so the first-order estimate must equal exact patching.
    model = tiny_model(linear=True, n_layers=2)
    clean, corrupt = random_batch(3, 7, seed=1), random_batch(3, 7, seed=2)
    ans = answers(3)
    att = attribution_patching(model, clean, corrupt, ans, resid_kind="resid_post")
    last = model.cfg.n_layers - 1
    for pos in (6, 3):
        for head in range(model.cfg.n_heads):
            want = _exact(model, clean, corrupt, ans, f"blocks.{last}.attn.hook_z", pos, head)
            assert torch.allclose(att.z[:, pos, last, head], want, atol=1e-4), (pos, head)
        want = _exact(model, clean, corrupt, ans, f"blocks.{last}.hook_resid_post", pos)
        assert torch.allclose(att.resid[:, pos, last], want, atol=1e-4)
    # the final-position estimate is not trivially zero
    assert att.z[:, -1, last].abs().max() > 1e-3
    # a nonlinear path (layer 0 through layer 1's attention) is only approximated, not copied
    want0 = torch.stack([_exact(model, clean, corrupt, ans, "blocks.0.attn.hook_z", 6, h) for h in range(4)], 1)
    assert not torch.allclose(att.z[:, 6, 0], want0, atol=1e-6)
    assert torch.allclose(att.corrupt_metric, score_logits(model(corrupt.tokens)[:, -1], ans).logit_diff, atol=1e-5)


def test_unaligned_columns_are_masked_and_shapes_checked():
    model = tiny_model(linear=True)
    clean, corrupt = random_batch(2, 6, seed=1), random_batch(2, 6, seed=2)
    mask = clean.attention_mask.clone()
    mask[0, :2] = 0  # prompt 0 of the clean batch is 2 tokens shorter (left padding)
    att = attribution_patching(model, Batch(clean.tokens, mask), corrupt, answers(2))
    assert att.valid[0].tolist() == [False, False, True, True, True, True]
    assert (att.z[0, :2] == 0).all() and (att.resid[0, :2] == 0).all()
    with pytest.raises(PairError):
        attribution_patching(model, clean, random_batch(2, 5), answers(2))


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([3.0, 1.0, 3.0]), torch.tensor([2.0, 0.0, 2.0])) == pytest.approx(1.0)  # ties
    x = torch.randn(200, generator=torch.Generator().manual_seed(0))
    assert abs(spearman(x, torch.randn(200, generator=torch.Generator().manual_seed(1)))) < 0.2
