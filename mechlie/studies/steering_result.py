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
        return f"{s['model']}, {self.config().get('dataset', '?')}, n={n} test facts"

    def title(self) -> str:
        return f"Steering: {self.where()}"

    def captions(self) -> dict[str, str]:
        return dict(CAPTIONS)

    def figures(self) -> dict[str, go.Figure]:
        from mechlie.studies.steering_figures import steering_figures

        return steering_figures(self._summary, self.sweep(), self.where(), self.config().get("kl_budget"))

    def headline(self) -> list[str]:
        """From ``summary.json`` only: ``best`` (method, setting, recovered, kl, chosen_by, goal,
        goal_met), and per method ``evaluation_on_test`` (recovered, kl, control: n_draws, recovered)
        and ``chosen_on_validation`` (setting)."""
        s = self._summary
        b = s["best"]
        lines = [
            f"- Best method ({b.get('chosen_by', 'chosen on test by an older version')}), on test: "
            f"**{b['method']}** ({setting_text(b['setting'])}): gap recovered {_fmt(b['recovered'])} at KL "
            f"{_fmt(b['kl'])} nats (goal: {b.get('goal', '?')}: {'met' if b.get('goal_met') else 'NOT met'})."
        ]
        for m, r in s["evaluation_on_test"].items():
            c = r["control"]
            lines.append(
                f"- {m} ({setting_text(s['chosen_on_validation'][m]['setting'])}): recovered {_fmt(r['recovered'])}, "
                f"KL {_fmt(r['kl'])}; {c.get('n_draws', '?')} random draws: recovered "
                f"{_fmt(c['recovered'])} (mean, 95% of draws)."
            )
        return lines

    def report(self) -> str:
        """What the study prints when it ends: the test baseline, each method's table row, transfer,
        the learned edits' alignment, the best method, the demo and the gates."""
        return "\n".join(report_lines(self._summary, self.config()))


def report_lines(s: dict, cfg: dict) -> list[str]:
    """The printed report of a steering summary (see :meth:`SteeringResult.report`)."""
    base, chosen, evals = s["baseline"], s["chosen_on_validation"], s["evaluation_on_test"]
    t = base["test"]
    out = [
        f"baseline, test ({t['n_facts']} facts): P(truth) honest {estimate(t['p_truth_honest'])}, "
        f"lying {estimate(t['p_truth_lying'])}, lie rate {estimate(t['lie_rate'])}",
        f"\nEach method at its validation-chosen point (KL <= {cfg.get('kl_budget', '?')} on validation), measured "
        f"on test; 95% CIs; control = {cfg.get('n_controls', '?')} random draws of the same size "
        "(mean [2.5%, 97.5%] of draws)",
        f"{'method':<9} {'setting':<28} {'recovered':<22} {'lie rate':<22} {'KL':<22} {'dCE':<22} "
        f"{'honest acc':<22} {'random: recovered':<22} {'random: KL':<20}",
    ]
    for m, r in evals.items():
        st = Setting(**chosen[m]["setting"])
        desc = f"L{st.layer} a={st.alpha:g}" if st.layer >= 0 else f"a={st.alpha:g} {st.param}"
        keys = ("recovered", "lie_rate_steered", "kl", "delta_ce", "honest_acc_steered")
        cells = [r[k] for k in keys] + [r["control"]["recovered"], r["control"]["kl"]]
        out.append(f"{m:<9} {desc:<28} " + " ".join(f"{_fmt(e):<22}" for e in cells))
    out.append(
        f"lie rate before steering: {estimate(t['lie_rate'])}; honest accuracy before: {estimate(t['honest_acc'])}"
    )
    for m, r in evals.items():
        for k, v in r.items():
            if k.startswith("transfer:"):
                out.append(f"  transfer {m} -> {k[9:]}: recovered {_fmt(v['recovered'])}, KL {_fmt(v['kl'])}")
    out += _alignment_lines(s["alignment"])
    b = s["best"]
    best, setting = b["method"], Setting(**b["setting"])
    out.append(
        f"\nbest: {best} {setting}; goal (>= 0.85 of the gap at KL <= 0.1): {'met' if b['goal_met'] else 'NOT met'}"
    )
    demo = s["demo"]
    out.append(
        f"\n{demo['n_lying_test_prompts']} held-out prompts where the model lies (top-1 false on a fact it knows); "
        f"{best} toward honesty:"
    )
    out += [_demo_row(r) for r in demo["lies_flipped_back"]]
    out.append(f"\nthe reverse: honest prompts, {best} toward lying (alpha {-setting.alpha:+g}):")
    out += [_demo_row(r) for r in demo["honest_steered_into_lies"]]
    for name, g in s["gates"].items():
        out.append(
            f"gate of {name}: mean opening {g['test_lying_final']:.3f} on test lying prompts (final token), "
            f"{g['test_honest_final']:.3f} on test honest prompts, "
            f"{g['test_neutral_tokens']:.3f} on test neutral tokens"
        )
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
