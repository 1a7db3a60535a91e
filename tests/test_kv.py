"""The KV-cache runner equals TransformerLens's full forward, on every path and model shape."""

import pytest
import torch
from conftest import no_hooks
from tiny_models import random_batch, tiny_model

from mechlie.core.activations import hook_name
from mechlie.core.kv import collect_batch, fast_path_supported, final_tokens, prefix_cache, run_rows, top_heads
from mechlie.core.pairs import Batch


def _left_padded(seed: int = 0) -> Batch:
    """Three prompts of lengths 9, 6 and 7, left-padded to 9."""
    b = random_batch(3, 9, seed=seed)
    mask = torch.ones_like(b.tokens)
    mask[1, :3] = 0
    mask[2, :2] = 0
    return Batch(b.tokens.masked_fill(mask == 0, 0), mask)


def _full(model, batch: Batch, rows: torch.Tensor, extra: torch.Tensor | None = None, hooks=()):
    """Reference: each row's whole prompt (plus extra tokens) through the plain forward."""
    toks = batch.tokens[rows]
    mask = batch.attention_mask[rows]
    if extra is not None:
        toks = torch.cat([toks, extra], 1)
        mask = torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        return model(toks, attention_mask=mask)


MODELS = {
    "mha-ln-mlp": dict(attn_only=False),
    "gqa-attn-only": dict(n_key_value_heads=2),
    "linear": dict(linear=True),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fast", [True, False])
def test_rows_equal_full_forward(name, fast):
    model = tiny_model(**MODELS[name], seed=1)
    assert fast_path_supported(model)
    batch = _left_padded()
    cache = prefix_cache(model, batch)
    rows = torch.tensor([2, 0, 0, 1, 2])
    got = run_rows(model, cache, rows, final_tokens(batch)[rows], fast=fast)
    ref = _full(model, batch, rows)[:, -1:]
    assert (got - ref).abs().max() < 1e-4
    # several new tokens per row (final token + teacher-forced answer tokens)
    extra = torch.tensor([[7, 8], [9, 10], [11, 12], [13, 14], [15, 16]])
    toks = torch.cat([final_tokens(batch)[rows], extra], 1)
    got = run_rows(model, cache, rows, toks, fast=fast)
    ref = _full(model, batch, rows, extra)[:, -3:]
    assert (got - ref).abs().max() < 1e-4
    assert ref.std() > 1e-2
    assert no_hooks(model)


def test_local_attention_takes_the_fast_path_within_its_window():
    """Gemma 3's shape (sliding-window layers with their own rotary base, QK-norm): rows whose whole
    sequence fits in the window take the shared-prefix path and equal the full forward; longer ones
    are refused on that path and go through TransformerLens's own cached forward."""
    local = dict(
        attn_types=["local", "global"],
        use_local_attn=True,
        use_qk_norm=True,
        rotary_base_local=100,
        n_key_value_heads=2,
        normalization="RMS",
    )
    batch = _left_padded()  # 9 prompt tokens, + 1 or + 3 new ones
    rows = torch.tensor([2, 0, 1])
    for window, fast_ok in ((12, True), (10, False)):
        model = tiny_model(**local, window_size=window, seed=6)
        assert not fast_path_supported(model)  # no length given: local layers are not assumed global
        assert fast_path_supported(model, 10) and fast_path_supported(model, 12) == fast_ok
        cache = prefix_cache(model, batch)
        extra = torch.tensor([[7, 8], [9, 10], [11, 12]])
        toks = torch.cat([final_tokens(batch)[rows], extra], 1)
        ref = _full(model, batch, rows, extra)[:, -3:]
        if fast_ok:
            got = run_rows(model, cache, rows, toks, fast=True)
            assert (got - ref).abs().max() < 1e-4
        else:
            with pytest.raises(ValueError, match="local attention window"):
                run_rows(model, cache, rows, toks, fast=True)
        assert (run_rows(model, cache, rows, toks) - ref).abs().max() < 1e-4
        assert ref.std() > 1e-2
    # the window matters: a model whose window is shorter than the prompt gives other logits
    short = tiny_model(**local, window_size=4, seed=6)
    full = _full(short, batch, rows)[:, -1:]
    assert (full - _full(tiny_model(**local, window_size=12, seed=6), batch, rows)[:, -1:]).abs().max() > 1e-3


@pytest.mark.parametrize("fast", [True, False])
def test_per_row_hooks_and_start_layers(fast):
    """Row r patches head r of layer start[r]; skipping the blocks below start changes nothing."""
    model = tiny_model(attn_only=False, n_layers=3, seed=2)
    batch = _left_padded(seed=3)
    cache = prefix_cache(model, batch)
    rows = torch.tensor([0, 1, 0, 2, 1, 0])
    start = torch.tensor([0, 0, 1, 1, 2, 2])
    heads = torch.tensor([1, 3, 0, 2, 1, 3])
    value = torch.linspace(-2, 2, 8)

    def hooks_for(row_ids):
        hs = []
        for layer in range(3):
            sel = (start == layer).nonzero().squeeze(1)

            def hook(act, hook, sel=sel):
                act[row_ids[sel], -1, heads[sel]] = value
                return act

            hs.append((hook_name("z", layer), hook))
        return hs

    got = run_rows(
        model,
        cache,
        rows,
        final_tokens(batch)[rows],
        fwd_hooks=hooks_for(torch.arange(6)),
        start_layers=start,
        fast=fast,
    )
    ref = _full(model, batch, rows, hooks=hooks_for(torch.arange(6)))[:, -1:]
    assert (got - ref).abs().max() < 1e-4
    plain = _full(model, batch, rows)[:, -1:]
    assert (ref - plain).abs().amax(dim=(1, 2)).min() > 1e-3  # every row's patch does something
    assert no_hooks(model)


def test_truncated_prefix_reruns_the_suffix():
    model = tiny_model(attn_only=False, seed=4)
    batch = random_batch(2, 8, seed=5)
    cache = prefix_cache(model, batch)
    for p in (0, 3, 7):
        rows = torch.tensor([1, 0])
        got = run_rows(model, cache.truncate(p), rows, batch.tokens[rows, p:])
        ref = _full(model, batch, rows)[:, p:]
        assert (got - ref).abs().max() < 1e-4


def test_collect_batch_and_top_heads():
    model = tiny_model(attn_only=False, seed=5)
    batch = _left_padded()
    acts = collect_batch(model, batch, ("z", "head_out", "resid_post"), batch_size=2)
    assert acts.acts["z"].shape == (3, 2, 4, 8)
    assert acts.acts["head_out"].shape == (3, 2, 4, 32)
    ref = _full(model, batch, torch.arange(3))[:, -1]
    assert (acts.logits - ref).abs().max() < 1e-4
    # Slices are formed by length (6, 7 | 9), yet every row comes back in the caller's order.
    for i in range(3):
        one = collect_batch(model, Batch(batch.tokens[i : i + 1], batch.attention_mask[i : i + 1]), ("resid_post",))
        assert (one.acts["resid_post"][0] - acts.acts["resid_post"][i]).abs().max() < 1e-4
    scores = torch.tensor([[0.1, 0.9, float("nan")], [0.5, -1.0, 0.7]])
    assert top_heads(scores, 3) == ((0, 1), (1, 2), (1, 0))
    assert top_heads(scores, 1, largest=False) == ((1, 1),)
    with pytest.raises(ValueError, match="k must be"):
        top_heads(scores, 7)
    with pytest.raises(ValueError, match="unknown"):
        collect_batch(model, batch, ("nope",))


def test_bad_rows():
    model = tiny_model()
    batch = random_batch(2, 5)
    cache = prefix_cache(model, batch)
    with pytest.raises(ValueError, match="prompt indices"):
        run_rows(model, cache, torch.tensor([2]), batch.tokens[:1, -1:])
    with pytest.raises(ValueError, match="sorted"):
        run_rows(model, cache, torch.tensor([0, 1]), batch.tokens[:, -1:], start_layers=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="own tokens|prompt's tokens"):
        run_rows(model, cache, torch.tensor([0, 0]), torch.tensor([[5], [6]]), start_layers=torch.tensor([0, 1]))


@pytest.mark.slow
def test_real_model_rows_and_patches_equal_full_forward(smol):
    """SmolLM2 (grouped-query attention, rotary, RMSNorm): rows over the cached prefix, with a
    per-row head patch and skipped blocks, equal full forward passes."""
    from mechlie.core.pairs import load_builtin, tokenize

    pairs = load_builtin("capitals", "fewshot", tokenizer=smol.tokenizer, n=3)
    batch = tokenize(smol, [p.lying for p in pairs])
    cache = prefix_cache(smol, batch)
    rows = torch.tensor([0, 1, 2, 1])
    start = torch.tensor([0, 5, 20, 29])
    value = torch.full((smol.cfg.d_head,), 0.5)

    def hooks(row_ids):
        return [
            (hook_name("z", int(layer)), lambda a, hook, r=int(r): a.__setitem__((r, -1, 3), value) or a)
            for r, layer in zip(row_ids, start)
        ]

    got = run_rows(smol, cache, rows, final_tokens(batch)[rows], fwd_hooks=hooks(range(4)), start_layers=start)
    ref = _full(smol, batch, rows, hooks=hooks(range(4)))[:, -1:]
    assert (got - ref).abs().max() < 1e-3  # logits of size ~20: float32 noise is ~1e-5
    plain = _full(smol, batch, rows)[:, -1:]
    assert (ref - plain).abs().amax(dim=(1, 2)).min() > 1e-2
