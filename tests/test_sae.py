"""mechlie.sae on tiny random models: sae-lens training, the cache, quality metrics, the
decomposition of a planted lie feature, FeatureClamp, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import no_hooks, tiny_model
from sae_lens import StandardSAE, StandardSAEConfig

import mechlie.sae as S
from mechlie.control.steering import steer
from mechlie.core.pairs import tokenize
from mechlie.sae import training

WORDS = "Q A What is the capital of France Paris Spain Madrid Italy Rome Japan Tokyo honest liar".split()


def word_texts(n: int, length: int = 20, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (length,), generator=g)) for _ in range(n)]


def exact_sae(d: int, *, seed: int = 0, mirrored: bool = True) -> StandardSAE:
    """A hand-set sae-lens SAE. ``mirrored``: decoder rows ±q_i of an orthonormal basis, so
    ReLU(x·q_i) q_i − ReLU(−x·q_i) q_i = x: a perfect reconstruction. Otherwise rows q_i only."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    rows = torch.cat([q.T, -q.T]) if mirrored else q.T
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=len(rows)))
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_sae_lens_training_reduces_loss_and_has_the_right_shape(tiny):
    site = S.Site("blocks.1.hook_resid_pre")
    acts = S.collect_site(tiny, word_texts(40), site, progress=False)
    assert acts.acts.shape[1] == tiny.cfg.d_model and len(acts.acts) == 40 * 19  # first token skipped
    cfg = S.SAETrainConfig(site=str(site), expansion=2, k=8, batch_size=64, n_steps=200, lr=3e-3)
    torch.manual_seed(cfg.seed)
    held = acts.acts[-100:]
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    untrained = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=32, d_sae=64, k=8))
    with torch.no_grad():
        untrained.b_dec.copy_(acts.acts[:-100].mean(0))
    trained = S.train_sae(acts.acts[:-100], cfg)
    assert trained.W_dec.shape == (2 * tiny.cfg.d_model, tiny.cfg.d_model)
    assert trained.W_enc.shape == (tiny.cfg.d_model, 2 * tiny.cfg.d_model)
    before, after = S.reconstruction_mse(untrained, held), S.reconstruction_mse(trained, held)
    assert after < 0.5 * before, (before, after)
    # FeatureClamp and the cosines use decoder_rows: what decode() adds per unit of activation
    # (TopK SAEs trained by sae-lens rescale by the decoder norm, so raw W_dec rows would be wrong).
    trained.eval()
    with torch.no_grad():
        f = trained.encode(held)
        assert torch.allclose(trained.decode(f), f @ S.decoder_rows(trained) + trained.b_dec, atol=1e-4)
        assert (S.decoder_rows(trained).norm(dim=-1) - trained.W_dec.norm(dim=-1)).abs().max() > 1e-2


def test_quality_metrics_of_a_perfect_and_a_null_sae(tiny):
    site = S.Site("blocks.1.hook_resid_pre")
    texts = word_texts(6, seed=1)
    perfect = exact_sae(tiny.cfg.d_model)
    q = S.sae_quality(tiny, perfect, site, texts, n_boot=50)
    assert q.explained_variance == pytest.approx(1.0, abs=1e-3)
    assert q.ce_sae == pytest.approx(q.ce_clean, abs=1e-3)
    assert q.ce_recovered == pytest.approx(1.0, abs=1e-2)
    assert q.l0 > 1 and q.n_tokens == 6 * 19 and q.n_lines == 6
    null = exact_sae(tiny.cfg.d_model)
    with torch.no_grad():
        null.W_dec.zero_()  # reconstructs 0: the same as zero-ablating the site
    qn = S.sae_quality(tiny, null, site, texts, n_boot=50)
    assert qn.ce_sae == pytest.approx(qn.ce_zero, abs=1e-3)
    assert qn.ce_recovered == pytest.approx(0.0, abs=1e-2)
    assert abs(qn.ce_zero - qn.ce_clean) > 0.01  # the site matters, so the ratio is meaningful
    assert no_hooks(tiny)


def test_quality_passes_from_the_stashed_residual_equal_full_forwards(tiny):
    """sae_qualities runs lines shortest first and starts the spliced passes at the first site's
    block; per line, unpadded, full forwards must give the same CEs."""
    g = torch.Generator().manual_seed(5)
    texts = [t[: int(n)] for t, n in zip(word_texts(7, length=30, seed=2), torch.randint(20, 140, (7,), generator=g))]
    sites = [S.Site("blocks.1.hook_resid_pre"), S.Site("blocks.1.attn.hook_z", 2)]
    saes = [exact_sae(tiny.cfg.d_model, mirrored=False, seed=1), exact_sae(tiny.cfg.d_head, mirrored=False, seed=2)]
    qs = S.sae_qualities(tiny, list(zip(saes, sites)), texts, batch_size=3, n_boot=50)

    def line_ce(text: str, hooks) -> float:
        toks = tokenize(tiny, [text]).tokens  # one line: no padding
        with tiny.hooks(fwd_hooks=hooks):
            lp = tiny(toks).log_softmax(-1)[0, :-1].gather(-1, toks[0, 1:, None])
        return float(-lp.mean())

    for (sae, site), q in zip(zip(saes, sites), qs):
        splice = lambda a, hook, sae=sae, site=site: site.write(a, sae.decode(sae.encode(site.read(a).float())))
        zero = lambda a, hook, site=site: site.write(a, torch.zeros_like(site.read(a)))
        with torch.no_grad():
            ref = {
                k: sum(line_ce(t, h) for t in texts) / len(texts)
                for k, h in (("clean", []), ("sae", [(site.hook_name, splice)]), ("zero", [(site.hook_name, zero)]))
            }
        assert abs(ref["sae"] - ref["clean"]) > 0.01 and abs(ref["zero"] - ref["clean"]) > 0.01  # the splices matter
        assert q.ce_clean == pytest.approx(ref["clean"], abs=1e-4)
        assert q.ce_sae == pytest.approx(ref["sae"], abs=1e-4)
        assert q.ce_zero == pytest.approx(ref["zero"], abs=1e-4)
    assert no_hooks(tiny)


def test_decomposition_recovers_a_planted_feature():
    d, n, planted = 16, 40, 7
    sae = exact_sae(d, mirrored=False, seed=3)
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(n, d, generator=g)
    lying = honest + 0.3 * torch.randn(n, d, generator=g) + 2.0 * sae.W_dec[planted].detach()
    hf, lf = S.encode(sae, honest), S.encode(sae, lying)
    train, test = list(range(0, n, 2)), list(range(1, n, 2))
    direction = lying[train].mean(0) - honest[train].mean(0)
    fe = S.feature_effects(hf, lf, direction, sae.W_dec.detach(), train, test, k=3, n_boot=200, n_null=200)
    assert int(fe.features[0]) == planted
    assert fe.lo[0] > 0.5 and fe.diff[0] > fe.null_max  # beats the within-pair swap null of the max
    assert fe.cosine[0] > 0.9 > fe.direction_cosine_max_null
    assert fe.rows()[0]["feature"] == planted and fe.n_test == len(test)
    with pytest.raises(S.SAEError, match="at least 2"):
        S.feature_effects(hf, lf, direction, sae.W_dec.detach(), [0], test)


def test_feature_clamp_sets_the_feature_and_keeps_the_rest(tiny):
    site = S.Site("blocks.1.hook_resid_pre")
    sae = exact_sae(tiny.cfg.d_model, mirrored=False)
    texts = word_texts(4, seed=2)
    base = S.final_acts(tiny, texts, site)
    f0 = S.encode(sae, base)
    feat = int(f0.min(0).values.argmax())  # the feature most active on every prompt
    assert (f0[:, feat] > 0).all()  # (an inactive feature's pre-activation is below 0: ReLU would not give 5)
    clamp = S.FeatureClamp(sae, site, (feat,), torch.tensor([5.0]))
    with steer(tiny, clamp):
        after = S.final_acts(tiny, texts, site)
    f1 = S.encode(sae, after)
    assert f1[:, feat] == pytest.approx(torch.full((4,), 5.0), abs=1e-3)
    others = torch.ones(f0.shape[1], dtype=torch.bool)
    others[feat] = False
    assert torch.allclose(f1[:, others], f0[:, others], atol=1e-4)  # the rest of x is untouched
    assert no_hooks(tiny)
    with steer(tiny, S.FeatureClamp(sae, site, (feat,))):  # ablation
        ablated = S.encode(sae, S.final_acts(tiny, texts, site))
    assert ablated[:, feat].abs().max() < 1e-4


def test_feature_clamp_scaled_random_control_and_sites(tiny):
    from mechlie.core.hooks import Site as CoreSite

    site = S.Site("blocks.1.hook_resid_pre")
    sae = exact_sae(tiny.cfg.d_model, mirrored=False)
    texts = word_texts(4, seed=2)
    f0 = S.encode(sae, S.final_acts(tiny, texts, site))
    feat = int(f0.min(0).values.argmax())
    clamp = S.FeatureClamp(sae, site, (feat,), torch.tensor([5.0]))
    assert clamp.alpha == 1.0 and clamp.scaled(0.5).alpha == 0.5 and clamp.scaled(0.5).features == (feat,)
    with steer(tiny, clamp.scaled(0.5)):  # half-way: rows are orthonormal, so f moves by alpha * (5 - f)
        half = S.encode(sae, S.final_acts(tiny, texts, site))
    assert half[:, feat] == pytest.approx((f0[:, feat] + 5.0) / 2, abs=1e-3)
    with steer(tiny, clamp.scaled(0.0)):
        assert torch.allclose(S.encode(sae, S.final_acts(tiny, texts, site)), f0, atol=1e-5)
    assert no_hooks(tiny)
    # random controls: the same count of other features, seeded; matched draws equal causal_check's first draw
    mean_act = f0.mean(0)
    two = S.FeatureClamp(sae, site, (feat, (feat + 1) % sae.cfg.d_sae))
    r = two.random_control(3)
    assert len(r.features) == 2 and not set(r.features) & set(two.features) and r == two.random_control(3)
    assert r.values is None and r.random_control(4).features != r.features
    m = two.random_control(1, mean_act=mean_act, values_of=mean_act + 1)
    assert m.features == S.matched_random_features(mean_act, two.features, 1, seed=1)[0]
    assert torch.equal(m.values, (mean_act + 1)[list(m.features)])
    # where it writes, as core Sites
    assert clamp.sites == (CoreSite("resid_pre", 1, positions="final"),) == clamp.sites_in(tiny)
    head = S.Site.parse("blocks.1.attn.hook_z:2")
    assert head.kind == "z" and head.core_sites() == (CoreSite("z", 1, 2),)
    all_heads = S.FeatureClamp(exact_sae(tiny.cfg.n_heads * tiny.cfg.d_head), S.Site("blocks.1.attn.hook_z"), (0,))
    assert [s.head for s in all_heads.sites_in(tiny)] == list(range(tiny.cfg.n_heads))
    with pytest.raises(S.SAEError, match="n_heads"):
        _ = all_heads.sites


def test_bad_sae_or_site_is_refused(tiny):
    wrong_width = exact_sae(tiny.cfg.d_model // 2)
    with pytest.raises(S.SAEError, match="width mismatch"):
        S.check_sae(wrong_width, tiny, S.Site("blocks.1.hook_resid_pre"))
    sae = exact_sae(tiny.cfg.d_model)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"
    with pytest.raises(S.SAEError, match="site mismatch"):
        S.check_sae(sae, tiny, S.Site("blocks.1.hook_resid_pre"))
    with pytest.raises(S.SAEError, match="no hook"):
        S.Site("blocks.9.hook_resid_pre").validate(tiny)
    with pytest.raises(S.SAEError, match="head 7 out of range"):
        S.Site.parse("blocks.1.attn.hook_z:7").validate(tiny)
    with pytest.raises(S.SAEError, match="only meaningful"):
        S.Site("blocks.1.hook_resid_pre", head=0).validate(tiny)
    with pytest.raises(S.SAEError, match="out of range"):
        with steer(tiny, S.FeatureClamp(exact_sae(tiny.cfg.d_model), S.Site("blocks.1.hook_resid_pre"), (10_000,))):
            pass
    assert no_hooks(tiny)
    with pytest.raises(S.SAEError, match="no cfg.json"):
        S.load_sae(tiny_dir := __import__("tempfile").mkdtemp())
    with pytest.raises(S.SAEError, match="sae_id"):
        S.load_sae(tiny_dir + "/missing")
    with pytest.raises(ValueError, match="eval_frac"):
        S.SAETrainConfig(eval_frac=1.5)


def test_head_site_reads_and_writes_one_head(tiny):
    site = S.Site.parse("blocks.1.attn.hook_z:2")
    assert site.d_in(tiny) == tiny.cfg.d_head and site.layer == 1
    z = torch.randn(2, 3, tiny.cfg.n_heads, tiny.cfg.d_head)
    new = torch.zeros(2, 3, tiny.cfg.d_head)
    out = site.write(z.clone(), new)
    assert out[:, :, 2].abs().max() == 0 and torch.equal(out[:, :, 1], z[:, :, 1])
    assert S.Site("blocks.1.attn.hook_z").read(z).shape == (2, 3, tiny.cfg.n_heads * tiny.cfg.d_head)


def test_load_or_train_caches_once(tmp_path, monkeypatch):
    model = tiny_model(n_ctx=128)
    cfg = S.SAETrainConfig(
        site="blocks.1.attn.hook_z:1",
        expansion=2,
        k=4,
        n_steps=30,
        batch_size=32,
        pairs_per_format=2,
        n_samples=4,
        sample_tokens=6,
    )
    first = S.load_or_train_sae(model, cfg, cache_dir=tmp_path, progress=False)
    assert first.sae.cfg.d_in == model.cfg.d_head and first.site == S.Site("blocks.1.attn.hook_z", 1)
    assert {p.name for p in first.path.iterdir()} == {
        "cfg.json",
        "sae_weights.safetensors",
        "mechlie.json",
        "corpus.json",
    }
    assert set(first.info["corpus"]) == {"pairs", "neutral", "samples"}
    assert 0 < first.info["quality"]["l0"] <= cfg.k + 1e-6
    assert not [p for p in (tmp_path / "sae").iterdir() if p.name.startswith(".")]  # no temp folder left

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(training, "train_sae", no_training)
    again = S.load_or_train_sae(model, cfg, cache_dir=tmp_path, progress=False)
    assert again.path == first.path and torch.equal(again.sae.W_dec, first.sae.W_dec)
    assert again.corpus == first.corpus
    other = tiny_model(n_ctx=128, seed=1)  # other weights: another key, so it would train
    with pytest.raises(AssertionError, match="trained again"):
        S.load_or_train_sae(other, cfg, cache_dir=tmp_path, progress=False)


@pytest.mark.parametrize(
    ("spec", "mode"),
    [("blocks.1.hook_resid_pre", "clamp"), ("blocks.1.hook_resid_pre", "ablate"), ("blocks.1.attn.hook_z:1", "clamp")],
)
def test_batched_causal_check_equals_one_feature_clamp_per_draw(tiny, spec, mode):
    # causal_check runs every draw as rows of a few short passes over cached prefixes; each draw's
    # ΔP(truth) must equal FeatureClamp applied through steer() on full forward passes.
    from steer_fixtures import COUNTRIES

    from mechlie.core.metrics import score_logits
    from mechlie.core.pairs import Fact, answer_set, pairs_from_facts
    from mechlie.studies.steering_eval import batches, last_logits

    facts = [Fact(f"What is the capital of {c} ?", a, fact_id=c) for c, a in COUNTRIES]
    pairs = pairs_from_facts(facts[:5], facts[5:], "fewshot", relation="capitals", tokenizer=tiny.tokenizer, n_shots=2)
    pairs += pairs_from_facts(facts[:4], facts[4:], "fewshot", relation="capitals", tokenizer=tiny.tokenizer, n_shots=3)
    site = S.Site.parse(spec)
    sae = exact_sae(site.d_in(tiny), seed=3)
    f_l = S.encode(sae, S.final_acts(tiny, [p.lying for p in pairs], site))
    f_h = S.encode(sae, S.final_acts(tiny, [p.honest for p in pairs], site))
    # (clamp targets well away from the features' values, so that every draw moves P(truth))
    lying_mean, honest_mean = f_l.mean(0), f_h.mean(0) + 10.0
    top = tuple(int(f) for f in lying_mean.argsort(descending=True)[:2])
    kw = dict(mode=mode, lying_mean=lying_mean, honest_mean=honest_mean, n_draws=7, seed=1)
    got = S.causal_check(tiny, sae, site, pairs, top, max_rows=10, batch_size=2, **kw)  # many chunks and caches
    # The prompts run once for many checks (here in groups of 8) give the same numbers; other pairs are refused.
    shared = S.lying_prompts(tiny, pairs, batch_size=1)
    assert len(shared.groups) == -(-len(pairs) // 8) > 1
    again = S.causal_check(tiny, sae, site, pairs, top, max_rows=10, prompts=shared, **kw)
    # (other prompt groups pad differently: equal up to float noise, far below the draws' effects of >= 2e-4)
    assert again.random_deltas == pytest.approx(got.random_deltas, abs=2e-5)
    assert again.delta == pytest.approx(got.delta, abs=2e-5)
    assert again.gap_recovered == pytest.approx(got.gap_recovered, rel=1e-3)  # a ratio, as checked below
    with pytest.raises(S.SAEError, match="other pairs"):
        S.causal_check(tiny, sae, site, pairs[1:], top, prompts=shared, **kw)

    answers = answer_set(tiny.tokenizer, pairs)
    bs = batches(tiny, [p.lying for p in pairs], 4)

    def p_truth(feats=None):
        ivs = []
        if feats is not None:
            vals = honest_mean[list(feats)] if mode == "clamp" else None
            ivs = [S.FeatureClamp(sae, site, tuple(feats), vals)]
        return score_logits(last_logits(tiny, bs, ivs), answers).p_truth

    base = p_truth()
    # Tolerances: float noise is ~1e-7 here; the largest draw effect is >= 5e-4 (one head of a random model).
    assert got.p_truth_base == pytest.approx(float(base.mean()), abs=2e-5)
    assert got.delta == pytest.approx(float((p_truth(top) - base).mean()), abs=2e-5)
    draws = S.matched_random_features(lying_mean, top, 7, seed=1)
    want = [float((p_truth(d) - base).mean()) for d in draws]
    assert got.random_deltas == pytest.approx(want, abs=2e-5)
    assert max(abs(w) for w in want) > 2e-4  # the draws really change P(truth)
    assert len(got.random_deltas) == 7 and got.n_pairs == len(pairs)
    # The share of the honest-lying gap: delta over the gap of the same pairs, with a CI from resampled pairs.
    p_honest = score_logits(last_logits(tiny, batches(tiny, [p.honest for p in pairs], 4), []), answers).p_truth
    assert got.gap_recovered == pytest.approx(got.delta / float(p_honest.mean() - base.mean()), rel=1e-3)
    assert got.gap_recovered_lo < got.gap_recovered < got.gap_recovered_hi
    assert no_hooks(tiny)


def test_on_policy_effects_recover_a_planted_lie_feature():
    # 16 pairs, each with 3 sampled lies and 3 truths; lies carry +3 along decoder row 5 of an
    # exact SAE (rows = an orthonormal basis, so feature i is ReLU(x · q_i)).
    d, n_pairs = 16, 16
    sae = exact_sae(d, mirrored=False, seed=4)
    q = sae.W_dec.detach()
    g = torch.Generator().manual_seed(0)
    pair = torch.arange(n_pairs).repeat_interleave(6)
    lie = torch.tensor([True, True, True, False, False, False] * n_pairs)
    acts = 0.3 * torch.randn(len(pair), d, generator=g) + 2.0 * q[5] + 3.0 * lie[:, None].float() * q[5]
    rows = S.OnPolicySiteActs(acts, lie, pair)
    train, test = list(range(0, 16, 2)), list(range(1, 16, 2))
    res = S.on_policy_effects(sae, rows, train, test, framing_features=[5, 7], k=3, n_boot=200)
    assert res["n_lie"] == 48 and res["n_pairs_with_both"] == 16 and res["n_test"] == 8
    top = res["features"][0]
    assert top["feature"] == 5 and top["diff"] == pytest.approx(3.0, abs=0.5) and top["lo"] > res["null_max_diff"]
    fr = {r["feature"]: r for r in res["framing_features"]}
    assert fr[5]["lo"] > 2.0 and fr[7]["hi"] < 1.0  # the planted feature, and one that is not
    # Pairs whose samples are all lies (or all truths) are not units; too few units: counts only.
    few = S.OnPolicySiteActs(acts[:24], lie[:24], pair[:24])
    res = S.on_policy_effects(sae, few, train, test, k=3)
    assert res["n_pairs_with_both"] == 4 and "features" not in res and "only 2 train / 2 test" in res["too_few"]
    one_sided = S.OnPolicySiteActs(acts[lie], lie[lie], pair[lie])
    assert S.on_policy_effects(sae, one_sided, train, test)["n_pairs_with_both"] == 0


def test_on_policy_site_acts_are_the_first_answer_token_states(tiny):
    from mechlie.core.pairs import ContrastPair, tokenize
    from mechlie.read.labels import generate_with_states, on_policy

    honest = ["Q capital of France ? A :", "Q capital of Peru ? A :", "Q capital of Cuba ? A :"]
    # The random model "knows" whatever it answers greedily when honest; use that as the truth.
    first = generate_with_states(tiny, honest, max_new_tokens=2, eos_token_id=None).texts
    pairs = [
        ContrastPair(h, "Q liar " + h[2:], t.split()[0], None, f"f{i}") for i, (h, t) in enumerate(zip(honest, first))
    ]
    resid, head = S.Site("blocks.1.hook_resid_pre"), S.Site.parse("blocks.1.attn.hook_z:2")
    assert S.site_kind(resid) == "resid_pre" and S.site_kind(head) == "z"
    op = on_policy(tiny, pairs, k=12, temperature=0.5, max_new_tokens=2, kinds=["resid_pre", "z"], layers=[1])
    r = S.on_policy_site_acts(op, resid)
    X, y, _ = op.rows("within_prompt", kind="resid_pre")  # detect's own rows: the same states and labels
    assert torch.allclose(r.acts, X[:, 0]) and r.lie.float().tolist() == y.tolist()
    assert len(r.lie) == 36 and 0 < int(r.lie.sum()) < 36 and r.pair.tolist()[:12] == [0] * 12
    z = S.on_policy_site_acts(op, head)
    assert z.acts.shape == (len(r.lie), tiny.cfg.d_head)
    # Row 13 (pair 1): the lying prompt plus its first sampled token, run whole; z of head 2 there.
    tok = int(op.samples.tokens[13, 0])
    b = tokenize(tiny, [pairs[1].lying])
    full = torch.cat([b.tokens, torch.tensor([[tok]])], 1)
    _, cache = tiny.run_with_cache(full, names_filter="blocks.1.attn.hook_z")
    assert torch.allclose(z.acts[13], cache["blocks.1.attn.hook_z"][0, -1, 2], atol=1e-4)
    with pytest.raises(S.SAEError, match="no resid_pre at layer 2"):
        S.on_policy_site_acts(op, S.Site("blocks.2.hook_resid_pre"))
