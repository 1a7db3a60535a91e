"""The generalisation study: held-out splits never train on a held-out fact, the nulls' bar is the q95
of the per-draw mean, a planted shared lie direction generalises and a per-relation one does not, and
the study runs end to end on a tiny random model over a tiny fake corpus, resumes without
regenerating, and reports a setup with too few lies as skipped."""

from __future__ import annotations

import json

import pytest
import torch

from mechlie.studies import generalisation_eval as E

CAPITALS = "Paris Madrid Rome Tokyo Lima Santiago Cairo Nairobi Havana Tehran".split()
COUNTRIES = "France Spain Italy Japan Peru Chile Egypt Kenya Cuba Iran".split()
FAST = E.EvalSettings(n_null=50, n_random=50, n_boot=100)


def synth_rows(R=6, F=6, setups=("a", "b", "c", "d"), k=5, L=3, d=32, shared=True, strength=3.0, seed=0) -> E.Rows:
    """Rows with a lie direction at layer 1: one for all relations (``shared``) or one per relation."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g)
    dirs = {r: (common if shared else torch.randn(d, generator=g)) for r in range(R)}
    X, y, fact, rel, st, tp, pr = [], [], [], [], [], [], []
    for r in range(R):
        for f in range(F):
            for s in setups:
                t = f"{s}/t{f % 2}"
                for _ in range(k):
                    lab = float(torch.rand(1, generator=g) < 0.4)
                    x = torch.randn(L, d, generator=g)
                    x[1] += strength * lab * dirs[r] / dirs[r].norm()
                    X.append(x)
                    y.append(lab)
                    fact.append(f"r{r}/f{f}")
                    rel.append(f"r{r}")
                    st.append(s)
                    tp.append(t)
                    pr.append(f"r{r}/f{f}|{t}")
    y_t = torch.tensor(y)
    surprisal = torch.randn(len(y), generator=g) + 0.3 * y_t
    return E.Rows(torch.stack(X), y_t, fact, rel, st, tp, pr, surprisal)


@pytest.mark.parametrize("by", E.UNITS)
def test_held_out_unit_and_its_facts_are_never_trained_on(by):
    rows = synth_rows()
    splits = E.held_out_splits(rows, by, test_frac=0.5, seed=1)
    assert len(splits) == len(set(rows.unit(by)))
    for sp in splits:
        train_facts = {rows.fact[i] for i in sp.train}
        for unit, test in sp.tests.items():
            assert test, f"held-out {by} {unit} has no rows"
            assert not train_facts & {rows.fact[i] for i in test}
            assert unit not in {rows.unit(by)[i] for i in sp.train}
            assert {rows.unit(by)[i] for i in test} == {unit}


def test_curves_never_train_on_a_test_fact(monkeypatch):
    rows = synth_rows(R=6)
    seen = []
    real = E.evaluate

    def checked(train, tests, kind, ev):
        for t in tests.values():
            assert not set(train.fact) & set(t.fact)
            assert not set(train.relation) & set(t.relation) or set(train.setup).isdisjoint(t.setup)
        seen.append(len(set(train.relation)))
        return real(train, tests, kind, ev)

    monkeypatch.setattr(E, "evaluate", checked)
    rc = E.relation_curve(rows, (1, 2, 4), 2, "diff_of_means", FAST)
    assert sorted(set(seen)) == [1, 2, 4] and rc["n_test_relations"] == 2
    sc = E.setup_curve(rows, (1, 2, 3), 2, "diff_of_means", FAST)
    for p in rc["points"] + sc["points"]:  # every point has both CIs and both nulls
        a = p["auroc"]
        assert a["lo"] <= a["mean"] <= a["hi"] and a["units_lo"] <= a["units_hi"]
        assert p["null_permutation"]["n_draws"] == 50 and p["null_random"]["n_draws"] == 50


def test_null_bar_is_q95_of_the_per_draw_mean():
    g = torch.Generator().manual_seed(0)
    # Two units whose null draws are anti-correlated: the per-draw mean is tight, each unit's q95 is not.
    a = torch.rand(400, generator=g)
    cells = [
        E.Cell("u1", 0.7, torch.full((100,), 0.7), 0.5 + 0.4 * (a - 0.5), 0.5 + 0.4 * (a - 0.5), 0, {}),
        E.Cell("u2", 0.8, torch.full((100,), 0.8), 0.5 - 0.4 * (a - 0.5), 0.5 - 0.4 * (a - 0.5), 0, {}),
    ]
    out = E.pool(cells, FAST)
    per_draw = torch.stack([c.null_perm for c in cells]).mean(0)
    assert out["null_permutation"]["q95"] == pytest.approx(float(torch.quantile(per_draw, 0.95)), abs=1e-6)
    mean_of_q95 = float(torch.stack([torch.quantile(c.null_perm, 0.95) for c in cells]).mean())
    assert abs(out["null_permutation"]["q95"] - mean_of_q95) > 0.1  # the old (wrong) bar is far from it
    assert out["auroc"]["mean"] == pytest.approx(0.75) and out["above_nulls"]


def test_shared_direction_generalises_and_per_relation_ones_do_not():
    shared = E.held_out(synth_rows(shared=True), "relation", "logistic", FAST)
    assert shared["auroc"]["mean"] > 0.85 and shared["above_nulls"]
    assert shared["auroc"]["mean"] > shared["surprisal"]["mean"] + 0.2
    assert shared["mixed"]["probe_minus_surprisal"]["lo"] > 0.1
    alone = E.held_out(synth_rows(shared=False, seed=3), "relation", "logistic", FAST)
    assert alone["auroc"]["mean"] < 0.72 and alone["auroc"]["units_lo"] < 0.6


def test_batched_logistic_matches_the_library_probe():
    from mechlie.read.nulls import logistic_nulls
    from mechlie.read.probes import fit_probe

    rows = synth_rows(R=3, F=4, d=24)
    X, y = rows.X[:, 1], rows.y
    Y = torch.stack([y, y.flip(0)])
    lbfgs, newton = logistic_nulls(X, Y, solver="lbfgs"), logistic_nulls(X, Y, solver="newton")
    for j in range(2):
        ref = fit_probe("logistic", X[:, None], Y[j]).direction[0]
        for nul in (lbfgs, newton):
            assert torch.nn.functional.cosine_similarity(ref, nul.direction[j], 0) > 0.99
        assert torch.nn.functional.cosine_similarity(lbfgs.direction[j], newton.direction[j], 0) > 0.99


# ---------------------------------------------------------------------------------------------
# end to end on a tiny random model and a tiny fake corpus


def fake_corpus():
    import datasets

    rows = []
    for j in range(5):
        rel = f"rel{j}"
        for i in range(6):
            country, capital = COUNTRIES[(i + j) % 10], CAPITALS[(i + 2 * j) % 10]
            rows.append(
                {
                    "fact_id": f"{rel}/{country}",
                    "relation": rel,
                    "subject": country,
                    "question": f"What is the capital of {country} ?",
                    "answer": capital,
                    "aliases": [capital],
                    "answer_type": "city",
                    "source": "fake==0",
                }
            )
    return datasets.Dataset.from_list(rows)


def capital_model():
    """The word-level tiny model, made to answer with a capital: its unembedding scaled down and the
    capitals' logits raised, so samples are near-uniform over capitals (lies and truths both occur)."""
    from tiny_models import word_model

    model = word_model(n_ctx=256)
    tok = model.tokenizer
    with torch.no_grad():
        model.W_U.mul_(0.05)
        for c in CAPITALS:
            model.b_U[tok.convert_tokens_to_ids(c)] += 6.0
    return model


ARGV = [
    "--models",
    "tiny",
    "--no-known-filter",
    "--facts-per-relation",
    "4",
    "--candidates-per-relation",
    "6",
    "--k",
    "3",
    "--n-layers-read",
    "3",
    "--curve-relations",
    "1",
    "2",
    "4",
    "--curve-setups",
    "1",
    "3",
    "--curve-draws",
    "2",
    "--n-null",
    "20",
    "--n-random",
    "20",
    "--n-boot",
    "50",
    "--min-lies",
    "2",
]


def test_study_end_to_end_resumes_and_reports_skipped_setups(monkeypatch, tmp_path):
    import mechlie.core.corpus
    import mechlie.core.models
    import mechlie.read.labels
    from mechlie.studies import generalisation as G
    from mechlie.studies import generalisation_data as D
    from mechlie.studies.base import launch, load_result

    model = capital_model()
    calls = {"load": 0, "generate": 0}
    real_on_policy = mechlie.read.labels.on_policy

    def counted_load(*a, **k):
        calls["load"] += 1
        return model

    def counted_on_policy(*a, **k):
        calls["generate"] += 1
        return real_on_policy(*a, **k)

    monkeypatch.setattr(mechlie.core.corpus, "corpus", lambda *a, **k: fake_corpus())
    monkeypatch.setattr(mechlie.core.models, "load_model", counted_load)
    monkeypatch.setattr(mechlie.read.labels, "on_policy", counted_on_policy)
    argv = [*ARGV, "--out-dir", str(tmp_path)]
    assert launch(G.STUDY, argv=argv) == 0
    assert calls == {"load": 1, "generate": 4}  # one model, one generation per setup
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    pm = summary["per_model"]["tiny"]
    assert pm["n_relations"] == 5 and pm["n_facts"] == 20
    assert set(pm["lie_rates"]) == set(pm["answer_counts"]) == {"fewshot", "instructed", "roleplay", "sycophancy"}
    for r in pm["lie_rates"].values():
        assert r["lie_rate_lo"] <= r["lie_rate"] <= r["lie_rate_hi"]
    loro = pm["matrix"]["on-policy/answer_first"]["logistic"]["relation"]
    assert loro["n_units"] == 5 and loro["null_permutation"]["n_draws"] == 20
    assert loro["auroc"]["lo"] <= loro["auroc"]["mean"] <= loro["auroc"]["hi"]
    assert "surprisal" in loro and "framing/prompt_final" in pm["matrix"]
    for kind in ("logistic", "diff_of_means"):
        points = pm["curve"][kind]["relations"]
        assert [p["n"] for p in points] == [1, 2, 4]
        for p in points:
            assert p["auroc"]["lo"] <= p["auroc"]["mean"] <= p["auroc"]["hi"] and "null_random" in p
    res = load_result(run)
    assert isinstance(res, G.GeneralisationResult)
    assert res.headline()[0].startswith("- **Leave-one-relation-out AUROC**") and "null q95" in res.headline()[0]
    assert set(res.figures()) == {"matrix_tiny", "curve_relations", "curve_setups", "lie_rates"}
    # The same command again resumes every stage: no model load, no generation.
    assert launch(G.STUDY, argv=argv) == 0
    assert calls == {"load": 1, "generate": 4}
    assert json.loads((run / "summary.json").read_text())["per_model"]["tiny"]["matrix"] == pm["matrix"]
    # A setup with too few lies is reported as skipped, and the others are still analysed.
    stages = {s: D.load_stage(run / "tiny" / f"gen_{s}.safetensors") for s in pm["answer_counts"]}
    for r in stages["roleplay"][1]["rows"]:
        if r["class"] == "lie":
            r["class"], r["label"] = "junk", "junk"
    cfg = G.Config(**{**G.Config().__dict__, "models": ("tiny",), "known_filter": False, "min_lies": 2})
    cfg = G.Config(**{**cfg.__dict__, "curve_relations": (1,), "curve_setups": (1,), "n_null": 5, "n_random": 5})
    out = G.analyse(cfg, stages, {})
    assert "roleplay" in out["skipped_setups"] and "0 labelled lies" in out["skipped_setups"]["roleplay"]
    assert out["readings"]["on-policy/answer_first"]["matrix"]["logistic"]["setup"]["n_units"] == 3
    # Bad flags fail before any model loads.
    assert launch(G.STUDY, argv=["--setups", "nonsense", "--out-dir", str(tmp_path)]) == 2
    assert calls["load"] == 1
