import pandas as pd
import pytest
import torch
from conftest import no_hooks, tiny_model
from transformer_lens import patching as tlp

from mechlie.causal.patching import patch_final_position, patch_runs
from mechlie.core.metrics import score_logits
from mechlie.core.pairs import ContrastPair, PairError, answer_set, tokenize

QS = ["France", "Spain", "Italy", "Japan", "Peru"]
ANS = ["Paris", "Madrid", "Rome", "Tokyo", "Lima"]


def make_pairs(equal_length: bool = True) -> list[ContrastPair]:
    pairs = []
    for i, (q, a) in enumerate(zip(QS, ANS)):
        extra = "" if equal_length or i % 2 else " you are a liar,"
        pairs.append(
            ContrastPair(
                honest=f"Answer truthfully. Q: What is the capital of {q}?\nA:",
                lying=f"Answer{extra} lie. Q: What is the capital of {q}?\nA:",
                truth=a,
                lie=ANS[(i + 1) % len(ANS)],
                fact_id=q,
                relation="custom",
            )
        )
    return pairs


def tl_reference(model, pairs, kind, normalize=True, layers=None):
    """TransformerLens's own patching on the same inputs, restricted to the final position.

    A random tiny model has a tiny honest-lying gap, which amplifies float noise in the normalized
    effect; there the raw mean logit difference is compared (``normalize=False``).
    """
    answers = answer_set(model.tokenizer, pairs)
    clean = tokenize(model, [p.honest for p in pairs]).tokens
    corrupt = tokenize(model, [p.lying for p in pairs]).tokens
    assert clean.shape == corrupt.shape  # TL's functions take unpadded, equal-length batches
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        hi = score_logits(model(clean)[:, -1], answers).logit_diff.mean()
        lo = score_logits(model(corrupt)[:, -1], answers).logit_diff.mean()

    def metric(logits):
        raw = score_logits(logits[:, -1], answers).logit_diff.mean()
        return (raw - lo) / (hi - lo) if normalize else raw

    L, H, last = model.cfg.n_layers, model.cfg.n_heads, clean.shape[1] - 1
    layers = list(range(L)) if layers is None else list(layers)
    if kind == "z":
        idx = pd.DataFrame([(l, last, h) for l in layers for h in range(H)], columns=["layer", "pos", "head_index"])
        out = tlp.generic_activation_patch(
            model, corrupt, cache, metric, tlp.layer_pos_head_vector_patch_setter, "z", index_df=idx
        )
        return out.reshape(len(layers), H)
    idx = pd.DataFrame([(l, last) for l in layers], columns=["layer", "pos"])
    return tlp.generic_activation_patch(model, corrupt, cache, metric, tlp.layer_pos_patch_setter, kind, index_df=idx)


@pytest.mark.parametrize("kind", ["z", "resid_pre", "resid_post"])
def test_equals_transformer_lens_patching(kind):
    model = tiny_model(seed=3)
    pairs = make_pairs()
    ours = patch_final_position(model, pairs, kind, progress=False, batch_size=2, max_rows=5)
    ref = tl_reference(model, pairs, kind, normalize=False)
    assert (ours.logit_diff.mean(0) - ref).abs().max() <= 1e-4
    assert ours.logit_diff.std() > 1e-3  # the patches really differ, so the comparison means something
    assert no_hooks(model)


def test_clean_to_clean_is_one_and_corrupt_to_corrupt_is_zero(tiny):
    pairs = make_pairs(equal_length=False)
    answers = answer_set(tiny.tokenizer, pairs)
    honest, lying = [p.honest for p in pairs], [p.lying for p in pairs]
    base = patch_final_position(tiny, pairs, "z", progress=False)
    hi, lo = base.clean, base.corrupt
    for kind in ("z", "resid_pre"):
        cc = patch_runs(tiny, honest, honest, answers, kind, progress=False)
        xx = patch_runs(tiny, lying, lying, answers, kind, progress=False)
        # Normalized against the honest/lying baselines: patching a run into itself changes nothing.
        eff_cc = (cc.logit_diff.mean(0) - lo.logit_diff.mean()) / (hi.logit_diff.mean() - lo.logit_diff.mean())
        eff_xx = (xx.logit_diff.mean(0) - lo.logit_diff.mean()) / (hi.logit_diff.mean() - lo.logit_diff.mean())
        torch.testing.assert_close(eff_cc, torch.ones_like(eff_cc), atol=1e-4, rtol=0)
        torch.testing.assert_close(eff_xx, torch.zeros_like(eff_xx), atol=1e-4, rtol=0)


def test_last_residual_is_one_and_unequal_lengths_work(tiny):
    pairs = make_pairs(equal_length=False)
    post = patch_final_position(tiny, pairs, "resid_post", progress=False).effect()
    pre = patch_final_position(tiny, pairs, "resid_pre", progress=False).effect()
    # The last block's output fixes the logits; layer 0's input is the (shared) final token.
    assert post[-1].item() == pytest.approx(1.0, abs=1e-4)
    assert pre[0].item() == pytest.approx(0.0, abs=1e-4)


def test_corrupt_baseline_matches_full_forward(tiny):
    pairs = make_pairs(equal_length=False)
    r = patch_final_position(tiny, pairs, "resid_pre", progress=False)
    b = tokenize(tiny, [p.lying for p in pairs])
    with torch.no_grad():
        full = score_logits(tiny(b.tokens, attention_mask=b.attention_mask)[:, -1], answer_set(tiny.tokenizer, pairs))
    torch.testing.assert_close(r.corrupt.logit_diff, full.logit_diff, atol=1e-4, rtol=1e-4)


def test_hooks_removed_after_exception(tiny, monkeypatch):
    import mechlie.causal.patching as P

    calls = {"n": 0}
    real = P.score_logits

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(P, "score_logits", flaky)
    with pytest.raises(RuntimeError):
        patch_final_position(tiny, make_pairs(), "z", progress=False)
    assert no_hooks(tiny)


def test_bad_input(tiny):
    pairs = make_pairs()
    with pytest.raises(PairError):
        patch_final_position(tiny, [], "z", progress=False)
    with pytest.raises(PairError):
        patch_runs(tiny, [pairs[0].honest], [], answer_set(tiny.tokenizer, pairs[:1]), progress=False)
    with pytest.raises(ValueError):
        patch_final_position(tiny, pairs, "nope", progress=False)


def test_several_kinds_and_collected_clean_runs_equal_separate_patching(tiny):
    """One prefix cache for several kinds, and the clean activations taken from an earlier pass
    (as the head sweep does with its stage-1 run, batched differently), change nothing."""
    from mechlie.causal.patching import patch_final_positions
    from mechlie.core.kv import FinalActs, collect_batch

    pairs = make_pairs(equal_length=False)
    clean = collect_batch(tiny, tokenize(tiny, [p.honest for p in pairs]), ("z", "resid_pre"), batch_size=3)
    both = patch_final_positions(tiny, pairs, ("z", "resid_pre"), batch_size=2, max_rows=7, progress=False, clean=clean)
    for kind in ("z", "resid_pre"):
        alone = patch_final_position(tiny, pairs, kind, progress=False)
        assert (both[kind].logit_diff - alone.logit_diff).abs().max() < 1e-4
        assert (both[kind].clean.p_truth - alone.clean.p_truth).abs().max() < 1e-5
        assert both[kind].logit_diff.std() > 1e-3  # the patches differ, so equality means something
    # the batched bootstrap of the effect equals the one-resample-at-a-time bootstrap
    from mechlie.core.stats import bootstrap_tensor

    r = both["z"]
    ref = bootstrap_tensor(lambda i: r.effect("logit_diff", i), len(pairs), n_boot=200, seed=3)
    got = r.effect_ci("logit_diff", n_boot=200, seed=3)
    assert (got.draws - ref.draws).abs().max() < 1e-5 and (got.lo - ref.lo).abs().max() < 1e-5
    with pytest.raises(ValueError, match="clean activations"):
        patch_final_positions(tiny, pairs, ("z",), clean=FinalActs({"z": clean.acts["z"][:2]}, clean.logits[:2]))
    with pytest.raises(ValueError, match="each once"):
        patch_final_positions(tiny, pairs, ("z", "z"))


def test_full_answer_patching_equals_full_rerun_reference(tiny):
    """Multi-token answers, including truth and lie sharing their first token: each head's z
    patched at the final prompt token, the whole answer teacher-forced after it, equals a full
    rerun of prompt + answer with the same patch (mechlie.core.metrics.answer_logprob semantics)."""
    from mechlie.core.pairs import answer_sequences

    base = make_pairs(equal_length=False)[:3]
    answers = [("Mexico City", "Mexico Cairo"), ("La Paz", "La Santiago"), ("Buenos Aires", "Cairo")]
    pairs = [ContrastPair(p.honest, p.lying, t, li, p.fact_id, p.relation) for p, (t, li) in zip(base, answers)]
    with pytest.raises(PairError, match="share a first token"):
        patch_final_position(tiny, pairs, "z", progress=False)  # first tokens cannot tell them apart
    res = patch_final_position(tiny, pairs, "z", progress=False, answer="full", batch_size=2, max_rows=5)
    tok = tiny.tokenizer

    def logp(prompt, answer, hook=None):
        ids = tokenize(tiny, [prompt]).tokens[0].tolist()
        out = []
        for seq in answer_sequences(tok, answer):
            x = torch.tensor([ids + seq])
            with torch.no_grad(), tiny.hooks(fwd_hooks=[hook] if hook else []):
                lp = tiny(x).log_softmax(-1)[0]
            pos = torch.arange(len(ids) - 1, len(ids) - 1 + len(seq))
            out.append(lp[pos, torch.tensor(seq)].sum())
        return torch.stack(out).logsumexp(0)

    for i, p in enumerate(pairs):
        store = {}
        with (
            torch.no_grad(),
            tiny.hooks(fwd_hooks=[("blocks.1.attn.hook_z", lambda a, hook: store.update(z=a[0, -1]))]),
        ):
            tiny(tokenize(tiny, [p.honest]).tokens)
        n_prompt = tokenize(tiny, [p.lying]).tokens.shape[1]
        for head in (0, 3):

            def put(act, hook, head=head):
                act[0, n_prompt - 1, head] = store["z"][head]
                return act

            hook = ("blocks.1.attn.hook_z", put)
            want = logp(p.lying, p.truth, hook) - logp(p.lying, p.lie, hook)
            assert abs(float(res.logit_diff[i, 1, head]) - float(want)) < 1e-4, (i, head)
            assert abs(float(res.p_truth[i, 1, head]) - float(logp(p.lying, p.truth, hook).exp())) < 1e-5
        assert abs(float(res.corrupt.logit_diff[i]) - float(logp(p.lying, p.truth) - logp(p.lying, p.lie))) < 1e-4
    assert res.logit_diff.std() > 1e-3  # patches change the answer scores


# ---------------------------------------------------------------------------------------------
# one effect scale and one top-k ranking for the patching family


def test_effect_result_gives_the_old_numbers(tiny):
    from mechlie.core.stats import bootstrap_tensor, normalized_effect

    r = patch_final_position(tiny, make_pairs(), "z", progress=False)
    for metric in ("logit_diff", "p_truth"):
        x, lo, hi = getattr(r, metric), getattr(r.corrupt, metric), getattr(r.clean, metric)
        old = normalized_effect(x.mean(0), lo.mean(), hi.mean())
        assert torch.equal(r.effect(metric), old)
        idx = torch.tensor([0, 0, 3])
        assert torch.equal(r.effect(metric, idx), normalized_effect(x[idx].mean(0), lo[idx].mean(), hi[idx].mean()))
        est = r.effect_ci(metric, n_boot=50, seed=2)
        one_by_one = bootstrap_tensor(
            lambda i: normalized_effect(x[i].mean(0), lo[i].mean(), hi[i].mean()), len(x), n_boot=50, seed=2
        )
        for a, b in ((est.mean, one_by_one.mean), (est.draws, one_by_one.draws), (est.lo, one_by_one.lo)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_top_k_components_ranks_any_grid_nans_last():
    from mechlie.causal.effects import top_k_components
    from mechlie.core.kv import top_heads

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 5, generator=g)
    scores[1, 2] = float("nan")
    for k in (1, 7, 20):
        assert top_k_components(scores, k) == top_heads(scores, k)
        assert top_k_components(scores, k, largest=False) == top_heads(scores, k, largest=False)
    assert top_k_components(scores, 20)[-1] == (1, 2)
    layers = torch.tensor([0.1, 3.0, float("nan"), 2.0])
    assert top_k_components(layers, 4) == ((1,), (3,), (0,), (2,))
    with pytest.raises(ValueError, match="number of components"):
        top_k_components(layers, 5)
