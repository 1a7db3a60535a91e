"""Edge patching, the circuit forward and edge attribution: against direct references on tiny models."""

import pytest
import torch
from conftest import no_hooks
from test_patching import make_pairs
from tiny_models import word_model

from mechlie.causal.edges import attribute_edges, build_graph, circuit_forward, equal_length, patch_edges
from mechlie.causal.path_patching import Sender, path_patch
from mechlie.core.pairs import PairError

VARIANTS = {
    "mlp": {},
    "gqa": {"n_key_value_heads": 2},
    "postnorm": {"normalization": "RMS", "use_normalization_before_and_after": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_all_edges_give_the_honest_run_and_none_the_lying_run(variant):
    model = word_model(seed=3, **VARIANTS[variant])
    g = build_graph(model)
    pairs = make_pairs()[:3]
    res = circuit_forward(model, g, pairs, torch.stack([g.valid.float(), torch.zeros_like(g.valid, dtype=torch.float)]))
    assert (res.clean - res.corrupt).abs().min() > 1e-3  # the two runs differ, so the check means something
    assert (res.logit_diff[:, 0] - res.clean).abs().max() < 1e-4
    assert (res.logit_diff[:, 1] - res.corrupt).abs().max() < 1e-4
    assert (res.effect() - torch.tensor([1.0, 0.0])).abs().max() < 1e-3
    assert no_hooks(model) and not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in


def test_graph_counts_edges_and_rejects_non_edges():
    model = word_model(n_key_value_heads=2)
    g = build_graph(model)
    L, H, KV = 3, 4, 2
    per_attn = [1 + l * (H + 1) for l in range(L)]
    expected = sum((H + 2 * KV) * u + (u + H) for u in per_attn) + (1 + L * (H + 1))
    assert g.n_edges == expected == len(g.edges)
    assert g.edge_name(g.edges[0]) == "embed->L0H0.q"
    with pytest.raises(ValueError, match="not an edge"):
        g.masks([torch.tensor([[g.head(2, 0), g.receiver_block(1)["q"][0]]])])


def test_one_edge_patch_equals_path_patching_into_a_last_layer_head():
    """A receiver in the last block writes only at the final position that matters, so moving its
    input by one sender's honest-lying difference equals path patching (which patches its final z)."""
    model = word_model(seed=5, n_key_value_heads=2)
    g = build_graph(model)
    pairs = make_pairs()[:3]
    lr, hr = 2, 1
    senders = [Sender("head", 0, 2), Sender("head", 1, 3), Sender("mlp", 1), Sender("mlp", 0)]
    ref = path_patch(model, pairs, (lr, hr), senders=senders, progress=False)
    rb = g.receiver_block(lr)
    recv = {"q": rb["q"][hr], "k": rb["k"][hr // 2], "v": rb["v"][hr // 2]}
    idx = {str(s): (g.head(s.layer, s.head) if s.kind == "head" else g.head(s.layer, 0) + 4) for s in senders}
    sets = [torch.tensor([[idx[str(s)], recv[c]]]) for s in senders for c in ref.channels]
    ours = patch_edges(model, g, pairs, g.masks(sets), max_rows=5)
    assert (ours.logit_diff.reshape(3, len(senders), 3) - ref.logit_diff).abs().max() < 1e-4
    assert ref.logit_diff.std() > 1e-3
    assert no_hooks(model)


def test_rows_batched_equal_one_by_one():
    model = word_model(seed=2)
    g = build_graph(model)
    pairs = make_pairs()[:2]
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(5, *g.valid.shape, generator=gen) < 0.3).float() * g.valid
    for fn in (patch_edges, circuit_forward):
        a = fn(model, g, pairs, masks, max_rows=5).logit_diff
        b = fn(model, g, pairs, masks, max_rows=1).logit_diff
        assert (a - b).abs().max() < 1e-4 and a.std() > 1e-3


@pytest.mark.parametrize("method", ["eap", "eap_ig"])
def test_attribution_is_exact_where_the_metric_is_linear(method):
    """No layer norm: the logit difference is linear in the last residual, so every edge into the
    logits is scored exactly; edges into heads are not (attention is not linear), a check that can fail."""
    model = word_model(seed=4, linear=True)
    g = build_graph(model)
    pairs = make_pairs()[:3]
    att = attribute_edges(model, g, pairs, method=method, steps=3)
    logits = len(g.receivers) - 1
    senders = torch.arange(len(g.senders))
    exact = patch_edges(model, g, pairs, g.masks([torch.tensor([[s, logits]]) for s in senders.tolist()]))
    est = att.scores[:, :, logits]
    truth = exact.logit_diff - exact.corrupt[:, None]
    assert (est - truth).abs().max() < 1e-4 and truth.abs().max() > 1e-2
    assert (att.clean - exact.clean).abs().max() < 1e-5
    q = g.receiver_block(2)["q"][0]
    one = patch_edges(model, g, pairs, g.masks([torch.tensor([[g.head(1, h), q]]) for h in range(4)]))
    assert (
        att.scores[:, [g.head(1, h) for h in range(4)], q] - (one.logit_diff - one.corrupt[:, None])
    ).abs().max() > 0
    assert att.scores[:, ~g.valid].abs().max() == 0 and no_hooks(model)


def test_eap_ig_is_closer_to_exact_than_eap_on_a_nonlinear_model():
    """Integrated gradients follow the path from lying to honest: over all edges into the logits of a
    model with a final layer norm, their error is below plain EAP's."""
    model = word_model(seed=6)
    g = build_graph(model)
    pairs = make_pairs()[:3]
    logits = len(g.receivers) - 1
    exact = patch_edges(model, g, pairs, g.masks([torch.tensor([[s, logits]]) for s in range(len(g.senders))]))
    truth = exact.logit_diff - exact.corrupt[:, None]
    err = {
        m: (attribute_edges(model, g, pairs, method=m, steps=8).scores[:, :, logits] - truth).abs().mean()
        for m in ("eap", "eap_ig")
    }
    assert err["eap_ig"] < err["eap"]


def test_unequal_lengths_are_refused_and_found():
    model = word_model()
    pairs = make_pairs(equal_length=False)
    keep = equal_length(model, pairs)
    assert 0 < len(keep) < len(pairs)
    bad = next(i for i in range(len(pairs)) if i not in keep)
    g = build_graph(model)
    with pytest.raises(PairError, match="differ in length"):
        circuit_forward(model, g, [pairs[bad]], g.valid.float()[None])
