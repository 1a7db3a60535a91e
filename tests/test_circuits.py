"""Joint patching, top-k curves and the minimal set, path patching: against direct references."""

import pytest
import torch
from conftest import no_hooks, tiny_model
from test_patching import make_pairs
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechlie.causal.circuits import Sender, joint_patch, k_grid, minimal_k, path_patch, receiver_positions, topk_curve
from mechlie.causal.patching import patch_runs
from mechlie.core.metrics import score_logits
from mechlie.core.pairs import ContrastPair, PairError, answer_set, tokenize

QS = ["France", "Spain", "Italy", "Japan", "Peru", "Chile", "Egypt", "Kenya"]
ANS = ["Paris", "Madrid", "Rome", "Tokyo", "Lima", "Santiago", "Cairo", "Nairobi"]


def many_pairs() -> list[ContrastPair]:
    return [
        ContrastPair(
            honest=f"Answer truthfully. Q: What is the capital of {q} ?\nA:",
            lying=f"Answer you are a liar lie. Q: What is the capital of {q} ?\nA:",
            truth=a,
            lie=ANS[(i + 1) % len(ANS)],
            fact_id=q,
            relation="custom",
        )
        for i, (q, a) in enumerate(zip(QS, ANS))
    ]


@pytest.mark.parametrize("direction", ["restore", "induce"])
def test_joint_patching_of_a_layer_equals_attn_out_and_one_head_equals_single(direction):
    model = tiny_model(seed=7)
    pairs = make_pairs()
    H = model.cfg.n_heads
    layer = 1
    res = joint_patch(
        model, pairs, [[(layer, h) for h in range(H)], [(2, 3)], [(0, 1)]], direction=direction, progress=False
    )
    honest, lying = [p.honest for p in pairs], [p.lying for p in pairs]
    src, tgt = (honest, lying) if direction == "restore" else (lying, honest)
    ans = answer_set(model.tokenizer, pairs)
    # All heads of a layer: the attention output is sum_h z_h W_O[h] + b_O, and b_O is the same
    # in both runs, so patching every head's z equals patching attn_out.
    attn = patch_runs(model, src, tgt, ans, "attn_out", progress=False)
    assert (res.logit_diff[:, 0] - attn.logit_diff[:, layer]).abs().max() < 1e-4
    single = patch_runs(model, src, tgt, ans, "z", progress=False)
    assert (res.logit_diff[:, 1] - single.logit_diff[:, 2, 3]).abs().max() < 1e-4
    assert (res.logit_diff[:, 2] - single.logit_diff[:, 0, 1]).abs().max() < 1e-4
    assert (res.logit_diff[:, 0] - res.target.logit_diff).abs().max() > 1e-3  # the layer matters at all
    assert (res.target.logit_diff - single.corrupt.logit_diff).abs().max() < 1e-4
    assert no_hooks(model)


def _planted(seed: int = 0):
    """Attention-only model whose heads write nothing except (1, 2): only it carries the framing."""
    model = tiny_model(seed=seed, attn_only=True, n_layers=2)
    with torch.no_grad():
        for layer in range(2):
            for h in range(model.cfg.n_heads):
                if (layer, h) != (1, 2):
                    model.blocks[layer].attn.W_O[h] = 0.0
        model.blocks[1].attn.W_O[2] *= 20.0
    return model


def test_minimal_set_is_exact_with_a_planted_head():
    model = _planted()
    pairs = many_pairs()
    curve = topk_curve(model, pairs[:3], pairs[3:], ks=[1, 2, 8], n_random=20, n_boot=200, progress=False)
    gap = (curve.top[0].mean, curve.train_effect[1, 2].item())
    assert curve.ranking[0] == (1, 2)
    assert abs(gap[0] - 1.0) < 1e-3 and abs(gap[1] - 1.0) < 1e-3  # the planted head alone restores everything
    assert curve.minimal_k == 1 and curve.minimal_set == ((1, 2),)
    assert curve.minimal_k_ci == (1.0, 1.0)
    assert curve.minimal_share == pytest.approx(1 / 8)
    assert (curve.all_k_effect - 1.0).abs().max() < 1e-3  # every top-k set contains it
    # random 1-sets contain the planted head 1 time in 8: their mean is far below 1
    assert curve.random_mean[0] < 0.6 and curve.random_effects[0].max() > 0.99
    assert curve.random_mean[2] > 0.99  # all 8 heads
    assert curve.summary()["minimal_k"] == 1
    assert k_grid(8) == (1, 2, 4, 8) and k_grid(5) == (1, 2, 4, 5)
    assert minimal_k(torch.tensor([0.1, 0.5, 0.85, 0.9]), 0.8) == 3 and minimal_k(torch.tensor([0.1]), 0.8) is None


def test_minimal_set_search_equals_brute_force_over_every_k():
    """The curve searches k only up to the first curve k every resample has crossed; the minimal k
    and its CI must equal a search over every k = 1..all heads (same resamples)."""
    from mechlie.core.stats import bootstrap_draws

    model = tiny_model(seed=2, attn_only=True, n_layers=2)
    with torch.no_grad():  # three heads write (strongly), the rest nothing: a curve that climbs
        for layer in range(2):
            for h in range(model.cfg.n_heads):
                model.blocks[layer].attn.W_O[h] *= 10.0 if (layer, h) in ((1, 2), (0, 1), (1, 0)) else 0.0
    pairs = many_pairs()
    train, test = pairs[:3], pairs[3:]
    curve = topk_curve(model, train, test, n_random=3, n_boot=100, threshold=0.8, progress=False)
    N = model.cfg.n_layers * model.cfg.n_heads
    full = joint_patch(model, test, [curve.ranking[:k] for k in range(1, N + 1)], progress=False)
    eff = full.effect()
    assert curve.minimal_k == minimal_k(eff, 0.8) == 2
    draws = bootstrap_draws(lambda i: full.effect("logit_diff", i), 5, n_boot=100)
    kd = torch.tensor([float(minimal_k(d, 0.8) or N + 1) for d in draws])
    assert curve.minimal_k_ci == pytest.approx(tuple(torch.quantile(kd, torch.tensor([0.025, 0.975])).tolist()))
    assert curve.minimal_k_ci[0] < curve.minimal_k_ci[1]  # resamples disagree: the CI is not trivial
    k_all = len(curve.all_k_effect)
    assert k_all < N  # the search stopped early, and still agrees with every k
    assert (curve.all_k_effect - eff[:k_all]).abs().max() < 1e-4
    assert [e.mean for e in curve.top] == pytest.approx([float(eff[k - 1]) for k in curve.ks], abs=1e-4)
    # identical sets (in any order) run once and give identical columns
    sets = [[(0, 1), (1, 2)], [(1, 2), (0, 1)], [(1, 0)]]
    res = joint_patch(model, test, sets, progress=False)
    assert torch.equal(res.logit_diff[:, 0], res.logit_diff[:, 1]) and len(res.sets) == 3
    assert (
        res.logit_diff[:, 2] - joint_patch(model, test, sets[2:], progress=False).logit_diff[:, 0]
    ).abs().max() < 1e-5


def _split_twin(model: HookedTransformer) -> HookedTransformer:
    """The same weights, with use_split_qkv_input so each head's q/k/v input can be hooked."""
    cfg = HookedTransformerConfig(**{**model.cfg.to_dict(), "use_split_qkv_input": True})
    twin = HookedTransformer(cfg)
    twin.load_state_dict(model.state_dict(), strict=False)
    twin.tokenizer = model.tokenizer
    twin.eval()
    return twin


def _reference_path(model, twin, pair, sender: Sender, receiver, channel, kv_group: int):
    """Direct full reruns: (1) honest and lying runs give the sender's output change; (2) the lying
    run with the receiver's ``channel`` input moved by it gives the receiver layer's final z;
    (3) the lying run with that z patched at the final position gives the answer."""
    ht, lt = tokenize(model, [pair.honest]).tokens, tokenize(model, [pair.lying]).tokens
    assert ht.shape == lt.shape
    lr, hr = receiver
    name = f"blocks.{sender.layer}.attn.hook_z" if sender.kind == "head" else f"blocks.{sender.layer}.hook_mlp_out"
    outs = {}
    for key, toks in (("h", ht), ("l", lt)):
        with (
            torch.no_grad(),
            model.hooks(fwd_hooks=[(name, lambda a, hook, key=key: outs.update({key: a[0].clone()}))]),
        ):
            model(toks)
    if sender.kind == "head":
        w = model.blocks[sender.layer].attn.W_O[sender.head]
        delta = outs["h"][:, sender.head] @ w - outs["l"][:, sender.head] @ w
    else:
        delta = outs["h"] - outs["l"]
    idx = hr if channel == "q" else hr // kv_group

    def move(act, hook):
        act[0, :, idx] += delta
        return act

    z = {}
    with (
        torch.no_grad(),
        twin.hooks(
            fwd_hooks=[
                (f"blocks.{lr}.hook_{channel}_input", move),
                (f"blocks.{lr}.attn.hook_z", lambda a, hook: z.update(z=a[0, -1].clone())),
            ]
        ),
    ):
        twin(lt)

    def put(act, hook):
        act[0, -1] = z["z"]
        return act

    with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{lr}.attn.hook_z", put)]):
        return score_logits(model(lt)[:, -1], answer_set(model.tokenizer, [pair])).logit_diff[0]


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_path_patching_equals_full_rerun_reference(kv_heads):
    model = tiny_model(seed=11, n_key_value_heads=kv_heads)
    twin = _split_twin(model)
    pairs = make_pairs()[:2]
    receiver = (2, 1)
    senders = [Sender("head", 0, 3), Sender("head", 1, 0), Sender("mlp", 1), Sender("mlp", 0)]
    res = path_patch(model, pairs, receiver, senders=senders, progress=False)
    g = model.cfg.n_heads // (kv_heads or model.cfg.n_heads)
    for i, pair in enumerate(pairs):
        for s, sender in enumerate(senders):
            for c, ch in enumerate(("q", "k", "v")):
                want = _reference_path(model, twin, pair, sender, receiver, ch, g)
                assert abs(float(res.logit_diff[i, s, c]) - float(want)) < 1e-5, (i, sender, ch)
    assert (res.logit_diff - res.target.logit_diff[:, None, None]).abs().max() > 1e-3  # paths do something
    assert (res.note != "") == (kv_heads is not None)
    assert res.effect().shape == (4, 3)
    assert no_hooks(model)


def test_receiver_positions_marks_differing_tokens():
    model = tiny_model(seed=5)
    pairs = make_pairs()[:2]
    res = receiver_positions(model, pairs, (2, 0), progress=False)
    n_tok = tokenize(model, [pairs[0].honest]).tokens.shape[1]
    assert res.offsets == tuple(range(-n_tok, 0))
    # positions where the prompts agree carry the same residual below the first difference
    first = int(res.differs[0].nonzero()[0, 0])
    assert (res.logit_diff[:, :first] - res.target.logit_diff[:, None]).abs().max() < 1e-4
    assert res.differs[0].sum() >= 1
    assert torch.allclose(res.attention.sum(1), torch.ones(2), atol=1e-4)


def test_bad_input():
    model = tiny_model()
    pairs = make_pairs()
    with pytest.raises(ValueError, match="unknown head"):
        joint_patch(model, pairs, [[(0, 9)]], progress=False)
    with pytest.raises(ValueError, match="empty"):
        joint_patch(model, pairs, [[]], progress=False)
    with pytest.raises(ValueError, match="direction"):
        joint_patch(model, pairs, [[(0, 1)]], direction="sideways", progress=False)
    with pytest.raises(PairError):
        joint_patch(model, [], [[(0, 1)]], progress=False)
    with pytest.raises(ValueError, match="not before the receiver"):
        path_patch(model, pairs, (1, 0), senders=[Sender("head", 2, 0)], progress=False)
    with pytest.raises(ValueError, match="block 0"):
        path_patch(model, pairs, (0, 0), progress=False)
    with pytest.raises(ValueError, match="unknown head"):
        path_patch(model, pairs, (1, 7), progress=False)
    with pytest.raises(ValueError, match="channels"):
        path_patch(model, pairs, (1, 0), channels=("x",), progress=False)
    many = many_pairs()
    with pytest.raises(ValueError, match="number of heads"):
        topk_curve(model, many[:3], many[3:], ks=[1, 13], progress=False)
    with pytest.raises(PairError, match="both"):
        topk_curve(model, many[:3], many[2:], progress=False)


def _script(name: str):
    """The analyses/ launcher ``name`` as a module (it names its study: ``STUDY``)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "analyses" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_localise_script_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    import json

    import mechlie.core.kv
    import mechlie.core.pairs

    model = tiny_model(seed=3)
    monkeypatch.setattr(mechlie.core.kv, "load_model_split", lambda *a, **k: model)
    monkeypatch.setattr(mechlie.core.pairs, "load_builtin", lambda *a, **k: many_pairs())
    from mechlie.studies.base import launch

    mod = _script("localise")
    argv = ["--n-random", "4", "--n-boot", "20", "--n-path-pairs", "2", "--receiver", "2.1", "--no-known-only"]
    argv += ["--n-rerank", "6", "--n-split-seeds", "3", "--out-dir", str(tmp_path)]
    assert launch(mod.STUDY, argv=argv) == 0
    (run,) = list(tmp_path.iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_train"] + summary["n_test"] == 8 and summary["n_heads"] == 12
    assert summary["topk_restore"]["ks"] == [1, 2, 4, 8, 12]
    assert summary["path"]["receiver"] == [2, 1] and len(summary["path"]["top_senders"]) == 10
    assert any(run.rglob("*circuit.html")) and (run / "scores.safetensors").is_file()  # the circuit diagram
    pos = summary["positions"]
    assert pos["own_differing"]["n"] == 2 and 0 <= pos["attention_own_differing"] <= 1 + 1e-6
    assert "minimal set" in capsys.readouterr().out
    # these pairs' honest and lying prompts differ in length: the edge circuit says why it did not run
    assert "equal-length" in summary["circuit"]["skipped"] and summary["circuit"]["unequal_length_left_out"]["test"] > 0
    # bad input fails before the model loads, with one line
    assert launch(mod.STUDY, argv=["--receiver", "x.y", "--out-dir", str(tmp_path)]) == 2
    assert launch(mod.STUDY, argv=["--receiver", "0.9", "--out-dir", str(tmp_path / "b")]) == 2


def test_function_vector_script_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    import json

    import mechlie.core.kv
    import mechlie.core.metrics
    import mechlie.core.pairs

    model = tiny_model(seed=3)
    monkeypatch.setattr(mechlie.core.kv, "load_model_split", lambda *a, **k: model)
    from test_function_vectors import word_pairs

    pairs = word_pairs()
    monkeypatch.setattr(mechlie.core.pairs, "load_builtin", lambda *a, **k: pairs)
    real = mechlie.core.metrics.behaviour

    def all_known(*a, **k):  # a random tiny model knows nothing; treat every fact as known
        b = real(*a, **k)
        return type(b)(
            type(b.honest)(
                *[
                    torch.ones_like(b.honest.correct) if f == "correct" else getattr(b.honest, f)
                    for f in b.honest.__dataclass_fields__
                ]
            ),
            b.lying,
        )

    monkeypatch.setattr(mechlie.core.metrics, "behaviour", all_known)
    from mechlie.studies.base import launch

    mod = _script("function_vectors")
    argv = ["--k", "3", "--n-random", "10", "--n-boot", "20", "--out-dir", str(tmp_path)]
    assert launch(mod.STUDY, argv=argv) == 0
    (run,) = list(tmp_path.iterdir())
    s = json.loads((run / "summary.json").read_text())
    ci = s["interventions_at_layer"]["lying_minus"]["delta_p_truth_ci"]
    assert ci["random"]["n"] == 10 and ci["fv"]["lo"] <= ci["fv"]["mean"] <= ci["fv"]["hi"]
    assert s["layer"] == min(s["fv_head_layers"])
