"""mechlie.sae on tiny random models: sae-lens training, the cache, quality metrics, the
decomposition of a planted lie feature, FeatureClamp, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import no_hooks, tiny_model
from sae_lens import StandardSAE, StandardSAEConfig

from mechlie import sae as S
from mechlie.steering import steer

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

    monkeypatch.setattr(S, "train_sae", no_training)
    again = S.load_or_train_sae(model, cfg, cache_dir=tmp_path, progress=False)
    assert again.path == first.path and torch.equal(again.sae.W_dec, first.sae.W_dec)
    assert again.corpus == first.corpus
    other = tiny_model(n_ctx=128, seed=1)  # other weights: another key, so it would train
    with pytest.raises(AssertionError, match="trained again"):
        S.load_or_train_sae(other, cfg, cache_dir=tmp_path, progress=False)
