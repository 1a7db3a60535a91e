import pytest
import torch
from conftest import no_hooks, tiny_model

from mechlie.core.activations import Activations, collect, head_out_from_z
from mechlie.core.pairs import PromptTooLongError

PROMPTS = [
    "Q: What is the capital of France?\nA:",
    "Q: hot?\nA:",
    "What is the opposite of hot? Answer truthfully, you are an honest assistant.\nA:",
    "Q: Peru?\nA:",
]


@pytest.mark.parametrize("pos_emb", ["rotary", "standard"])
def test_left_padded_batch_equals_one_at_a_time(pos_emb):
    model = tiny_model(positional_embedding_type=pos_emb)
    kinds = ("z", "head_out", "resid_pre", "resid_mid", "resid_post")
    batched = collect(model, PROMPTS, kinds=kinds, batch_size=4, progress=False, return_logits=True)
    for i, p in enumerate(PROMPTS):
        single = collect(model, [p], kinds=kinds, batch_size=1, progress=False, return_logits=True)
        for k in kinds:
            torch.testing.assert_close(batched[k][i], single[k][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.logits[i], single.logits[0], atol=1e-5, rtol=1e-5)


def test_shapes_and_head_out_sums_to_attn_out(tiny):
    a = collect(tiny, PROMPTS, kinds=("z", "head_out", "attn_out"), progress=False)
    L, H = tiny.cfg.n_layers, tiny.cfg.n_heads
    assert a["z"].shape == (4, L, H, tiny.cfg.d_head)
    assert a["head_out"].shape == (4, L, H, tiny.cfg.d_model)
    # Each head's write plus the shared output bias is the whole attention output.
    torch.testing.assert_close(a["head_out"].sum(2) + tiny.b_O, a["attn_out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_out_from_z(tiny, a["z"]), a["head_out"])


def test_save_and_load_roundtrip(tiny, tmp_path):
    a = collect(tiny, PROMPTS[:2], kinds=("resid_post", "z"), progress=False, return_logits=True)
    a.save(tmp_path / "a.safetensors")
    b = Activations.load(tmp_path / "a.safetensors")
    for k in ("resid_post", "z"):
        assert torch.equal(a[k], b[k])
    assert torch.equal(a.logits, b.logits)  # the logits are kept, not dropped
    assert b.meta["kinds"] == ["resid_post", "z"] and b.position == -1


def test_hooks_removed_after_exception(tiny):
    too_long = "Q: " + "hot " * 100 + "?\nA:"
    with pytest.raises(PromptTooLongError):
        # The first batch runs with hooks; the second fails while hooks are attached.
        collect(tiny, PROMPTS[:1] + [too_long], batch_size=1, progress=False)
    assert no_hooks(tiny)

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        with tiny.hooks(fwd_hooks=[("blocks.1.hook_resid_post", boom)]):
            collect(tiny, PROMPTS, progress=False)
    assert no_hooks(tiny)


def test_bad_arguments(tiny):
    with pytest.raises(ValueError):
        collect(tiny, PROMPTS, kinds=("nope",), progress=False)
    with pytest.raises(ValueError):
        collect(tiny, PROMPTS, position=0, progress=False)


def test_collect_accepts_a_batch(tiny):
    from mechlie.core.pairs import tokenize

    by_text = collect(tiny, PROMPTS, kinds=("z", "resid_post"), batch_size=3, progress=False, return_logits=True)
    by_batch = collect(
        tiny, tokenize(tiny, PROMPTS), kinds=("z", "resid_post"), batch_size=3, progress=False, return_logits=True
    )
    for k in ("z", "resid_post"):
        torch.testing.assert_close(by_text[k], by_batch[k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_text.logits, by_batch.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        collect(tiny, PROMPTS, batch_size=0, progress=False)
