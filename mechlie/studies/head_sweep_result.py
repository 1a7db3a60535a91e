"""A finished head sweep read back from its run folder: its files, figures, headline and report.

The figures are drawn from saved files only (``summary.json``, ``behaviour.json``, and two
matrices: the per-head held-out AUROC from ``directions.safetensors`` and the per-head patching
effect from ``patching.safetensors``), so the figures a sweep writes when it ends and those
``analyses/make_figures.py`` draws later are the same figures, from the same code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from mechlie.core.io import load_tensors, save_tensors
from mechlie.core.metrics import AnswerScores
from mechlie.studies.base import RunFormatError, StudyResult, ci_text
from mechlie.studies.head_sweep_seeds import split_counts_short, split_seeds_short, split_seeds_text

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from torch import Tensor

    from mechlie.causal.patching import PatchResult
    from mechlie.read.directions import DirectionScores

FILES = ("behaviour.json", "directions.safetensors", "patching.safetensors")
VIEW_PAIRS = 8  # held-out pairs shown in the head views (one batch of 16 prompts: a few seconds)

LABEL_SWAP_NOTE = (
    "The label-swap null tests only whether a head's honest and lying activations differ at all. The two prompts "
    "of a pair differ in their demonstrations (true vs false answers), so a head that passes it encodes which "
    "demonstrations were shown; passing it is not evidence that the head encodes lying."
)


def bar_notes(h: DirectionScores) -> list[str]:
    """What the two bars of each control mean, with the draws they come from."""
    n_null, n_rand, n_comp = h.null_auroc.shape[0], h.random_auroc.shape[0], h.auroc.numel()
    return [
        f"Each head has two bars per control. Its own bar: the 95th percentile of its own {n_null} label-swap draws "
        f"or {n_rand} random directions (uncorrected: under the null about 5% of the {n_comp} heads pass by chance). "
        "The max bar: the 95th percentile over draws of the maximum over all heads, the family-wise bar for "
        "'the best head beats chance'; applied to each head it is conservative.",
        "Random directions are scored on the real framing labels: the two framings are separable at all, so a "
        "head above its random bar reads the framing better than a random direction in its own output space.",
    ]


def per_head_bars(h: DirectionScores) -> dict:
    """Per head ([layer][head] grids): the held-out AUROC, both controls' own 95th percentiles and
    which bars it passes; the max bars once (they are the same for every head) and the counts."""
    return {
        "auroc": h.auroc.tolist(),
        "null_own_q95": h.null_q95.tolist(),
        "random_own_q95": h.random_q95.tolist(),
        "null_max_bar_95": h.null_bar,
        "random_max_bar_95": h.random_bar,
        "passes_null_own": h.beats_null_own.tolist(),
        "passes_null_max": h.beats_null.tolist(),
        "passes_random_own": h.beats_random_own.tolist(),
        "passes_random_max": h.beats_random.tolist(),
        "n_pass": {
            "null_own": int(h.beats_null_own.sum()),
            "null_max": int(h.beats_null.sum()),
            "random_own": int(h.beats_random_own.sum()),
            "random_max": int(h.beats_random.sum()),
        },
    }


def _scores_tensors(s: AnswerScores) -> dict:
    out = {"p_truth": s.p_truth, "logit_diff": s.logit_diff, "correct": s.correct, "choice_cov": s.choice_cov}
    if s.logp_truth_seq is not None:
        out.update(logp_truth_seq=s.logp_truth_seq, logp_lie_seq=s.logp_lie_seq)
    return out


def save_patch(path: Path, results: dict[str, PatchResult]) -> None:
    """``patching.safetensors``: per kind, the patched and the clean / corrupt per-pair scores."""
    tensors = {
        k: {
            "p_truth": r.p_truth,
            "logit_diff": r.logit_diff,
            "clean": _scores_tensors(r.clean),
            "corrupt": _scores_tensors(r.corrupt),
        }
        for k, r in results.items()
    }
    save_tensors(path, tensors, {k: {"kind": r.kind} for k, r in results.items()})


def load_patch(path: Path) -> dict[str, PatchResult]:
    from mechlie.causal.patching import PatchResult

    tensors, meta = load_tensors(path)
    return {
        k: PatchResult(
            kind=meta[k]["kind"],
            p_truth=t["p_truth"],
            logit_diff=t["logit_diff"],
            clean=AnswerScores(**t["clean"]),
            corrupt=AnswerScores(**t["corrupt"]),
        )
        for k, t in tensors.items()
    }


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _head_figures(s: dict, cfg: dict, head_auroc: Tensor, head_effect: Tensor) -> dict[str, go.Figure]:
    from mechlie.report import figures as F

    k = s["top_k"]
    ha = s["head_auroc"]
    n_p = s["patching"]["n_pairs"]
    where = f"{Path(s['model']).name}, {Path(s['dataset']).name} ({s['fmt']})"
    n_txt = f"n={s['n_pairs']} pairs, {s['n_test_facts']} held-out facts"
    top, atop = s["top_heads_by_patching"], s["top_heads_by_auroc"]
    return {
        "head_auroc": F.heatmap(
            head_auroc,
            f"Held-out AUROC per head ({where}, {n_txt})<br><sup>{bars_text(ha)}</sup>",
            colorbar="AUROC",
            zmid=0.5,
        ),
        "head_patching": F.heatmap(
            head_effect,
            f"Patching each head's z honest→lying at the final token ({where}, n={n_p} pairs)"
            "<br><sup>normalized effect on the logit difference: 0 = lying, 1 = honest</sup>",
            colorbar="norm. effect",
            zmid=0.0,
        ),
        "top_heads": F.errorbars(
            [head_label(t["layer"], t["head"]) for t in top],
            {
                "patching effect (logit diff)": tuple([t[c] for t in top] for c in ("effect", "lo", "hi")),
                "patching effect (P(truth))": tuple(
                    [t[c] for t in top] for c in ("effect_p_truth", "p_truth_lo", "p_truth_hi")
                ),
            },
            f"Top {k} heads by patching effect, 95% CI over {n_p} pairs ({where})",
            y_label="normalized effect",
            secondary={
                "share of resamples top-1": [t["top1_share"] for t in top],
                f"share of resamples in top {k}": [t["topk_share"] for t in top],
            },
            secondary_label="rank stability",
        ),
        "top_heads_auroc": F.errorbars(
            [head_label(t["layer"], t["head"]) for t in atop],
            {"held-out AUROC": tuple([t[c] for t in atop] for c in ("auroc", "lo", "hi"))},
            f"Top {k} heads by held-out AUROC, 95% CI over held-out facts ({where})<br><sup>{n_txt}"
            + (
                "; each head's own random-direction 95% bar: "
                + ", ".join(f"{head_label(t['layer'], t['head'])} {t['random_q95']:.2f}" for t in atop[:5])
                if atop and "random_q95" in atop[0]
                else ""
            )
            + "</sup>",
            y_label="AUROC",
            hlines={
                f"max-null 95% bar ({cfg.get('n_perm', ha['null']['n_draws'])} label swaps)": ha["null"]["max_bar_95"],
                f"random-direction max 95% bar ({cfg.get('n_random', ha['random']['n_draws'])})": ha["random"][
                    "max_bar_95"
                ],
            },
        ),
    }


def _layer_and_behaviour_figures(s: dict, beh: dict) -> dict[str, go.Figure]:
    from mechlie.report import figures as F

    r, p = s["resid_auroc"], s["patching"]
    where = f"{Path(s['model']).name}, {Path(s['dataset']).name} ({s['fmt']})"
    n_txt = f"n={s['n_pairs']} pairs, {s['n_test_facts']} held-out facts"
    figs = {
        "layer_curves": F.lines(
            range(len(r["per_layer"])),
            {
                "resid_post AUROC (held out)": r["per_layer"],
                "null (label swaps), 95th pct": r["null_q95"],
                "random directions, mean": r["random_mean"],
                "resid_pre patching effect (logit diff)": p["resid_effect_logit_diff"],
                "resid_pre patching effect (P(truth))": p["resid_effect_p_truth"],
            },
            f"Per layer: residual direction AUROC and residual patching effect ({where})"
            f"<br><sup>{n_txt}; {p['n_pairs']} pairs patched; bands: 95% CIs</sup>",
            y_label="AUROC / normalized effect",
            bands={
                "resid_post AUROC (held out)": (r["per_layer_lo"], r["per_layer_hi"]),
                "resid_pre patching effect (logit diff)": (
                    p["resid_effect_logit_diff_lo"],
                    p["resid_effect_logit_diff_hi"],
                ),
                "resid_pre patching effect (P(truth))": (p["resid_effect_p_truth_lo"], p["resid_effect_p_truth_hi"]),
            },
        )
    }
    groups = {"all pairs": beh["all_ci"]}
    if "known_ci" in beh:
        groups["known pairs"] = beh["known_ci"]
    for rel, v in beh["relations"].items():
        groups[f"{rel} (all)"] = v["all_ci"]
    figs["behaviour"] = F.errorbars(
        list(groups),
        {
            name: tuple([g[m][c] for g in groups.values()] for c in ("mean", "lo", "hi"))
            for m, name in (("p_truth_honest", "P(truth) honest"), ("p_truth_lying", "P(truth) lying"))
        },
        f"P(truth) by framing, 95% CI over facts ({where}; all {beh['all']['n']} pairs, {beh['all']['n_known']} known)",
        y_label="P(truth)",
    )
    return figs


def _split_seed_figure(s: dict) -> dict[str, go.Figure]:
    """Per split seed, its top head's held-out effect with its 95% CI, beside the mean over seeds
    (none for a summary without ``over_split_seeds``)."""
    from mechlie.report import figures as F

    o = s.get("over_split_seeds")
    if not o:
        return {}
    rows, e = o["per_seed"], o["effect"]
    return {
        "split_seeds": F.errorbars(
            [f"seed {r['seed']}: {head_label(*r['top_head'])}" for r in rows],
            {"held-out effect (logit diff)": tuple([r[c] for r in rows] for c in ("effect", "lo", "hi"))},
            f"Top head per split seed, chosen on its training facts, 95% CI over its held-out facts "
            f"({Path(s['model']).name})<br><sup>mean ± SD over seeds {e['mean']:.3f} ± {e['sd']:.3f}; "
            "the splits share facts</sup>",
            y_label="normalized effect",
            hlines={"mean over seeds": e["mean"]},
        )
    }


def sweep_figures(summary: dict, config: dict, head_auroc: Tensor, head_effect: Tensor, behaviour: dict) -> dict:
    """The head sweep's figures by file stem, every effect with its 95% CI: ``summary`` (as in
    ``summary.json``), the run's ``config``, the [L, H] held-out AUROC and patching effect, and
    ``behaviour.json``."""
    return {
        **_head_figures(summary, config, head_auroc, head_effect),
        **_layer_and_behaviour_figures(summary, behaviour),
        **_split_seed_figure(summary),
    }


def _ci(e: dict, p: int = 3) -> str:
    return ci_text(e, f".{p}f")


def bars_text(ha: dict) -> str:
    """Both bars of both controls and how many components pass each (the max bars only, for a
    summary written before the per-component bars)."""
    n, nu, ra = ha["n_components"], ha["null"], ha["random"]
    if "n_pass_own" not in nu:
        return (
            f"max-over-heads null 95% bar {nu['max_bar_95']:.3f} ({nu['n_pass']}/{n} heads pass), random-direction bar "
            f"{ra['max_bar_95']:.3f} ({ra['n_pass']} pass)"
        )

    def one(d: dict) -> str:
        lo, hi = d["own_q95_range"]
        return (
            f"max-over-heads 95% bar {d['max_bar_95']:.3f} ({d['n_pass']}/{n} pass), each head's own 95% bar "
            f"{lo:.3f}-{hi:.3f} ({d['n_pass_own']}/{n} pass)"
        )

    return f"label-swap null: {one(nu)}; random directions: {one(ra)}"


def layer_choice_text(r: dict) -> str | None:
    """The layer choice over split seeds, in one sentence (None for a summary without it)."""
    o = r.get("over_seeds")
    if not o:
        return None
    c = o["chosen"]
    verdict = o["verdict"].replace(f"component {c}", f"layer {c}")
    return (
        f"Layer choice over {len(o['seeds'])} split seeds ({o['fit']}, the reported fit; {o['interval']}): "
        f"{verdict}; layer {c} is the best in {o['chosen_best_share']:.0%} of seeds."
    )


class HeadSweepResult(StudyResult):
    """A head sweep's run folder (:mod:`mechlie.studies.head_sweep`).

    ``summary.json`` keys used by :meth:`headline`: ``model``, ``dataset``, ``fmt``, ``n_pairs``,
    ``n_test_facts``, ``top_k``, ``behaviour.known.ci`` (or ``behaviour.all.ci``), ``head_auroc``
    (``max``, ``null``, ``random``, ``n_components``; ``null`` / ``random`` ``own_q95_range`` and
    ``n_pass_own`` when present), ``patching`` (``n_pairs``, ``resid_effect_logit_diff`` and its
    ``_lo`` / ``_hi``), ``top_heads_by_patching``, and when present ``over_split_seeds``,
    ``resid_auroc.over_seeds`` and ``notes`` (a summary written before them reads as it did).
    """

    study = "head_sweep"
    required = (
        "model",
        "dataset",
        "fmt",
        "n_pairs",
        "n_test_facts",
        "top_k",
        "behaviour",
        "head_auroc",
        "resid_auroc",
        "patching",
        "top_heads_by_patching",
        "top_heads_by_auroc",
    )
    files = FILES
    title_format = "Head sweep: {model}, {dataset} ({fmt}), n={n_pairs} pairs"

    @classmethod
    def load(cls, run_dir: str | Path) -> HeadSweepResult:
        run_dir = Path(run_dir)
        if (run_dir / "patching.pt").is_file() and not (run_dir / "patching.safetensors").is_file():
            raise RunFormatError(
                f"{run_dir} is a head sweep saved as a pickle (patching.pt) by an older version of mechlie; result "
                "files are never unpickled: rerun the head sweep"
            )
        return super().load(run_dir)  # type: ignore[return-value]  # summary.json first, then FILES

    def figures(self) -> dict[str, go.Figure]:
        from mechlie.read.directions import DirectionScores

        tensors, meta = self.tensors("directions.safetensors")
        if "head_out" not in tensors:
            raise RunFormatError(f"{self.run_dir}/directions.safetensors has no head_out scores: rerun the sweep")
        heads = DirectionScores.from_tensors(tensors["head_out"], meta["head_out"])
        patch = load_patch(self.run_dir / "patching.safetensors")
        if "z" not in patch:
            raise RunFormatError(f"{self.run_dir}/patching.safetensors has no 'z' results: rerun the sweep")
        beh = json.loads((self.run_dir / "behaviour.json").read_text())
        return sweep_figures(self._summary, self.config(), heads.auroc, patch["z"].effect("logit_diff"), beh)

    def captions(self) -> dict[str, str]:
        k = self._summary["top_k"]
        return {
            "head_auroc": "Held-out AUROC of each head's difference-of-means direction.",
            "head_patching": "Normalized effect of patching each head's z from the honest into the lying run.",
            "top_heads": f"The {k} heads with the largest patching effect, 95% CIs over pairs, and rank stability.",
            "top_heads_auroc": f"The {k} heads with the highest held-out AUROC, beside the max-over-heads null bars.",
            "layer_curves": "Per layer: residual direction AUROC and residual patching effect, 95% CI bands.",
            "behaviour": "P(truth) under the honest and the lying framing, 95% CIs over facts.",
            "split_seeds": "Per split seed, the top head chosen on its training facts and its effect on its "
            "held-out facts (95% CI), beside the mean over seeds.",
        }

    def headline(self) -> list[str]:
        s = self._summary
        b = s["behaviour"]["known"].get("ci") or s["behaviour"]["all"]["ci"]
        ha, p = s["head_auroc"], s["patching"]
        top = s["top_heads_by_patching"]
        m = ha["max"]
        eff = p["resid_effect_logit_diff"]
        best = max(range(len(eff)), key=lambda i: eff[i])
        t = top[0]
        o = s.get("over_split_seeds")
        rest = ", ".join(f"L{x['layer']}H{x['head']} ({x['effect']:.2f})" for x in top[1:5])
        return [
            f"- {s['n_pairs']} pairs analysed ({s['n_test_facts']} held-out facts); P(truth) honest "
            f"{_ci(b['p_truth_honest'])} vs lying {_ci(b['p_truth_lying'])} (95% CI over facts).",
            f"- Best head by held-out AUROC: L{m['component'][0]}H{m['component'][1]} {m['auroc']:.3f} "
            f"[{m['lo']:.3f}, {m['hi']:.3f}]; {bars_text(ha)}" + (f"; {split_counts_short(o)}." if o else "."),
            f"- Top head by patching: L{t['layer']}H{t['head']}, effect {t['effect']:.2f} "
            f"[{t['lo']:.2f}, {t['hi']:.2f}] (95% CI over {p['n_pairs']} pairs; top-1 in {t['top1_share']:.0%} "
            f"of resamples); next: {rest}" + (f"; {split_seeds_short(o)}." if o else "."),
            f"- Residual patching reaches {eff[best]:.2f} [{p['resid_effect_logit_diff_lo'][best]:.2f}, "
            f"{p['resid_effect_logit_diff_hi'][best]:.2f}] at layer {best}.",
        ] + [f"- {line}" for line in self._over_seeds() + self._caveats()]

    def _over_seeds(self) -> list[str]:
        """The headline over split seeds, when the summary has it."""
        o = self._summary.get("over_split_seeds")
        return split_seeds_text(o) if o else []

    def _caveats(self) -> list[str]:
        """The layer choice over seeds and what the label-swap null tests (from the summary's notes)."""
        s = self._summary
        layer = layer_choice_text(s["resid_auroc"])
        notes = [n for n in s.get("notes", []) if n.startswith("The label-swap null")]
        return ([layer] if layer else []) + notes

    def report(self) -> str:
        from mechlie.report.figures import png_problem

        s = self._summary
        b, d, k = s["behaviour"], s["data"], s["top_k"]
        out = [
            f"\n{s['model']}, {d['source']}: {d['pairs_used']} pairs used, {s['n_pairs']} analysed "
            f"({s['n_train']} train / {s['n_test']} test pairs, {s['n_test_facts']} held-out facts)"
        ]
        for name in ("all", "known"):
            ci = b[name].get("ci") or {}
            if ci:
                out.append(
                    f"P(truth), {name} pairs (n={b[name]['n']}): honest {_ci(ci['p_truth_honest'])} vs lying "
                    f"{_ci(ci['p_truth_lying'])}; logit diff {_ci(ci['logit_diff_honest'], 2)} vs "
                    f"{_ci(ci['logit_diff_lying'], 2)}"
                )
        ha = s["head_auroc"]
        out.append(
            f"\nHeld-out AUROC, best head L{ha['max']['component'][0]}H{ha['max']['component'][1]}: "
            f"{ha['max']['auroc']:.3f} [{ha['max']['lo']:.3f}, {ha['max']['hi']:.3f}]; {bars_text(ha)}"
        )
        out += [f"  {n}" for n in s.get("notes", [])]
        out += [f"\n{line}" for line in self._over_seeds()]
        o = s["resid_auroc"].get("over_seeds")
        if o:
            out.append(f"\n{layer_choice_text(s['resid_auroc'])}\n  layer: mean held-out AUROC [CI over seeds]")
            rows = zip(o["mean"], o["lo"], o["hi"], o["best_share"])
            out += [f"  {j:>3}: {m:.3f} [{lo:.3f}, {hi:.3f}]  best in {b:.0%}" for j, (m, lo, hi, b) in enumerate(rows)]
        out.append(
            f"\nTop heads by patching effect (logit diff; 0 = lying, 1 = honest; 95% CI over "
            f"{s['patching']['n_pairs']} pairs; share of resamples top-1 / in top {k}):"
        )
        for t in s["top_heads_by_patching"]:
            out.append(
                f"  L{t['layer']:>2}H{t['head']}: {t['effect']:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}]  "
                f"top-1 {t['top1_share']:.2f}, top-{k} {t['topk_share']:.2f}  (AUROC {t['auroc']:.2f})"
            )
        if s.get("views"):
            out.append(f"\nHead views (top 3 heads, {VIEW_PAIRS} held-out pairs): {s['views']}")
        out += [f"\nWARNING: {w}" for w in s["warnings"]]
        if png_problem():
            out.append(f"\n{png_problem()}")
        stages = ", ".join(f"{n} {v} s" for n, v in s.get("stage_seconds", {}).items())
        figs = ", ".join(s.get("figures", {}))
        out.append(f"\nWrote {self.run_dir}/: figures {figs} (.html/.svg/.png) in {s.get('seconds', '?')} s ({stages})")
        return "\n".join(out)
