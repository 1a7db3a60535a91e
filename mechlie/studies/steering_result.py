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
        """From ``summary.json`` only: ``best`` (method, setting, recovered, kl, chosen_by, goal,
        goal_met), the prompting baseline and per method ``evaluation_on_test`` (held-out relations:
        recovered, kl, control) and ``chosen_on_validation`` (setting)."""
        s = self._summary
        b = s["best"]
        lines = [
            f"- Best method ({b.get('chosen_by', 'chosen on test by an older version')}), on held-out relations: "
            f"**{b['method']}** ({setting_text(b['setting'])}): gap recovered {_fmt(b['recovered'])} at KL "
            f"{_fmt(b['kl'])} nats (goal: {b.get('goal', '?')}: {'met' if b.get('goal_met') else 'NOT met'})."
        ]
        pb = s.get("prompt_baseline", {}).get("heldout")
        if pb:
            lines.append(f"- prompt baseline: recovered {_fmt(pb['recovered'])}, KL {_fmt(pb['kl'])}.")
        for m, r in s["evaluation_on_test"].items():
            c = r["control"]
            lines.append(
                f"- {m} ({setting_text(s['chosen_on_validation'][m]['setting'])}): recovered {_fmt(r['recovered'])}, "
                f"KL {_fmt(r['kl'])}; {c.get('n_draws', '?')} random draws: recovered "
                f"{_fmt(c['recovered'])} (mean, 95% of draws)."
            )
        return lines

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
    f"{'hon.acc':>11} {'KL neutral':>10} {'KL@answer':>9} {'H honest':>11} {'H lying':>11}"
)


def _row(name: str, desc: str, r: dict) -> str:
    """One table row: recovery (its split into real lies and sharpening), lies flipped, honest accuracy
    before -> after, neutral-text KL, KL at the honest answer position, answer entropies before -> after."""
    arrow = lambda a, b: f"{_v(r.get(a)):.2f}->{_v(r.get(b)):.2f}"  # noqa: E731
    return (
        f"{name:<16} {desc:<24} {_fmt(r['recovered']):<22} {_v(r.get('recovered_lies')):>6.2f} "
        f"{_v(r.get('recovered_sharpening')):>6.2f} {r.get('lies_flipped', 0):>3}/{r.get('n_lies', 0):<2} "
        f"{arrow('honest_acc_before', 'honest_acc_steered'):>11} {_v(r.get('kl')):>10.4f} "
        f"{_v(r.get('kl_honest_answer')):>9.4f} {arrow('entropy_honest_before', 'entropy_honest_steered'):>11} "
        f"{arrow('entropy_lying_before', 'entropy_lying_steered'):>11}"
    )


def _table(evals: dict, chosen: dict, prompt: dict | None) -> list[str]:
    out = [COLUMNS]
    if prompt:
        out.append(_row("prompt baseline", "instruction + reminder", prompt))
    for m, r in evals.items():
        out.append(_row(m, setting_text(chosen[m]["setting"]), r))
    return out


def _heldout_line(m: str, r: dict, control_rec: float | None) -> str:
    """``<method>: recovered X [lo, hi] ... KL Y`` (KL on neutral text, last)."""
    c = r.get("control")
    rand = (
        f"; random ({c['n_draws']} draws): recovered {_fmt(c['recovered'])}, p = {c.get('p_value', float('nan')):.3f}"
        if c
        else ""
    )
    vs = ""
    if control_rec is not None and m != "honest_only":
        d = _v(r["recovered"]) - control_rec
        vs = f"; minus honest-only control {d:+.2f} ({'beats it by >= 0.3' if d >= 0.3 else 'does NOT beat it by 0.3'})"
    return (
        f"{m}: recovered {_fmt(r['recovered'])} (real lies {_v(r.get('recovered_lies')):.2f}, sharpening "
        f"{_v(r.get('recovered_sharpening')):.2f}; {r.get('lies_flipped', 0)}/{r.get('n_lies', 0)} lies flipped), "
        f"honest acc {_v(r.get('honest_acc_before')):.2f} -> {_v(r.get('honest_acc_steered')):.2f}, "
        f"KL at honest answer {_fmt(r['kl_honest_answer'])}{rand}{vs} ... KL {_fmt(r['kl'])}"
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
    out += _table(s.get("evaluation_in_relation", {}), chosen, pb.get("test"))
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
        out.append(_heldout_line("prompt baseline", pb["heldout"], ctrl))
    out += [_heldout_line(m, r, ctrl) for m, r in evals.items()]
    out += ["\nthe same on held-out relations, as a table:"] + _table(evals, chosen, pb.get("heldout"))
    seeds = s.get("split_seeds")
    if seeds:
        out.append(f"\nheld-out relations over {len(seeds['seeds'])} split seeds {seeds['seeds']} (mean +/- SD):")
        for m, r in seeds.items():
            if m != "seeds":
                ms = lambda k, f: f"{r[k]['mean']:{f}} +/- {r[k]['sd']:{f}}"  # noqa: E731
                out.append(
                    f"  {m}: recovered {ms('recovered', '.3f')}, KL at honest answer {ms('kl_honest_answer', '.4f')}, "
                    f"honest acc {ms('honest_acc_steered', '.3f')}, KL {ms('kl', '.4f')}"
                )
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


__all__ = ["CAPTIONS", "SteeringResult", "estimate", "report_lines", "setting_text"]
