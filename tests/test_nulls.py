"""The nulls of mechlie.read.nulls / transfer and the leave-one-relation-out summary (issue 19):
permutations that really move labels, vectorised refits equal to fit_probe, nulls at chance on
random data, the LORO bar as the 95th percentile of the per-draw mean, held-out relations scored
on all their facts. Tiny synthetic tensors, no model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mechlie.core.stats import auroc
from mechlie.read import nulls
from mechlie.read.probes import fit_probe
from mechlie.read.transfer import DetectorError, LabelledSet, transfer_run


def _constant_within_fact(n_facts: int = 40, rows: int = 3, seed: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """Labels constant within each fact (all-lie or all-truth facts), ``rows`` rows per fact."""
    g = torch.Generator().manual_seed(seed)
    fact_y = (torch.rand(n_facts, generator=g) < 0.5).float()
    fact_y[:2] = torch.tensor([0.0, 1.0])
    y = fact_y.repeat_interleave(rows)
    groups = [list(range(rows * f, rows * (f + 1))) for f in range(n_facts)]
    return y, groups


def _old_within_fact(groups, y, n_draws, seed):
    """The pre-issue-19 null, as a reference: labels permuted within each fact only."""
    g = torch.Generator().manual_seed(seed)
    out = y.repeat(n_draws, 1)
    for idx in groups:
        t = torch.tensor(idx)
        out[:, t] = y[t][torch.rand(n_draws, len(idx), generator=g).argsort(1)]
    return out


def test_permutation_moves_labels_between_facts_and_keeps_relation_counts():
    y, groups = _constant_within_fact()
    old = _old_within_fact(groups, y, 200, 1)
    assert (old != y).sum() == 0  # every fact is all-lie or all-truth: the old null changed nothing
    strata = [list(range(0, 60)), list(range(60, 120))]  # two relations of 20 facts each
    new = nulls.label_permutations(y, strata, 200, 1)
    changed = (new != y).float().mean()
    assert changed > 0.3  # about half of the rows flip with balanced classes
    for rows in strata:  # class counts kept per relation: labels never cross relations
        assert (new[:, rows].sum(1) == y[rows].sum()).all()
    assert len({tuple(r.tolist()) for r in new}) > 190  # the draws differ


def _blobs(n: int, d: int, seed: int, signal: float = 0.0, L: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).float()
    X = torch.randn(n, L, d, generator=g)
    X[y == 1, -1, 0] += signal
    return X, y


def _pairs(groups, yy):
    lab = yy.tolist()
    return torch.tensor([p for g in groups for p in zip([i for i in g if lab[i] == 0], [i for i in g if lab[i] == 1])])


@pytest.mark.parametrize("kind", ["diff_of_means", "mass_mean", "logistic", "lat", "ensemble"])
def test_vectorised_refits_equal_fit_probe_per_draw(kind):
    X, y = _blobs(60, 24, 0, signal=1.0, L=3)
    groups = [[2 * i, 2 * i + 1] for i in range(30)]
    Y = nulls.label_permutations(y, [list(range(60))], 8, 3)
    Xk = X if kind == "ensemble" else X[:, -1]
    probes, kept = nulls.refit_nulls(kind, Xk, Y, groups, seed=0)
    assert len(kept) >= 4 and len(probes) == len(kept)
    S = probes.score(Xk)
    for j, k in enumerate(kept.tolist()):
        ref = fit_probe(kind, X if kind == "ensemble" else X[:, -1:], Y[k], pairs=_pairs(groups, Y[k]), seed=0)
        r = ref.score(X if kind == "ensemble" else X[:, -1:])
        r = r if kind == "ensemble" else r[:, 0]
        if kind == "logistic":  # scikit-learn stops at its tolerance; ours is the exact optimum
            cos = torch.nn.functional.cosine_similarity(ref.direction[0], probes.direction[j], dim=0)
            assert cos > 0.999 and (r - S[:, j]).abs().max() < 0.02 * r.abs().max()
        else:
            assert torch.allclose(r, S[:, j], atol=1e-4 * r.abs().max().item())


@pytest.mark.parametrize("kind", ["diff_of_means", "logistic", "lat", "ensemble"])
def test_null_aurocs_centre_on_chance_for_random_data(kind):
    X, y = _blobs(120, 32, 1, L=2)
    Xt, yt = _blobs(200, 32, 2, L=2)
    facts = [f"f{i // 2}" for i in range(120)]
    rel = ["a" if i < 60 else "b" for i in range(120)]
    train = LabelledSet("train", X, y, facts, rel)
    test = LabelledSet("test", Xt, yt, [f"t{i // 2}" for i in range(200)])
    run = transfer_run(train, [test], kind, 1, n_null=200, n_random=200, n_boot=50)
    nul, rnd = run.null_shuffled[0], run.null_random[0]
    assert len(nul) >= 190 and len(rnd) == 200
    assert abs(float(nul.mean()) - 0.5) < 0.05 and abs(float(rnd.mean()) - 0.5) < 0.05
    cell = run.cells[0]
    assert cell.n_null == len(nul) and cell.null_shuffled_q95 == pytest.approx(float(torch.quantile(nul, 0.95)))


def test_a_planted_signal_beats_both_nulls_and_random_directions_are_unit_and_oriented():
    X, y = _blobs(120, 64, 3, signal=3.0)
    Xt, yt = _blobs(120, 64, 4, signal=3.0)
    facts = [f"f{i // 2}" for i in range(120)]
    run = transfer_run(LabelledSet("tr", X, y, facts), [LabelledSet("te", Xt, yt, facts)], "logistic", 0, n_boot=50)
    c = run.cells[0]
    assert c.auroc > 0.85 and c.auroc > c.null_shuffled_q95 + 0.1 and c.auroc > c.null_random_q95 + 0.1
    R = nulls.random_nulls(X[:, 0], y, 100, 0)
    assert torch.allclose(R.direction.norm(dim=-1), torch.ones(100), atol=1e-5)
    s = R.score(X[:, 0])
    assert (auroc(s[y == 1], s[y == 0]) >= 0.5).all()  # oriented on the training labels
    # midpoint bias: the class means of the training scores sit symmetrically around 0
    assert torch.allclose(s[y == 1].mean(0), -s[y == 0].mean(0), atol=1e-4)


def test_concat_refuses_a_mix_of_sets_with_and_without_relations():
    X, y = _blobs(4, 3, 0)
    a = LabelledSet("a", X, y, ["f0", "f0", "f1", "f1"]).with_relation("r")
    b = LabelledSet("b", X, y, ["g0", "g0", "g1", "g1"])
    assert LabelledSet.concat([a, a], "aa").relations == ["r"] * 8
    assert LabelledSet.concat([b, b], "bb").relations is None
    with pytest.raises(DetectorError, match="lack relations"):
        LabelledSet.concat([a, b], "ab")


def _loro_table(n_rel: int = 4, n_facts: int = 24, rows: int = 3, seed: int = 0):
    """Per relation a (train, test) split by fact: on-policy-like rows (several per fact, most facts
    all-lie or all-truth), with a weak shared signal at layer 1."""
    g = torch.Generator().manual_seed(seed)
    table, rel_sources, n_facts_of = {}, {}, {}
    for r in range(n_rel):
        name = f"rel{r}"
        fy = (torch.rand(n_facts, generator=g) < 0.5).float()
        fy[:2] = torch.tensor([0.0, 1.0])
        y = fy.repeat_interleave(rows)
        y[::7] = 1 - y[::7]  # some facts mixed
        X = torch.randn(len(y), 2, 16, generator=g)
        X[y == 1, 1, 0] += 0.6
        facts = [f"{name}/f{i // rows}" for i in range(len(y))]
        s = LabelledSet(name, X, y, facts)
        train_facts = {f"{name}/f{i}" for i in range(0, n_facts, 3)} | {f"{name}/f{i}" for i in range(1, n_facts, 3)}
        table[name] = (s.subset(train_facts), s.subset(set(facts) - train_facts))
        rel_sources[name] = [name]
        n_facts_of[name] = n_facts
    return table, rel_sources, n_facts_of


def test_loro_bar_is_q95_of_per_draw_mean_and_held_out_relations_use_all_facts():
    from mechlie.studies.detection_steps import loro

    table, rel_sources, n_facts_of = _loro_table()
    rels = tuple(table)
    cfg = SimpleNamespace(probes=("diff_of_means", "logistic"), relations=rels)
    kw = dict(n_null=200, n_random=200, n_boot=300, seed=0)
    out, roc = loro(cfg, table, rel_sources, "", 1, kw)
    n_rows = sum(len(a.y) + len(b.y) for a, b in table.values())
    for kind in cfg.probes:
        summ = out[kind]
        # every held-out relation is scored on all its facts and rows (train and test split)
        for r in rels:
            assert summ["per_relation"][r].n_target_facts == n_facts_of[r]
        pos, neg = roc[kind]
        assert len(pos) + len(neg) == n_rows
        # Independent recomputation: each fold trains on all rows of the other relations.
        whole = {r: LabelledSet.concat(list(table[r]), r).with_relation(r) for r in rels}
        shuffled, rand, aur = [], [], []
        for r in rels:
            src = LabelledSet.concat([whole[o] for o in rels if o != r], "src")
            assert not set(src.facts) & set(whole[r].facts)
            run = transfer_run(src, [whole[r]], kind, 1, **kw)
            shuffled.append(run.null_shuffled[0])
            rand.append(run.null_random[0])
            aur.append(run.cells[0].auroc)
            assert len(whole[r].y) == len(run.scores[0])
        m = min(len(s) for s in shuffled)
        bar = float(torch.quantile(torch.stack([s[:m] for s in shuffled]).mean(0), 0.95))
        rbar = float(torch.quantile(torch.stack(rand).mean(0), 0.95))
        assert summ["null_shuffled_q95"] == pytest.approx(bar, abs=1e-6)
        assert summ["null_random_q95"] == pytest.approx(rbar, abs=1e-6)
        assert summ["mean_auroc"] == pytest.approx(sum(aur) / len(aur), abs=1e-6)
        # The old bar (mean of per-relation 95th percentiles) is far higher than the corrected one.
        old_bar = sum(float(torch.quantile(s, 0.95)) for s in shuffled) / len(shuffled)
        assert old_bar > bar + 0.02
        # CI over relations: inside the range of the relations' AUROCs, beside the CI over facts
        assert min(aur) - 1e-6 <= summ["lo"] <= summ["mean_auroc"] <= summ["hi"] <= max(aur) + 1e-6
        assert summ["ci_over"] == "relations" and summ["lo_facts"] <= summ["hi_facts"]
        assert summ["n_relations"] == len(rels) and summ["n_shuffled_draws"] == m
