import pytest
import torch
from tiny_models import answers, random_batch, tiny_model

from mechlie.causal.function_vectors import (
    add_at_final_position,
    build_function_vector,
    head_aie,
    head_aie_naive,
    mean_head_activations,
)
from mechlie.core.kv import collect_batch
from mechlie.core.metrics import score_logits
from mechlie.core.pairs import ContrastPair, PairError, corrupted_fewshot, fewshot_demos, zero_shot_prompt

PLANTED = (1, 2)


@pytest.fixture(scope="module")
def planted():
    """Head (1, 2) is the only head that writes much, and its patch lowers the truth's logit."""
    model = tiny_model(n_key_value_heads=2)
    lying = random_batch(6, 10, seed=1, last_token=7)
    corrupt = random_batch(5, 10, seed=2, last_token=7)
    ans = answers(5)
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                if (layer, head) != PLANTED:
                    model.blocks[layer].attn.W_O[head] *= 0.05
        means = mean_head_activations(model, lying)
        zc = collect_batch(model, corrupt, ("z",)).acts["z"][:, PLANTED[0], PLANTED[1]]
        delta = (means.z[PLANTED] - zc).mean(0) @ model.blocks[PLANTED[0]].attn.W_O[PLANTED[1]]
        # The patch moves the final residual by ~delta: point the truth's unembedding against it.
        model.unembed.W_U[:, 3] -= 20 * delta / delta.norm() ** 2
        model.unembed.b_U[3] += 3.0
        means = mean_head_activations(model, lying)
    return model, corrupt, ans, means


def test_planted_head_has_largest_aie(planted):
    model, corrupt, ans, means = planted
    res = head_aie(model, corrupt, ans, means.z, progress=False)
    aie = res.aie("truth_drop")
    assert aie.shape == (2, 4)
    assert aie[PLANTED] > 0.1
    assert aie.flatten().argmax().item() == PLANTED[0] * 4 + PLANTED[1]
    assert res.aie("logit_diff_drop").flatten().argmax().item() == PLANTED[0] * 4 + PLANTED[1]
    fv = build_function_vector(means.head_out, aie, k=2)
    assert fv.heads[0] == PLANTED
    assert torch.allclose(fv.vector, means.head_out[fv.heads[0]] + means.head_out[fv.heads[1]])


def test_cached_aie_equals_naive_loop(planted):
    model, corrupt, ans, means = planted
    fast = head_aie(model, corrupt, ans, means.z, batch_size=2, max_rows=3, progress=False)
    p_truth, logit_diff = head_aie_naive(model, corrupt, ans, means.z)
    assert torch.allclose(fast.p_truth.reshape(5, -1), p_truth, atol=1e-5)
    assert torch.allclose(fast.logit_diff.reshape(5, -1), logit_diff, atol=1e-4)
    base = score_logits(model(corrupt.tokens)[:, -1], ans)
    assert torch.allclose(fast.base.p_truth, base.p_truth, atol=1e-5)


def test_leave_one_out_means_and_per_prompt_aie(planted):
    from mechlie.causal.function_vectors import leave_one_out_means

    z = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))
    loo = leave_one_out_means(z)
    assert torch.allclose(loo[1], z[[0, 2, 3]].mean(0), atol=1e-6)
    with pytest.raises(ValueError):
        leave_one_out_means(z[:1])
    model, corrupt, ans, means = planted
    # per-prompt means equal to the shared mean give the shared-mean AIE
    shared = head_aie(model, corrupt, ans, means.z, progress=False)
    per = head_aie(model, corrupt, ans, means.z[None].expand(5, -1, -1, -1), progress=False)
    assert torch.allclose(shared.p_truth, per.p_truth, atol=1e-6)
    # a different mean for prompt 0 only changes prompt 0
    z = means.z[None].repeat(5, 1, 1, 1)
    z[0] = -z[0]
    moved = head_aie(model, corrupt, ans, z, progress=False)
    assert torch.allclose(moved.p_truth[1:], shared.p_truth[1:], atol=1e-6)
    assert (moved.p_truth[0] - shared.p_truth[0]).abs().max() > 1e-4


def test_add_at_final_position_matches_hooked_forward():
    model = tiny_model(attn_only=False)
    batch = random_batch(3, 8, seed=3)
    ans = answers(3)
    vecs = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    res = add_at_final_position(model, batch, ans, vecs, [0, 1], progress=False)
    for v in range(2):
        for j, layer in enumerate([0, 1]):

            def hook(act, hook, v=v):
                act[:, -1] += vecs[v]
                return act

            with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_post", hook)]):
                want = score_logits(model(batch.tokens)[:, -1], ans)
            assert torch.allclose(res.p_truth[:, v, j], want.p_truth, atol=1e-5)
    # a zero vector changes nothing
    zero = add_at_final_position(model, batch, ans, torch.zeros(1, 32), [1], progress=False)
    assert torch.allclose(zero.delta_p_truth(), torch.zeros(1, 1), atol=1e-6)


def _pair():
    honest = "Q: A?\nA: a\n\nQ: B?\nA: b\n\nQ: C?\nA: c\n\nQ: D?\nA: d\n\nQ: E?\nA:"
    lying = "Q: A?\nA: x\n\nQ: B?\nA: y\n\nQ: C?\nA: z\n\nQ: D?\nA: w\n\nQ: E?\nA:"
    return ContrastPair(honest, lying, "e", "v", fact_id="t/E", question="E?")


def test_corrupted_fewshot_labels():
    pair = _pair()
    demos, q = fewshot_demos(corrupted_fewshot(pair, "mixed"))
    assert q == "E?" and [d[0] for d in demos] == ["A?", "B?", "C?", "D?"]
    labels = [a for _, a in demos]
    assert sum(a in "abcd" for a in labels) == 2 and sum(a in "xyzw" for a in labels) == 2
    for i, (_, a) in enumerate(demos):  # each label is its own question's true or false answer
        assert a in ("abcd"[i], "xyzw"[i])
    demos, _ = fewshot_demos(corrupted_fewshot(pair, "permuted"))
    labels = [a for _, a in demos]
    assert sorted(labels) == list("abcd") and all(a != "abcd"[i] for i, a in enumerate(labels))
    assert zero_shot_prompt(pair) == "Q: E?\nA:"
    with pytest.raises(PairError):
        fewshot_demos("<|im_start|>system\nhi")


# ---------------------------------------------------------------------------------------------
# end to end on the conftest's tiny model with a word-level tokenizer

from steer_fixtures import word_pairs  # noqa: E402  (the shared word-level pairs)


def test_run_function_vector_end_to_end(tiny):
    from mechlie.causal.function_vectors import VECTOR_NAMES, run_function_vector
    from mechlie.core.metrics import final_logits
    from mechlie.core.pairs import answer_set

    pairs = word_pairs()
    train, test = pairs[:3], pairs[3:]
    ex = run_function_vector(tiny, train, test, k=3, layer=1, layers=[0, 2], n_random=20, progress=False)
    assert ex.layer == 1 and ex.honest_plus.layers == (0, 1, 2)  # the headline layer is added
    assert ex.honest_plus.p_truth.shape == (3, len(VECTOR_NAMES) + 20, 3)
    # by default: the layers the FV's heads live in, headline the earliest
    dflt = run_function_vector(tiny, train, test, k=3, n_random=5, progress=False)
    head_layers = sorted({l for l, _ in dflt.fv.heads})
    assert dflt.layer == head_layers[0] and dflt.honest_plus.layers == tuple(head_layers)
    ci = ex.effect_ci(ex.lying_minus, n_boot=200)
    assert ci["fv"]["lo"] <= ci["fv"]["mean"] <= ci["fv"]["hi"] and ci["fv"]["n"] == 3
    assert ci["random"]["n"] == 20 and ci["random"]["q025"] <= ci["random"]["median"] <= ci["random"]["q975"]
    assert 1 / 21 <= ci["fv_p_vs_random"] <= 1.0
    eff = ex.effects(ex.lying_minus)
    assert set(eff) == {"fv", "diff_of_means", "random_mean", "random_mean_abs", "random_max_abs"}
    assert eff["random_max_abs"] >= eff["random_mean_abs"] >= abs(eff["random_mean"]) - 1e-9
    fv = sum(ex.means.head_out[l, h] for l, h in ex.fv.heads)
    assert torch.allclose(ex.fv.vector, fv, atol=1e-6)
    # baselines are the plain forward passes of the test prompts
    want = score_logits(final_logits(tiny, [p.honest for p in test]), answer_set(tiny.tokenizer, test)).p_truth
    assert torch.allclose(ex.honest_plus.base.p_truth, want, atol=1e-5)
    want = score_logits(
        final_logits(tiny, [zero_shot_prompt(p) for p in test]), answer_set(tiny.tokenizer, test)
    ).p_truth
    assert torch.allclose(ex.zero_shot_plus.base.p_truth, want, atol=1e-5)
    assert ex.cosine_fv_dom().shape == (tiny.cfg.n_layers,)
    with pytest.raises(PairError):
        run_function_vector(tiny, train, train, progress=False)


def test_attribution_ranks_like_exact_patching_on_a_tiny_model(tiny):
    from mechlie.causal.attribution import attribute_pairs, spearman
    from mechlie.causal.patching import patch_final_position

    pairs = word_pairs()
    exact = patch_final_position(tiny, pairs, "z", progress=False)
    att = attribute_pairs(tiny, pairs, progress=False, batch_size=4)
    delta = exact.logit_diff.mean(0) - exact.corrupt.logit_diff.mean()
    assert torch.allclose(att.corrupt_metric, exact.corrupt.logit_diff, atol=1e-4)
    assert spearman(att.z_final, delta) > 0.8
