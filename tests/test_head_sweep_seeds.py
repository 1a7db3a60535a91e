"""Issue 22, item 6: the head sweep's headline over several split seeds (tiny models, synthetic data)."""

from __future__ import annotations

import pytest
import torch

from mechlie.studies.head_sweep_seeds import (
    BARS,
    SeedHeadline,
    fact_means,
    over_split_seeds,
    split_seeds_text,
    summarize_seeds,
)


def row(seed: int, head: tuple[int, int], effect: float, n_pass: int) -> SeedHeadline:
    return SeedHeadline(
        seed=seed,
        top_head=head,
        train_effect=effect,
        effect=effect,
        lo=effect - 0.1,
        hi=effect + 0.1,
        n_train_facts=7,
        n_test_facts=3,
        n_pass={b: n_pass + i for i, b in enumerate(BARS)},
        best_auroc_head=(0, 0),
        best_auroc=0.9,
        best_auroc_lo=0.8,
        best_auroc_hi=1.0,
    )


def test_mean_and_sd_over_seeds_and_the_choice_stability_are_computed_right():
    rows = [row(0, (1, 2), 0.1, 10), row(1, (1, 2), 0.3, 20), row(2, (0, 3), 0.5, 30)]
    s = summarize_seeds(rows, n_heads=12)
    # by hand: mean 0.3, SD (n - 1) sqrt((0.04 + 0 + 0.04) / 2) = 0.2; counts 20 +/- 10
    assert s["effect"]["mean"] == pytest.approx(0.3, abs=1e-9) and s["effect"]["sd"] == pytest.approx(0.2, abs=1e-9)
    assert s["n_pass"]["null_own"] == {"mean": pytest.approx(20.0), "sd": pytest.approx(10.0)}
    assert s["n_pass"]["random_max"]["mean"] == pytest.approx(23.0)  # + 3: the fourth bar's offset in row()
    assert s["top_head_counts"] == {"L1H2": 2, "L0H3": 1} and s["modal_top_head"] == "L1H2" and s["n_seeds_modal"] == 2
    assert [r["seed"] for r in s["per_seed"]] == [0, 1, 2] and s["seeds"] == [0, 1, 2]
    text = "\n".join(split_seeds_text(s))
    assert "+0.300 ± 0.200" in text and "L1H2 is the top head in 2/3 seeds (L0H3 in 1)" in text
    assert "20.0 ± 10.0 (10, 20, 30)" in text and "not a CI over independent samples" in text and "of 12" in text
    with pytest.raises(ValueError, match="no split seeds"):
        summarize_seeds([], n_heads=12)


def test_fact_means_average_the_pairs_of_a_fact():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 10.0], [5.0, 6.0]])
    m = fact_means(x, ["a", "a", "b", "c"])
    assert torch.equal(m, torch.tensor([[2.0, 3.0], [10.0, 10.0], [5.0, 6.0]]))


def synthetic(n: int = 60, L: int = 3, H: int = 4, planted=(1, 2), seed: int = 0):
    """Activations where every head separates the framings a little, and per-pair patching results where
    only ``planted`` restores the honest logit difference (about 0.9 of it); the rest restore about 0."""
    g = torch.Generator().manual_seed(seed)
    honest, lying = torch.randn(n, L, H, 6, generator=g), torch.randn(n, L, H, 6, generator=g)
    lying[..., 0] += 1.5
    lo = torch.randn(n, generator=g)
    hi = lo + 4.0 + torch.rand(n, generator=g)
    patched = lo[:, None, None] + 0.3 * torch.randn(n, L, H, generator=g)
    patched[:, planted[0], planted[1]] = lo + 0.9 * (hi - lo) + 0.3 * torch.randn(n, generator=g)
    return honest, lying, patched, lo, hi


def test_every_seed_picks_the_planted_head_on_its_training_facts_and_reports_it_on_held_out_facts():
    honest, lying, patched, lo, hi = synthetic()
    facts = [f"f{i // 2}" for i in range(len(honest))]  # two pairs per fact
    o = over_split_seeds(
        honest, lying, patched, lo, hi, facts, range(5), test_frac=0.3, n_perm=40, n_random=40, n_boot=200
    )
    assert o["seeds"] == [0, 1, 2, 3, 4] and len(o["per_seed"]) == 5
    assert o["top_head_counts"] == {"L1H2": 5} and o["n_seeds_modal"] == 5
    for r in o["per_seed"]:
        assert r["n_train_facts"] + r["n_test_facts"] == 30 and r["n_test_facts"] == 9
        assert 0.75 < r["lo"] <= r["effect"] <= r["hi"] < 1.05  # the planted 0.9, far from the others' 0
        assert set(r["n_pass"]) == set(BARS) and all(0 <= v <= 12 for v in r["n_pass"].values())
    assert 0.8 < o["effect"]["mean"] < 1.0 and 0 < o["effect"]["sd"] < 0.1
    # The held-out number is the test facts' only: recompute seed 3's by hand.
    from mechlie.core.stats import normalized_effect
    from mechlie.read.directions import split_by_fact

    sp = split_by_fact(facts, 0.3, 3)
    te = torch.tensor(sp.test)
    by_hand = normalized_effect(patched[te, 1, 2].mean(), lo[te].mean(), hi[te].mean())
    assert o["per_seed"][3]["effect"] == pytest.approx(float(by_hand), abs=1e-5)
    with pytest.raises(ValueError, match="must match"):
        over_split_seeds(
            honest, lying, patched, lo, hi, facts[:-1], range(2), test_frac=0.3, n_perm=20, n_random=20, n_boot=100
        )


def test_a_head_that_helps_only_on_training_facts_is_reported_at_its_held_out_value():
    """The choice is made on training facts; a head that wins there by chance is reported on held-out facts."""
    honest, lying, patched, lo, hi = synthetic(planted=(0, 0))
    facts = [f"f{i}" for i in range(len(honest))]
    o = over_split_seeds(
        honest, lying, patched, lo, hi, facts, range(3), test_frac=0.3, n_perm=20, n_random=20, n_boot=100
    )
    assert o["modal_top_head"] == "L0H0"
    from mechlie.read.directions import split_by_fact

    sp = split_by_fact(facts, 0.3, 0)
    fake = patched.clone()
    fake[torch.tensor(sp.train), 2, 3] = hi[torch.tensor(sp.train)] * 2  # seed 0's training facts only
    o2 = over_split_seeds(honest, lying, fake, lo, hi, facts, [0], test_frac=0.3, n_perm=20, n_random=20, n_boot=100)
    r = o2["per_seed"][0]
    assert r["top_head"] == (2, 3) and r["train_effect"] > 1.5 and abs(r["effect"]) < 0.2


def planted_model():
    """The tiny word model with every head's output weights zeroed but L1H2's: only that head carries
    earlier positions to the final one, so patching its z restores the honest run (effect 1) and
    patching any other head changes nothing (effect 0)."""
    from conftest import tiny_model

    model = tiny_model(seed=4)
    with torch.no_grad():
        keep = model.blocks[1].attn.W_O[2].clone()
        for b in model.blocks:
            b.attn.W_O.zero_()
        model.blocks[1].attn.W_O[2] = keep
    return model


def test_the_sweep_writes_one_entry_per_seed_and_picks_the_planted_head_in_every_seed(tmp_path):
    from mechlie.causal.patching import patch_final_positions
    from mechlie.core.cli import RunDir
    from mechlie.studies.head_sweep import HeadSweepConfig, run_head_sweep, summarize
    from mechlie.studies.head_sweep_result import HeadSweepResult

    model = planted_model()
    cfg = HeadSweepConfig(
        model="tiny",
        dataset="capitals",
        n_pairs=0,
        known_only=False,
        n_perm=20,
        n_random=20,
        n_boot=100,
        n_patch=4,
        n_layer_seeds=0,
        n_split_seeds=3,
    )
    run = RunDir(tmp_path / "run", {"config": {"k": 1}})
    res = run_head_sweep(cfg, model, run, progress=False)
    run.close()
    assert (tmp_path / "run" / "patching_rest.safetensors").is_file()  # the pairs stage 4 did not patch
    s = summarize(res)
    o = s["over_split_seeds"]
    assert o["seeds"] == [0, 1, 2] and [r["seed"] for r in o["per_seed"]] == [0, 1, 2]
    assert o["top_head_counts"] == {"L1H2": 3}
    for r in o["per_seed"]:
        assert abs(r["effect"] - 1.0) < 0.05 and r["train_effect"] > 0.95
    # Seed 0 is the reported split: its pass counts are the reported ones.
    ha = s["head_auroc"]
    assert o["per_seed"][0]["n_pass"] == {
        "null_own": ha["null"]["n_pass_own"],
        "null_max": ha["null"]["n_pass"],
        "random_own": ha["random"]["n_pass_own"],
        "random_max": ha["random"]["n_pass"],
    }
    # The stitched per-pair results (4 pairs + the rest, reordered) equal one direct patch of every pair.
    direct = patch_final_positions(model, res.pairs, ("z",), progress=False)["z"]
    from mechlie.core.stats import normalized_effect
    from mechlie.read.directions import split_by_fact

    sp = split_by_fact([p.fact_id for p in res.pairs], cfg.test_frac, 2)
    te = torch.tensor(sp.test)
    want = normalized_effect(
        direct.logit_diff[te, 1, 2].mean(), direct.corrupt.logit_diff[te].mean(), direct.clean.logit_diff[te].mean()
    )
    assert o["per_seed"][2]["effect"] == pytest.approx(float(want), abs=1e-4)
    head = "\n".join(HeadSweepResult(tmp_path / "run", s).headline())
    assert "Over 3 split seeds" in head and "L1H2 is the top head in 3/3 seeds" in head
    fig = HeadSweepResult(tmp_path / "run", s).figures()["split_seeds"]
    assert list(fig.data[0].x) == ["seed 0: L1H2", "seed 1: L1H2", "seed 2: L1H2"]
    # Without the key (a summary written before it): no such line, no such figure, no error.
    old = {k: v for k, v in s.items() if k != "over_split_seeds"}
    assert "split seeds" not in "\n".join(HeadSweepResult(tmp_path / "run", old).headline())
    assert "split_seeds" not in HeadSweepResult(tmp_path / "run", old).figures()


def test_n_split_seeds_must_be_zero_or_at_least_two():
    from mechlie.studies.head_sweep import HeadSweepConfig

    with pytest.raises(ValueError, match="--n-split-seeds"):
        HeadSweepConfig(n_split_seeds=1)
    assert HeadSweepConfig(n_split_seeds=0).n_split_seeds == 0


def test_the_headline_lines_carry_the_seed_summaries_only_when_the_summary_has_them(tmp_path):
    from mechlie.studies.head_sweep_seeds import split_counts_short, split_seeds_short

    s = summarize_seeds([row(0, (1, 2), 0.1, 10), row(1, (1, 2), 0.3, 20), row(2, (0, 3), 0.5, 30)], n_heads=12)
    short = split_seeds_short(s)
    assert "L1H2 is the top head in 2/3" in short and "0.30 ± 0.20" in short
    counts = split_counts_short(s)
    assert "label-swap 21 ± 10 pass the max bar, 20 ± 10 their own" in counts  # null_max = n_pass + 1 in row()
    assert "random directions 23 ± 10 the max bar, 22 ± 10 their own" in counts
