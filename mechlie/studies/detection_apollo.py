"""Apollo's protocol in the detection study (Goldowsky-Dill et al. 2025, "Detecting strategic deception
using linear probes"), end to end, on the run's own pairs and on-policy answers:

1. **Train** a probe (``--detector-probe``, at the used layer) on one of two label kinds, training facts
   only: *framing* (Apollo's instructed pairs: the greedy answer to the honest prompt, 0, vs the greedy
   answer to the lying prompt, 1; known facts unless ``--no-known-filter``) or *on-policy* (sampled
   answers to the same lying prompts: ``lie`` vs ``truth_under_lie_framing``; a lie is a valid answer of
   the relation that is not the truth, :mod:`mechlie.read.labels`).
2. **Read at the answer tokens**, two readings side by side (:data:`mechlie.read.detector.POSITIONS`):
   ``answer_first`` (the first generated answer token) and ``answer_mean`` (the mean over the generated
   answer's tokens, Apollo's).
3. **Calibrate on in-format controls**: responses that are not lies, generated on-policy (greedy) in the
   run's own prompt format(s) (``--fmt``): (a) *own honest answers*: the honest prompts of the test facts
   (from the on-policy run) and of ``--n-control-prompts`` facts outside the pairs; (b) *benign requests*:
   ``--n-benign`` requests of ``mechlie/data/benign_requests.txt`` ("Name a fruit.", "Spell the word
   Paris."), each asked in place of the question inside an honest prompt of an outside fact, so prompt
   and answer look like the lies' and only the content differs. Neutral text (the state at each window's
   last token, for both readings: a window has no answer) is kept as a second control.
4. **Report** on the test facts' lies (sampled and greedy): AUROC against each control set and recall at
   ``--fpr`` (1%; threshold: the controls' ``1 - fpr`` quantile), 95% CIs by bootstrap over facts (the
   lies') and control units (facts, benign-request lines, neutral lines), the threshold recomputed in
   every draw; and the *mixed-facts cell*: AUROC of lies vs truths on the test facts that have both a
   sampled lie and a sampled truth (and the same on every test fact: ``lies_vs_truths``). Beside every
   number: the **surprisal baseline** (-log P of the generated answer under the prompt, summed over its
   tokens, no training; neutral text has none).

The main Apollo detector (on-policy labels, ``answer_mean``; framing labels if the run has too few
on-policy rows) is calibrated on all in-format controls and saved as ``detector_apollo.safetensors``;
:meth:`mechlie.read.detector.Detector.score` on some control prompts is checked against the scores it was
calibrated on (``score_check_max_abs_diff``), and one lying and one honest test prompt are scored token by
token (``token_scores_lying.html`` / ``token_scores_honest.html``, circuitsvis, with the JSON numbers).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from torch import Tensor

log = logging.getLogger("mechlie")

READINGS: tuple[str, ...] = ("answer_first", "answer_mean")
LABEL_KINDS: tuple[str, ...] = ("on-policy", "framing")
BENIGN_FILE = "data/benign_requests.txt"
CONTROL_SETS: tuple[str, ...] = ("in-format", "own honest answers", "benign requests", "neutral text")


def benign_requests(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` benign requests with their unit (the line of ``mechlie/data/benign_requests.txt`` they come
    from): every fixed line, then the ``{word}`` lines filled in turn with seeded answer words of the
    built-in facts (single words). With ``n`` below the fixed lines, a seeded sample of them."""
    from importlib.resources import files

    from mechlie.core.pairs import builtin_facts

    text = files("mechlie").joinpath(BENIGN_FILE).read_text()
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.lstrip().startswith("#")]
    fixed = [x for x in lines if "{word}" not in x]
    templates = [x for x in lines if "{word}" in x]
    words = sorted({a for rel in builtin_facts().values() for _, a in rel["facts"] if a.isalpha() and len(a) > 2})
    rng = random.Random(f"{seed}/benign")
    out = [(x, x) for x in fixed]
    for i in range(max(0, n - len(out))):
        t = templates[i % len(templates)]
        out.append((t.format(word=rng.choice(words)), t))
    return rng.sample(out, n) if n < len(out) else out


def ask_instead(pair, request: str) -> str:
    """``pair``'s honest prompt with its question replaced by ``request`` (same format, same context)."""
    from mechlie.core.pairs import PairError

    at = pair.honest.rfind(pair.question)
    if not pair.question or at < 0:
        raise PairError(f"pair {pair.fact_id}: its question is not in its honest prompt; cannot ask {request!r}")
    return pair.honest[:at] + request + pair.honest[at + len(pair.question) :]


@dataclass(frozen=True)
class Rows:
    """Generated responses with their states at the detector's layers: ``states[:, s]`` chose token ``s``."""

    states: Tensor  # [n, steps, l, d]
    new_mask: Tensor  # [n, steps]
    units: list[str]  # the independent unit of each row
    surprisal: Tensor | None  # -log P of each answer under its prompt (None: not kept)
    prompts: list[str] | None = None

    def at(self, reading: str) -> Tensor:
        from mechlie.read.detector import position_features

        return position_features(self.states, self.new_mask, reading)[0]


def _rows(g, idx: list[int], layers: list[int], units: list[str], prompts: list[str] | None = None) -> Rows:
    """Rows ``idx`` of a :class:`mechlie.read.labels.GenStates` at ``layers``."""
    import torch

    t = torch.as_tensor(idx, dtype=torch.long)
    try:
        surprisal = g.surprisal_answer[t]
    except (AttributeError, ValueError):  # generations made without log-probs
        surprisal = None
    at = [list(g.layers).index(l) for l in layers]  # the generation kept g.layers (all, or just these)
    return Rows(g.states["resid_post"][:, :, at][t], g.new_mask[t], units, surprisal, prompts)


def answer_budget(model, pairs, max_new_tokens: int) -> int:
    """The answer length the on-policy run generated: ``max_new_tokens`` raised to the longest truth
    (:func:`mechlie.read.labels.on_policy`'s rule), so controls are generated exactly like the answers."""
    from mechlie.core.pairs import answer_sequences

    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return max_new_tokens
    return max(max_new_tokens, max(min(len(s) for s in answer_sequences(tok, p.truth)) for p in pairs))


def _outside_pairs(model, cfg: Any, pairs) -> list:
    """``cfg.n_control_prompts`` pairs (seeded) of facts outside ``pairs``, in the run's formats."""
    from mechlie.core.pairs import load_builtin

    used = {p.fact_id for p in pairs}
    pool = [
        p
        for rel in cfg.relations
        for fmt in cfg.fmt
        for p in load_builtin(rel, fmt, tokenizer=model.tokenizer, seed=cfg.seed, multi_token="keep")
        if p.fact_id not in used
    ]
    rng = random.Random(f"{cfg.seed}/apollo-controls")
    return rng.sample(pool, min(cfg.n_control_prompts, len(pool)))


def in_format_controls(model, cfg: Any, pairs, op, test_facts: set, layers: list[int], budget: int) -> dict[str, Rows]:
    """The in-format controls (module docstring, step 3): own honest answers and benign responses."""
    from mechlie.read.detector import ANSWER_STOP
    from mechlie.read.labels import generate_with_states

    outside = _outside_pairs(model, cfg, pairs)
    contexts = outside or [p for p in pairs if p.fact_id in test_facts]
    benign = benign_requests(cfg.n_benign, cfg.seed)
    b_prompts = [ask_instead(contexts[i % len(contexts)], r) for i, (r, _) in enumerate(benign)]
    prompts = [p.honest for p in outside] + b_prompts
    g = generate_with_states(
        model, prompts, layers=layers, max_new_tokens=budget, stop_strings=ANSWER_STOP, batch_size=cfg.batch_size
    )
    m = len(outside)
    test_idx = [i for i, p in enumerate(pairs) if p.fact_id in test_facts]
    own_test = _rows(
        op.honest, test_idx, layers, [pairs[i].fact_id for i in test_idx], [pairs[i].honest for i in test_idx]
    )
    own_out = _rows(g, list(range(m)), layers, [f"control/{p.fact_id}" for p in outside], prompts[:m])
    own = _concat([own_test, own_out])
    ben = _rows(g, list(range(m, len(prompts))), layers, [f"benign/{u}" for _, u in benign], b_prompts)
    log.info("in-format controls: %d own honest answers, %d benign responses", len(own.units), len(ben.units))
    return {"own honest answers": own, "benign requests": ben}


def _concat(parts: list[Rows]) -> Rows:
    import torch

    steps = max(p.states.shape[1] for p in parts)

    def pad(t: Tensor, value) -> Tensor:
        extra = steps - t.shape[1]
        return torch.cat([t, torch.full((t.shape[0], extra, *t.shape[2:]), value, dtype=t.dtype)], 1) if extra else t

    surprisal = None if any(p.surprisal is None for p in parts) else torch.cat([p.surprisal for p in parts])
    prompts = None if any(p.prompts is None for p in parts) else [x for p in parts for x in p.prompts]
    return Rows(
        torch.cat([pad(p.states, float("nan")) for p in parts]),
        torch.cat([pad(p.new_mask, 0) for p in parts]),
        [u for p in parts for u in p.units],
        surprisal,
        prompts,
    )


def lie_rows(op, facts: set, layers: list[int]) -> dict[str, Rows | None]:
    """The lying prompts' answers of ``facts``, by label: ``lie`` (sampled and greedy; units: facts),
    ``truth`` (sampled ``truth_under_lie_framing``) and the greedy honest answers (``honest``)."""
    pairs = op.pairs
    k = op.k
    s_lab = op.sample_labels
    g_lab = op.greedy_labels
    fact_of = lambda i: pairs[i // k].fact_id  # noqa: E731  (a sample row's fact)
    s_lie = [i for i, lab in enumerate(s_lab) if lab == "lie" and fact_of(i) in facts]
    s_truth = [i for i, lab in enumerate(s_lab) if lab == "truth_under_lie_framing" and fact_of(i) in facts]
    g_lie = [i for i, lab in enumerate(g_lab) if lab == "lie" and pairs[i].fact_id in facts]
    sampled = _rows(op.samples, s_lie, layers, [fact_of(i) for i in s_lie])
    greedy = _rows(op.greedy, g_lie, layers, [pairs[i].fact_id for i in g_lie])
    parts = [r for r in (sampled, greedy) if r.units]
    return {
        "lie": _concat(parts) if parts else None,
        "sampled lie": sampled,
        "greedy lie": greedy,
        "sampled truth": _rows(op.samples, s_truth, layers, [fact_of(i) for i in s_truth]),
    }


def training_rows(op, train_facts: set, layers: list[int], labels: str, reading: str, known_only: bool = True):
    """Features, labels (1 = lie), facts and probe pairs of the training facts (module docstring, step 1);
    rows without a state at ``reading`` are left out."""
    import torch

    from mechlie.read.detector import LabelledSet

    if labels == "on-policy":
        r = lie_rows(op, train_facts, layers)
        lie, truth = r["sampled lie"], r["sampled truth"]
        X = torch.cat([truth.at(reading), lie.at(reading)])
        y = torch.cat([torch.zeros(len(truth.units)), torch.ones(len(lie.units))])
        facts = truth.units + lie.units
    else:
        known = op.known.tolist()
        idx = [i for i, p in enumerate(op.pairs) if (known[i] or not known_only) and p.fact_id in train_facts]
        units = [op.pairs[i].fact_id for i in idx]
        h, g = _rows(op.honest, idx, layers, units).at(reading), _rows(op.greedy, idx, layers, units).at(reading)
        X, y, facts = torch.cat([h, g]), torch.cat([torch.zeros(len(idx)), torch.ones(len(idx))]), units * 2
    ok = torch.isfinite(X).flatten(1).all(1)
    if (~ok).any():
        log.info("apollo %s/%s: left out %d training rows without a state there", labels, reading, int((~ok).sum()))
    keep = ok.nonzero().flatten().tolist()
    s = LabelledSet(f"{labels}/{reading}", X[keep], y[keep], [facts[i] for i in keep])
    return s


def evaluate(det, controls: dict[str, Rows], neutral, lies: dict[str, Rows | None], cfg: Any) -> dict:
    """AUROC and recall at ``cfg.fpr`` against every control set, and the mixed-facts AUROC, for the
    detector's scores at its position (``det.position``)."""
    import torch

    from mechlie.read.detector import DetectorError, recall_at_fpr

    pos = det.position
    at = lambda r: det.score_features(r.at(pos))  # noqa: E731
    mixed = {"mixed_facts": mixed_facts(at, lies, cfg), "lies_vs_truths": mixed_facts(at, lies, cfg, False)}
    if lies["lie"] is None:
        return {"vs_controls": dict.fromkeys(CONTROL_SETS), **mixed}
    lie = det.score_features(lies["lie"].at(pos))
    scores = {name: (det.score_features(r.at(pos)), r.units) for name, r in controls.items()}
    scores["in-format"] = (torch.cat([s for s, _ in scores.values()]), [u for _, us in scores.values() for u in us])
    scores["neutral text"] = (det.score_features(neutral[0]), neutral[1])
    out: dict[str, Any] = {}
    for name in CONTROL_SETS:
        try:
            c, u = scores[name]
            out[name] = recall_at_fpr(lie, lies["lie"].units, c, u, cfg.fpr, n_boot=cfg.n_boot, seed=cfg.seed).to_dict()
        except DetectorError as e:
            log.warning("apollo %s vs %s: %s", pos, name, e)
            out[name] = None
    return {"vs_controls": out, **mixed, "greedy_lies_vs_in_format": _greedy_only(at, lies, scores, cfg)}


def _greedy_only(score, lies: dict[str, Rows | None], scores: dict, cfg: Any) -> dict | None:
    """Recall at ``cfg.fpr`` (in-format controls) on the greedy lies alone: the controls are greedy answers,
    and a sampled lie may differ from them by being sampled (what the surprisal baseline reads)."""
    from mechlie.read.detector import recall_at_fpr

    g = lies["greedy lie"]
    if g is None or not g.units:
        return None
    c, u = scores["in-format"]
    return recall_at_fpr(score(g), g.units, c, u, cfg.fpr, n_boot=cfg.n_boot, seed=cfg.seed).to_dict()


def mixed_facts(score, lies: dict[str, Rows | None], cfg: Any, only_mixed: bool = True) -> dict | None:
    """AUROC of sampled lies vs sampled truths (answers to the same lying prompts) on the facts that have
    both (the mixed-facts cell), or on every test fact (``only_mixed=False``); 95% CI over those facts."""
    import torch

    from mechlie.read.detector import bootstrap_auroc

    lie, truth = lies["sampled lie"], lies["sampled truth"]
    both = set(lie.units) & set(truth.units) if only_mixed else set(lie.units) | set(truth.units)
    if not both:
        return None
    s = torch.cat([score(truth), score(lie)])
    y = torch.cat([torch.zeros(len(truth.units)), torch.ones(len(lie.units))])
    units = truth.units + lie.units
    keep = [i for i, u in enumerate(units) if u in both and torch.isfinite(s[i])]
    s, y, units = s[keep], y[keep], [units[i] for i in keep]
    if y.min() == y.max():
        return None
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault(u, []).append(i)
    e = bootstrap_auroc(s, y, list(groups.values()), n_boot=cfg.n_boot, seed=cfg.seed)
    return {
        "auroc": float(e.mean),
        "lo": float(e.lo),
        "hi": float(e.hi),
        "n_facts": len(groups),
        "n_lies": int(y.sum()),
        "n_truths": int((1 - y).sum()),
    }


def surprisal_baseline(controls: dict[str, Rows], lies: dict[str, Rows | None], cfg: Any) -> dict | None:
    """The same numbers as :func:`evaluate` with -log P(answer | prompt) as the score (no training)."""
    import torch

    from mechlie.read.detector import DetectorError, recall_at_fpr

    rows = [*controls.values(), *(r for r in lies.values() if r is not None)]
    if any(r.surprisal is None for r in rows) or lies["lie"] is None:
        return None
    lie = lies["lie"]
    sets = {name: (r.surprisal, r.units) for name, r in controls.items()}
    sets["in-format"] = (torch.cat([s for s, _ in sets.values()]), [u for _, us in sets.values() for u in us])
    out: dict[str, Any] = {}
    for name in CONTROL_SETS[:3]:
        c, u = sets[name]
        try:
            out[name] = recall_at_fpr(
                lie.surprisal, lie.units, c, u, cfg.fpr, n_boot=cfg.n_boot, seed=cfg.seed
            ).to_dict()
        except DetectorError as e:
            log.warning("apollo surprisal vs %s: %s", name, e)
            out[name] = None
    out["neutral text"] = None  # neutral text is not an answer: it has no surprisal under a prompt
    return {
        "vs_controls": out,
        "greedy_lies_vs_in_format": _greedy_only(lambda r: r.surprisal, lies, sets, cfg),
        "mixed_facts": mixed_facts(lambda r: r.surprisal, lies, cfg),
        "lies_vs_truths": mixed_facts(lambda r: r.surprisal, lies, cfg, False),
    }


def apollo(model, cfg: Any, op, train_facts: set, test_facts: set, layer: int, neutral: tuple, run_dir: Path) -> dict:
    """Apollo's protocol (module docstring): every label kind x reading, the surprisal baseline, the
    saved main detector, its score check and token views. ``neutral``: (features ``[n, L, d]`` at each
    window's last token, units)."""
    from mechlie.read.probes import fit_probe

    pairs = op.pairs
    layers = list(range(model.cfg.n_layers)) if cfg.detector_probe == "ensemble" else [layer]
    budget = answer_budget(model, pairs, cfg.max_new_tokens)
    controls = in_format_controls(model, cfg, pairs, op, test_facts, layers, budget)
    lies = lie_rows(op, test_facts, layers)
    neutral_at = (neutral[0][:, layers], neutral[1])
    out: dict[str, Any] = {"layers": layers, "probe": cfg.detector_probe, "fpr": cfg.fpr, "max_new_tokens": budget}
    dets: dict[str, Any] = {}
    for labels in LABEL_KINDS:
        for reading in READINGS:
            train = training_rows(op, train_facts, layers, labels, reading, cfg.known_filter)
            name = f"{labels} / {reading}"
            if min(int(train.y.sum()), int((1 - train.y).sum())) < 2:
                log.warning("apollo %s: too few training rows of one class (%s); skipped", name, train.y.sum())
                out.setdefault("skipped", {})[name] = f"{int(train.y.sum())} lies, {int((1 - train.y).sum())} not"
                continue
            probe = fit_probe(cfg.detector_probe, train.X, train.y, pairs=train.pairs(), seed=cfg.seed)
            det = _calibrated(model, probe, layers, reading, budget, controls, cfg, f"{labels} labels")
            dets[name] = det
            out.setdefault("detectors", {})[name] = {
                "labels": labels,
                "reading": reading,
                "n_train_rows": len(train.y),
                "n_train_lies": int(train.y.sum()),
                **evaluate(det, controls, neutral_at, lies, cfg),
            }
    out["surprisal"] = surprisal_baseline(controls, lies, cfg)
    out["n_controls"] = {k: len(r.units) for k, r in controls.items()} | {"neutral text": len(neutral[1])}
    out["n_test_lies"] = 0 if lies["lie"] is None else len(lies["lie"].units)
    out["benign_requests_file"] = f"mechlie/{BENIGN_FILE}"
    main = next((n for n in ("on-policy / answer_mean", "framing / answer_mean") if n in dets), None)
    if main is not None:
        out.update(_save_main(model, dets[main], main, controls, op, test_facts, run_dir))
    return out


def _calibrated(model, probe, layers, reading: str, budget: int, controls: dict[str, Rows], cfg: Any, what: str):
    """A :class:`mechlie.read.detector.Detector` at ``reading``, calibrated on every in-format control."""
    import torch

    from mechlie.read.detector import calibrated_detector

    X = torch.cat([r.at(reading) for r in controls.values()])
    info = {"trained_on": what, "calibrated_on": "in-format controls (own honest answers + benign requests)"}
    return calibrated_detector(
        model, probe, "resid_post", layers, X, cfg.fpr, info, position=reading, max_new_tokens=budget
    )


def _save_main(model, det, name: str, controls: dict[str, Rows], op, test_facts: set, run_dir: Path) -> dict:
    """Save the main detector, check that ``score()`` gives back its calibration scores on some control
    prompts, and write the token views of one lying and one honest test prompt."""
    import torch

    from mechlie.report.views import write_token_scores

    path = det.save(run_dir / "detector_apollo.safetensors")
    # control_scores follow the controls' order: own honest answers, then benign responses.
    own, ben = controls["own honest answers"], controls["benign requests"]
    check_prompts = (own.prompts or [])[:4] + (ben.prompts or [])[:4]
    stored = det.control_scores
    want = torch.cat([stored[: min(4, len(own.units))], stored[len(own.units) :][:4]])
    got = det.score(model, check_prompts).scores if check_prompts else want
    both = torch.isfinite(want) & torch.isfinite(got)
    diff = float((want[both] - got[both]).abs().max()) if both.any() else float("nan")
    if not diff <= 1e-3 or not torch.equal(torch.isfinite(want), torch.isfinite(got)):
        log.warning("apollo detector: score() differs from its calibration scores by %g", diff)
    views = {}
    pair = next((p for p in op.pairs if p.fact_id in test_facts), None)
    if pair is not None:
        for side in ("lying", "honest"):
            ts = det.score_tokens(model, getattr(pair, side))
            views[side] = str(write_token_scores(ts, run_dir, name=f"token_scores_{side}").relative_to(run_dir))
    return {
        "main": name,
        "path": str(path),
        "threshold": det.threshold,
        "position": det.position,
        "score_check_max_abs_diff": diff,
        "score_check_n": len(check_prompts),
        "token_views": views,
    }
