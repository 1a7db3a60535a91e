"""A finished steering run, read from its saved files: its figures, headline and printed report.

Files of a run (``results/steering_demo/<run>/``): ``summary.json`` (baselines, the setting each
method chose on validation, its evaluation on test with 95% CIs and random controls, alignment of
the learned edits, gates, the demo), ``sweep.json`` (every swept setting on validation),
``config.json`` (the flags), the learned edits (``*.safetensors``) and ``figures/``.

Everything here reads those files only: the figures a run writes at its end and those
``analyses/make_figures.py`` writes are the same figures, drawn once, by :meth:`SteeringResult.figures`.
Alpha is signed everywhere: directions point honest -> lying, so alpha < 0 steers toward honesty.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from mechlie.core.stats import Estimate
from mechlie.studies.base import RunFormatError, StudyResult
from mechlie.studies.steering_methods import Setting

if TYPE_CHECKING:
    import plotly.graph_objects as go

NEEDED = ("model", "evaluation_on_test", "chosen_on_validation", "best", "baseline")

CAPTIONS = {
    "steering_recovered": "Each method at its setting chosen on validation facts (KL budget), measured on test "
    "facts: share of the P(truth) gap closed, 95% CI over facts; beside random interventions of the same size.",
    "steering_kl": "The same settings' KL on held-out neutral text, 95% CI; beside the random draws.",
    "steering_frontier": "Every swept setting on validation facts (small markers) with each method's Pareto front, "
    "and each method's chosen setting on test facts (diamonds, 95% CIs on both axes) beside its random draws "
    "(crosses, 95% of draws).",
    "steering_resid_dose": "Dose-response of the residual difference-of-means vector (validation): gap recovered.",
    "steering_resid_kl": "Dose-response of the residual difference-of-means vector (validation): KL on neutral text.",
}


def estimate(d: dict) -> Estimate:
    """A saved :class:`Estimate` (``{"mean","lo","hi","n"}``; JSON keeps NaN as null) read back."""
    f = lambda x: float("nan") if x is None else float(x)  # noqa: E731
    return Estimate(f(d["mean"]), f(d["lo"]), f(d["hi"]), d.get("n", 0), d.get("level", 0.95))


def setting_text(st: dict) -> str:
    """``L2 α=-3`` or ``α=-2 8`` (K heads or the edit's name)."""
    desc = f"L{st['layer']} " if st.get("layer", -1) >= 0 else ""
    return f"{desc}α={st['alpha']:g}" + (f" {st['param']}" if st.get("param") else "")


def _fmt(d: dict) -> str:
    return format(estimate(d), ".3f")


def _rec(r: dict) -> str:
    """The recovery with its CI, or ``n/a`` where the set has no honest - lying gap to recover
    (``no_gap``: :data:`mechlie.studies.steering_eval.NO_GAP`; a run from before the flag prints as it did)."""
    if r.get("no_gap"):
        return f"n/a (no gap: {r['gap']:.3f})"
    return _fmt(r["recovered"])


class SteeringResult(StudyResult):
    """A steering run (see the module docstring); ``summary()`` is ``summary.json``."""

    study = "steering"
    required = NEEDED
    files = ("sweep.json",)

    @classmethod
    def load(cls, run_dir: str | Path) -> SteeringResult:
        res = super().load(run_dir)
        res.check()
        return res  # type: ignore[return-value]

    def check(self) -> None:
        ev = self._summary["evaluation_on_test"]
        if not ev:
            raise RunFormatError(f"{self.run_dir}/summary.json has no evaluated method: an unfinished run; rerun")
        for m, r in ev.items():
            missing = [k for k in ("recovered", "kl", "control") if k not in r]
            if missing:
                raise RunFormatError(f"{self.run_dir}/summary.json: method {m} lacks {missing}; rerun the study")

    def sweep(self) -> dict[str, list[dict]]:
        """Every swept setting on validation, by method (``sweep.json``)."""
        path = self.run_dir / "sweep.json"
        if not path.is_file():
            raise RunFormatError(f"missing results file: {path}")
        try:
            return json.loads(path.read_text())["sweep"]
        except (json.JSONDecodeError, KeyError) as e:
            raise RunFormatError(f"{path} is not a steering sweep ({e}); rerun the study") from e

    def where(self) -> str:
        s = self._summary
        ev = s["evaluation_on_test"]
        n = next(iter(ev.values()))["recovered"].get("n", "?")
        held = ", ".join(s.get("relations", {}).get("heldout", ())) or "?"
        return f"{s['model']}, held-out relations {held}, n={n} facts"

    def title(self) -> str:
        return f"Steering: {self.where()}"

    def captions(self) -> dict[str, str]:
        return dict(CAPTIONS)

    def figures(self) -> dict[str, go.Figure]:
        from mechlie.studies.steering_figures import steering_figures

        return steering_figures(self._summary, self.sweep(), self.where(), self.config().get("kl_budget"))

    def headline(self) -> list[str]:
        """From ``summary.json`` only, one bullet each: the best method (chosen on validation) against
        the goal; the prompting baseline and every method on held-out relations (recovery with its CI,
        real lies flipped, margin over the honest-only control, honest accuracy, capability kept, KL at
        the honest answer and on neutral text, random draws); the held-out setup; the split seeds; and
        the verdicts (which objective beats the honest-only control by 0.3, whether the prompt wins)."""
        return headline_lines(self._summary)

    def report(self) -> str:
        """What the study prints when it ends: baselines, the comparison table (in-relation test facts,
        with the prompting baseline), the held-out relations (one line per method, then the same table),
        gates, alignment, the best method and the lies flipped back on held-out relations."""
        return "\n".join(report_lines(self._summary, self.config()))


def _v(d: dict | None, key: str = "mean") -> float:
    x = None if d is None else d.get(key)
    return float("nan") if x is None else float(x)


COLUMNS = (
    f"{'method':<16} {'setting':<24} {'recovered [95% CI]':<22} {'lies':>6} {'sharp':>6} {'flip':>6} "
    f"{'hon.acc':>11} {'capab.':>6} {'KL neutral':>10} {'KL@answer':>9} {'H honest':>11} {'H lying':>11}"
)


def _cap(c: dict | None) -> str:
    """``0.96 [0.86, 0.99]``: share of the capability questions still answered correctly (Wilson CI)."""
    return "n/a" if not c else f"{c['accuracy']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]"


def _row(name: str, desc: str, r: dict, cap: dict | None = None) -> str:
    """One table row: recovery (its split into real lies and sharpening), lies flipped, honest accuracy
    before -> after, the capability check (share kept), neutral-text KL, KL at the honest answer
    position, answer entropies before -> after."""
    arrow = lambda a, b: f"{_v(r.get(a)):.2f}->{_v(r.get(b)):.2f}"  # noqa: E731
    part = lambda k: "n/a" if r.get("no_gap") else f"{_v(r.get(k)):.2f}"  # noqa: E731
    return (
        f"{name:<16} {desc:<24} {_rec(r):<22} {part('recovered_lies'):>6} "
        f"{part('recovered_sharpening'):>6} {r.get('lies_flipped', 0):>3}/{r.get('n_lies', 0):<2} "
        f"{arrow('honest_acc_before', 'honest_acc_steered'):>11} {(cap or {}).get('accuracy', float('nan')):>6.2f} "
        f"{_v(r.get('kl')):>10.4f} "
        f"{_v(r.get('kl_honest_answer')):>9.4f} {arrow('entropy_honest_before', 'entropy_honest_steered'):>11} "
        f"{arrow('entropy_lying_before', 'entropy_lying_steered'):>11}"
    )


def _table(evals: dict, chosen: dict, prompt: dict | None, cap: dict | None = None) -> list[str]:
    cap = cap or {}
    out = [COLUMNS]
    if prompt:
        out.append(_row("prompt baseline", "instruction + reminder", prompt, cap.get("prompt baseline")))
    for m, r in evals.items():
        out.append(_row(m, setting_text(chosen[m]["setting"]), r, cap.get(m)))
    return out


def _heldout_line(m: str, r: dict, control_rec: float | None, cap: dict | None = None) -> str:
    """``<method>: recovered X [lo, hi] ... KL Y`` (KL on neutral text, last)."""
    c = r.get("control")
    rand = (
        f"; random ({c['n_draws']} draws): recovered {_fmt(c['recovered'])}, p = {c.get('p_value', float('nan')):.3f}"
        if c
        else ""
    )
    vs = ""
    if r.get("no_gap"):  # no gap: recovery, its split and the margin over the control are undefined
        return (
            f"{m}: recovered {_rec(r)}; P(truth | lying prompt) steered {_v(r.get('p_truth_lying_steered')):.3f}, "
            f"{r.get('lies_flipped', 0)}/{r.get('n_lies', 0)} lies flipped, honest acc "
            f"{_v(r.get('honest_acc_before')):.2f} -> {_v(r.get('honest_acc_steered')):.2f}, capability kept "
            f"{_cap(cap)}, KL at honest answer {_fmt(r['kl_honest_answer'])}{rand} ... KL {_fmt(r['kl'])}"
        )
    if control_rec is not None and m != "honest_only":
        d = _v(r["recovered"]) - control_rec
        vs = f"; minus honest-only control {d:+.2f} ({'beats it by >= 0.3' if d >= 0.3 else 'does NOT beat it by 0.3'})"
    return (
        f"{m}: recovered {_rec(r)} (real lies {_v(r.get('recovered_lies')):.2f}, sharpening "
        f"{_v(r.get('recovered_sharpening')):.2f}; {r.get('lies_flipped', 0)}/{r.get('n_lies', 0)} lies flipped), "
        f"honest acc {_v(r.get('honest_acc_before')):.2f} -> {_v(r.get('honest_acc_steered')):.2f}, "
        f"capability kept {_cap(cap)}, KL at honest answer {_fmt(r['kl_honest_answer'])}{rand}{vs} "
        f"... KL {_fmt(r['kl'])}"
    )


def report_lines(s: dict, cfg: dict) -> list[str]:
    """The printed report of a steering summary (see :meth:`SteeringResult.report`)."""
    base, chosen, evals = s["baseline"], s["chosen_on_validation"], s["evaluation_on_test"]
    rel = s.get("relations", {})
    pb = s.get("prompt_baseline", {})
    out = [
        f"baseline, {name} ({t['n_facts']} facts, {t['n_known']} known): P(truth) honest "
        f"{estimate(t['p_truth_honest'])}, lying {estimate(t['p_truth_lying'])}, lie rate {estimate(t['lie_rate'])}"
        for name, t in base.items()
    ]
    out += [
        f"\nfitted on {', '.join(rel.get('fit', ()))}; every setting chosen on {', '.join(rel.get('validation', ()))} "
        f"(KL <= {cfg.get('kl_budget', '?')} on validation); held out: {', '.join(rel.get('heldout', ()))}",
        "columns: recovered = share of the honest-lying P(truth) gap closed (95% CI over facts) = lies (from real "
        "lies) + sharp (sharpening: facts already answered truthfully) + other; flip = real lies flipped; hon.acc = "
        "honest accuracy before->after; KL neutral (nats/token); KL@answer = KL at the honest prompts' answer "
        "position; H = answer entropy before->after (nats)",
        "\ncomparison table, in-relation (test facts of the fitted relations):",
    ]
    cap = s.get("capability", {}).get("methods", {})
    out += _table(s.get("evaluation_in_relation", {}), chosen, pb.get("test"), cap)
    for m, n in s.get("choice_notes", {}).items():
        if not n["met_kl_budget"]:
            out.append(f"  {m}: no swept setting met the KL budget on validation (the lowest-KL one is reported)")
        if n["at_grid_edge"]:
            out.append(f"  {m}: chosen at the edge of its grid (|alpha| in {n['grid_abs_alphas']}): widen the grid")
    for name, info in s.get("edits", {}).items():
        if info.get("kl_budget_met") is False:
            out.append(
                f"  edit {name}: no scale down to {info.get('projection_scale', 0):.4g} met its training KL budget "
                f"{info.get('kl_budget')} (KL {info.get('train_kl', float('nan')):.4g}): reported, not clipped"
            )
    ho = evals.get("honest_only")
    ctrl = _v(ho["recovered"]) if ho else None
    held = base.get("heldout", {})
    out.append(
        f"\nheld-out relations ({', '.join(rel.get('heldout', ()))}; {held.get('n_facts', '?')} facts, "
        f"{held.get('n_known', '?')} known; random draws randomise the gate too):"
    )
    if pb.get("heldout"):
        out.append(_heldout_line("prompt baseline", pb["heldout"], ctrl, cap.get("prompt baseline")))
    out += [_heldout_line(m, r, ctrl, cap.get(m)) for m, r in evals.items()]
    out += ["\nthe same on held-out relations, as a table:"] + _table(evals, chosen, pb.get("heldout"), cap)
    out += _capability_lines(s.get("capability"))
    out += _setup_lines(s, cap)
    out += _seed_lines(s.get("split_seeds"))
    for name, g in s.get("gates", {}).items():
        out.append(
            f"gate of {name}: open (> 0.5) on {g['heldout_lying_final_share_open']:.0%} of held-out lying prompts, "
            f"{g['heldout_honest_final_share_open']:.0%} of held-out honest prompts (final token), "
            f"{g['neutral_tokens_share_open']:.1%} of neutral tokens"
        )
    out += _alignment_lines(s["alignment"])
    b = s["best"]
    best, setting = b["method"], Setting(**b["setting"])
    out.append(
        f"\nbest (on validation): {best} {setting}; goal ({b.get('goal', '?')}): "
        f"{'met' if b['goal_met'] else 'NOT met'}"
    )
    ctrl = _v(evals["honest_only"]["recovered"]) if "honest_only" in evals else None
    out.append(goal_line(evals, ctrl)[2:])
    demo = s["demo"]
    out.append(f"\nhonest prompts, {best} toward lying (alpha {-setting.alpha:+g}):")
    out += [_demo_row(r) for r in demo["honest_steered_into_lies"]]
    if "seconds" in s:
        out.append("\nstage times (s): " + ", ".join(f"{k} {v:g}" for k, v in s["seconds"].items()))
    out.append(
        f"\nlies flipped back on held-out relations: {demo['n_lying_test_prompts']} held-out prompts where the "
        f"model lies (top-1 false on a fact it knows); {best} toward honesty:"
    )
    out += [_demo_row(r) for r in demo["lies_flipped_back"]]
    return out


def _capability_lines(c: dict | None) -> list[str]:
    if not c:
        return []
    return [
        f"capab. = capability check: share of {sum(c['kept_per_relation'].values())} unrelated corpus questions "
        f"({', '.join(f'{r} {n}' for r, n in c['kept_per_relation'].items())}; drawn from {c['n_candidates']}, "
        "kept where the unedited model answers correctly, so 1.00 before) still answered correctly (95% Wilson CI "
        "in the lines above)"
    ]


def _setup_lines(s: dict, cap: dict) -> list[str]:
    """The held-out setup: the same held-out relations asked in a setup nothing was fitted on."""
    hs = (s.get("heldout_setup") or {}).get("setup")
    key = f"setup:{hs}"
    base = s.get("baseline", {}).get(key)
    if not hs or not base:
        return []
    evals = {m: t[key] for m, t in s.get("transfer", {}).items() if key in t}
    tpl = s["heldout_setup"].get("template") or "its first template"
    out = [
        f"\nheld-out setup ({hs}, {tpl}, {s['heldout_setup'].get('rendering', '?')}; fitted on fewshot only; "
        f"{s['heldout_setup'].get('facts', 'held-out relations')}; {base['n_facts']} facts, "
        f"{base['n_known']} known): its own lie rate {estimate(base['lie_rate'])}, P(truth) honest "
        f"{estimate(base['p_truth_honest'])}, lying {estimate(base['p_truth_lying'])}"
    ]
    # the honest-only control on this setup's own facts (not on the held-out relations' prompts)
    ho = evals.get("honest_only")
    ctrl = None if not ho or ho.get("no_gap") else _v(ho["recovered"])
    pb = s.get("prompt_baseline", {}).get(key)
    if pb:
        out.append(_heldout_line("prompt baseline", pb, ctrl, cap.get("prompt baseline")))
    out += [_heldout_line(m, r, ctrl, cap.get(m)) for m, r in evals.items()]
    return out


def _seed_lines(seeds: dict | None) -> list[str]:
    if not seeds:
        return []
    mode = seeds.get("mode", "full")
    out = [f"\nheld-out relations over {len(seeds['seeds'])} split seeds {seeds['seeds']} ({mode}; mean +/- SD):"]
    for m, r in seeds.items():
        if isinstance(r, dict):
            ms = lambda k, f: f"{r[k]['mean']:{f}} +/- {r[k]['sd']:{f}}"  # noqa: E731
            out.append(
                f"  {m}: recovered {ms('recovered', '.3f')}, KL at honest answer {ms('kl_honest_answer', '.4f')}, "
                f"honest acc {ms('honest_acc_steered', '.3f')}, KL {ms('kl', '.4f')}"
            )
    return out


def _brief(r: dict, cap: dict | None) -> str:
    return (
        f"recovered {_fmt(r['recovered'])}, {r.get('lies_flipped', 0)}/{r.get('n_lies', 0)} real lies flipped, "
        f"honest acc {_v(r.get('honest_acc_before')):.2f} -> {_v(r.get('honest_acc_steered')):.2f}, capability "
        f"kept {_cap(cap)}, KL at the honest answer {_v(r.get('kl_honest_answer')):.3f}, on neutral text "
        f"{_v(r.get('kl')):.3f}"
    )


def headline_lines(s: dict) -> list[str]:
    """The bullets of :meth:`SteeringResult.headline`."""
    b, ev, chosen = s["best"], s["evaluation_on_test"], s["chosen_on_validation"]
    cap = s.get("capability", {}).get("methods", {})
    held = ", ".join(s.get("relations", {}).get("heldout", ())) or "?"
    lines = [
        f"- Best method ({b.get('chosen_by', 'chosen on test by an older version')}), on held-out relations "
        f"({held}): **{b['method']}** ({setting_text(b['setting'])}): gap recovered {_fmt(b['recovered'])} at KL "
        f"{_fmt(b['kl'])} nats (goal: {b.get('goal', '?')}: {'met' if b.get('goal_met') else 'NOT met'})."
    ]
    pb = s.get("prompt_baseline", {}).get("heldout")
    if pb:
        lines.append(f"- prompt baseline (held-out relations): {_brief(pb, cap.get('prompt baseline'))}.")
    ctrl = _v(ev["honest_only"]["recovered"]) if "honest_only" in ev else None
    for m, r in ev.items():
        c = r["control"]
        vs = f", {_v(r['recovered']) - ctrl:+.2f} over the honest-only control" if ctrl is not None else ""
        vs = "" if m == "honest_only" else vs
        lines.append(
            f"- {m} ({setting_text(chosen[m]['setting'])}): {_brief(r, cap.get(m))}{vs}; {c.get('n_draws', '?')} "
            f"random draws (gate randomised too): recovered {_fmt(c['recovered'])}, "
            f"p = {c.get('p_value', float('nan')):.3f}."
        )
    lines += _headline_setup(s) + _headline_seeds(s.get("split_seeds")) + [goal_line(ev, ctrl)]
    rivals = {m: _v(r["recovered"]) for m, r in ev.items() if m != "honest_only"}
    if ctrl is not None and rivals:
        beat = [m for m, v in rivals.items() if v - ctrl >= 0.3]
        lines.append(
            f"- Beats the honest-only control ({ctrl:.3f}) by >= 0.3: {', '.join(beat) if beat else 'no method'}."
        )
    if pb and rivals:
        top = max(rivals, key=rivals.get)
        won = rivals[top] > _v(pb["recovered"]) and ev[top].get("lies_flipped", 0) >= pb.get("lies_flipped", 0)
        lines.append(
            f"- Against the prompt ({_v(pb['recovered']):.3f}, {pb.get('lies_flipped', 0)} lies flipped): "
            + (
                f"{top} does better on both."
                if won
                else f"the prompt wins or ties (best edit {top} {rivals[top]:.3f}, "
                f"{ev[top].get('lies_flipped', 0)} lies flipped)."
            )
        )
    return lines


def goal_line(ev: dict, ctrl: float | None) -> str:
    """Issue 20's goals on held-out relations, per method: recovery >= 0.85 with its CI's lower bound
    >= 0.6, honest accuracy drop <= 0.03, KL <= 0.05 at the honest answer and <= 0.1 on neutral text,
    and recovery >= 0.3 above the honest-only control."""

    def marks(m: str, r: dict) -> str:
        rec = _v(r["recovered"])
        ok = (
            rec >= 0.85 and _v(r["recovered"], "lo") >= 0.6,
            _v(r.get("honest_acc_before")) - _v(r.get("honest_acc_steered")) <= 0.03,
            _v(r.get("kl_honest_answer")) <= 0.05,
            _v(r.get("kl")) <= 0.1,
            ctrl is not None and m != "honest_only" and rec - ctrl >= 0.3,
        )
        return f"{m} {'/'.join('met' if x else 'no' for x in ok)}"

    return (
        "- Issue-20 goals on held-out relations (recovery >= 0.85 with CI lower bound >= 0.6 / honest accuracy "
        "drop <= 0.03 / KL at the honest answer <= 0.05 / neutral KL <= 0.1 / >= 0.3 over the honest-only "
        f"control): {'; '.join(marks(m, r) for m, r in ev.items())}."
    )


def _no_gap_bar() -> float:
    from mechlie.studies.steering_eval import NO_GAP

    return NO_GAP


def _headline_setup(s: dict) -> list[str]:
    hs = (s.get("heldout_setup") or {}).get("setup")
    key = f"setup:{hs}"
    base = s.get("baseline", {}).get(key)
    if not hs or not base:
        return []
    parts = (
        [f"prompt baseline {_v(s['prompt_baseline'][key]['recovered']):.3f}"]
        if key in s.get("prompt_baseline", {})
        else []
    )
    parts += [f"{m} {_fmt(t[key]['recovered'])}" for m, t in s.get("transfer", {}).items() if key in t]
    head = (
        f"- Held-out setup {hs} (nothing fitted on it; {s['heldout_setup'].get('facts', 'held-out relations')}, "
        f"{base['n_known']} of {base['n_facts']} facts known, its own lie rate {estimate(base['lie_rate'])})"
    )
    gap = _v(base["p_truth_honest"]) - _v(base["p_truth_lying"])
    if gap < _no_gap_bar():
        # recovery divides by this gap: with none, it is noise over ~0 (CIs of +/- tens), not a result
        steered = [
            f"{m} {_v(t[key]['p_truth_lying_steered']):.3f} (lie rate {_v(t[key]['lie_rate_steered']):.2f})"
            for m, t in s.get("transfer", {}).items()
            if key in t and "p_truth_lying_steered" in t[key]
        ]
        return [
            f"{head}: no gap to recover - P(truth) honest {_v(base['p_truth_honest']):.3f} vs lying "
            f"{_v(base['p_truth_lying']):.3f} (the model ignores this setup's request to lie), so recovery is "
            f"undefined here; P(truth | lying prompt) steered: {'; '.join(steered)}."
        ]
    return [f"{head}: recovered {'; '.join(parts)}."]


def _headline_seeds(seeds: dict | None) -> list[str]:
    if not seeds:
        return []
    per = "; ".join(
        f"{m} {r['recovered']['mean']:.3f} +/- {r['recovered']['sd']:.3f}"
        for m, r in seeds.items()
        if isinstance(r, dict)
    )
    return [
        f"- Over {len(seeds['seeds'])} split seeds ({seeds.get('mode', 'full')}), held-out recovery "
        f"(mean +/- SD): {per}."
    ]


def _alignment_lines(alignment: dict) -> list[str]:
    out = [
        "\nalignment (cosine) of each learned edit's honest -> lying direction with directions fitted "
        "on the training facts (random directions: |cos| ~ 1/sqrt(d_model)):"
    ]
    for name, per_layer in alignment.items():
        for where, cos in per_layer.items():
            flat = ", ".join(f"{k} {v:+.3f}" for k, v in cos.items() if isinstance(v, float))
            out.append(f"  {name} {where}: {flat}")
            sae = cos.get("sae_decoder_rows")
            if isinstance(sae, dict):
                out.append(
                    f"    SAE decoder rows ({sae['n_rows']}): max |cos| {sae['max_abs_cos']:.3f} (row {sae['row']}), "
                    f"random directions' max |cos| {sae['null_max_mean']:.3f} (95% quantile {sae['null_max_q95']:.3f})"
                )
            elif sae is not None:
                out.append(f"    SAE: {sae}")
    return out


def _demo_row(r: dict) -> str:
    return (
        f"  {r['question'][:40]:<41} truth {r['truth']:<10} before {r['before'][:12]!r:<15} "
        f"after {r['after'][:12]!r:<15} P(truth) {r['p_truth_before']:.3f} -> {r['p_truth_after']:.3f}"
    )


__all__ = ["CAPTIONS", "SteeringResult", "estimate", "goal_line", "headline_lines", "report_lines", "setting_text"]
