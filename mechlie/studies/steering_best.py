"""The steering study's best method (chosen on validation relations, never the honest-only control)
and its demonstration: held-out-relation prompts where the model really lies, generated before and
after steering, and honest prompts steered the other way. ``cfg`` is the study's
:class:`mechlie.studies.steering.Config`."""

from __future__ import annotations


def best_and_demo(cfg, model, data, chosen: dict, evals: dict) -> dict:
    """The best method, chosen on the *validation* relations (choosing it on the held-out ones would
    make the headline a best-of-N), never the honest-only control; and held-out-relation prompts where
    the model really lies, steered with it."""
    from mechlie.studies import steering_eval as se

    cands = {m: c for m, c in chosen.items() if m != "honest_only"} or chosen
    ok = {m: c for m, c in cands.items() if c.kl <= cfg.kl_budget} or cands
    best = max(ok, key=lambda m: ok[m].recovered)
    setting = chosen[best].setting
    iv, iv_lie = se.intervention(model, data, setting), se.intervention(model, data, setting.flipped())
    es = data.extra["heldout"]
    lies = se.lying_rows(es)
    honest_ok = [i for i in range(len(es.pairs)) if bool(es.base_honest.correct[i])]
    best_r = evals[best]
    rec, kl = mean_of(best_r["recovered"]), mean_of(best_r["kl"])
    return {
        "best": {
            "method": best,
            "chosen_by": f"most recovered on validation relations among methods with validation KL <= "
            f"{cfg.kl_budget} (the honest-only control excluded)",
            "setting": setting,
            "recovered": best_r["recovered"],
            "kl": best_r["kl"],
            "goal": "recovered >= 0.85 (CI lower bound >= 0.6) at KL <= 0.1 nats on held-out relations",
            "goal_met": bool(rec >= 0.85 and lo_of(best_r["recovered"]) >= 0.6 and kl <= 0.1),
        },
        "demo": {
            "setting": setting,
            "on": "heldout",
            "n_lying_test_prompts": len(lies),
            "lies_flipped_back": demo_rows(cfg, model, es, lies[: cfg.n_demo], "lying", iv, es.base_lying),
            "honest_steered_into_lies": demo_rows(
                cfg, model, es, honest_ok[: cfg.n_demo], "honest", iv_lie, es.base_honest
            ),
        },
    }


def mean_of(e) -> float:
    """An :class:`Estimate`'s point value, or a saved one's (read back from a resumed stage)."""
    return float(e["mean"] if isinstance(e, dict) else e.mean)


def lo_of(e) -> float:
    v = e["lo"] if isinstance(e, dict) else e.lo
    return float("nan") if v is None else float(v)


def demo_rows(cfg, model, es, rows: list[int], which: str, iv, base_scores) -> list[dict]:
    """Prompts ``rows`` of ``es`` generated before and after steering, with P(truth) before and after."""
    from mechlie.core.generation import generate
    from mechlie.studies.steering_data import score_prompts

    if not rows:
        return []
    gen_kw = dict(max_new_tokens=cfg.max_new_tokens, stop_strings=("\n",))
    ps = [es.pairs[i] for i in rows]
    prompts = [getattr(p, which) for p in ps]
    before, after = generate(model, prompts, **gen_kw), generate(model, prompts, interventions=[iv], **gen_kw)
    p_after = score_prompts(model, ps, which, [iv], scoring=cfg.scoring, batch_size=cfg.batch_size).p_truth
    return [
        {
            "question": p.question,
            "relation": p.relation,
            "truth": p.truth,
            "before": before.texts[j].strip(),
            "after": after.texts[j].strip(),
            "p_truth_before": float(base_scores.p_truth[i]),
            "p_truth_after": float(p_after[j]),
        }
        for j, (i, p) in enumerate(zip(rows, ps))
    ]


__all__ = ["best_and_demo", "demo_rows", "lo_of", "mean_of"]
