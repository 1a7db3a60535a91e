"""Effects of steering on lying, and its side effects, on held-out facts, with controls and CIs.

Setup (:func:`prepare`): pairs are split by fact (:func:`mechlie.directions.split_by_fact`); every
direction is fitted on the training facts only, and every effect is measured on the test facts.

Effects of one intervention (:func:`evaluate`), each with a 95% bootstrap CI:

- ``recovered``: on the *lying* prompts, the fraction of the honest-lying P(truth) gap that
  steering toward honesty closes, ``(mean p_steered - mean p_lying) / (mean p_honest - mean
  p_lying)`` (1 = back to the honest baseline); resampled over facts. Also ``p_truth`` and the
  ``lie_rate`` (share of known facts, i.e. answered correctly when honest, not answered truthfully).
- ``induced``: on the *honest* prompts, the same intervention with the sign flipped (toward
  lying): ``(mean p_honest - mean p_steered) / (mean p_honest - mean p_lying)``.
- ``honest_acc``: top-1 accuracy on honest prompts under the honesty-ward intervention (should
  stay at the baseline: steering a truthful model toward truth should not break it).
- ``kl`` and ``delta_ce``: on neutral text (``mechlie/data/neutral.txt``, plain English written for
  this project), per token, ``KL(p_clean || p_steered)`` of the next-token distribution and the
  change in next-token cross-entropy; resampled over tokens.

Every intervention has a random control of the same size (a Gaussian direction rescaled to the
same norm; for head shifts, the same heads and shift sizes along random unit directions; for
ablation, a random unit direction), evaluated the same way.

Cost: the answer metrics need only the final position, so the unembedding runs on that position
alone (``return_type=None`` plus a hook on the final normalized residual).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechlie.activations import collect
from mechlie.directions import split_by_fact
from mechlie.metrics import AnswerScores, score_logits
from mechlie.pairs import AnswerSet, Batch, ContrastPair, PairError, answer_set, tokenize
from mechlie.steering import (
    AddVectors, DirectionalAblation, HeadDirections, SteeringError, head_directions, random_head_shift,
    random_like, residual_directions, steer,
)

KINDS: tuple[str, ...] = ("resid", "iti", "ablation", "fv")


def neutral_lines() -> list[str]:
    text = files("mechlie").joinpath("data/neutral.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def batches(model, prompts: Sequence[str], batch_size: int) -> list[Batch]:
    if len(prompts) == 0:
        raise PairError("no prompts")
    return [tokenize(model, list(prompts[i : i + batch_size])) for i in range(0, len(prompts), batch_size)]


def _final_hook_name(model) -> str:
    if model.cfg.normalization_type is not None:
        return "ln_final.hook_normalized"
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


@torch.no_grad()
def last_logits(model, bs: Sequence[Batch], interventions: Sequence = ()) -> Float[Tensor, "n vocab"]:
    """Next-token logits after each prompt's final token, under ``interventions``."""
    out = []
    with steer(model, *interventions):
        for b in bs:
            kept: list[Tensor] = []
            # Added inside steer(), so it runs after any steering hook on the same point.
            with model.hooks(fwd_hooks=[(_final_hook_name(model), lambda a, hook: kept.append(a[:, -1:].clone()))]):
                model(b.tokens, attention_mask=b.attention_mask, return_type=None)
            out.append(model.unembed(kept[0])[:, 0].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def token_logprobs(model, bs: Sequence[Batch], interventions: Sequence = ()) -> list[Float[Tensor, "b pos vocab"]]:
    with steer(model, *interventions):
        return [model(b.tokens, attention_mask=b.attention_mask).float().log_softmax(-1).cpu() for b in bs]


def neutral_effects(
    model, bs: Sequence[Batch], clean: Sequence[Tensor], interventions: Sequence
) -> tuple[Float[Tensor, " tok"], Float[Tensor, " tok"]]:
    """Per real token: KL(clean || steered) of the next-token distribution, and Δ cross-entropy."""
    kls, dces = [], []
    for b, lp_c, lp_s in zip(bs, clean, token_logprobs(model, bs, interventions)):
        real = b.attention_mask.bool().cpu()
        kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1)
        kls.append(kl[real])
        # Cross-entropy of token t+1 from position t, where both are real tokens.
        tgt = b.tokens[:, 1:].cpu()
        both = real[:, 1:] & real[:, :-1]
        ce = lambda lp: -lp[:, :-1].gather(-1, tgt[..., None])[..., 0]
        dces.append((ce(lp_s) - ce(lp_c))[both])
    return torch.cat(kls), torch.cat(dces)


# ---------------------------------------------------------------------------------------------
# statistics


@dataclass(frozen=True)
class Estimate:
    mean: float
    lo: float  # 95% bootstrap percentile interval
    hi: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def bootstrap(stat: Callable[[Tensor], Tensor], n: int, *, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """``stat(indices)`` on all ``n`` items, with a 95% percentile CI over resampled indices."""
    if n == 0:
        raise ValueError("bootstrap needs at least one item")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    boots = torch.stack([stat(i) for i in idx]).float()
    boots = boots[torch.isfinite(boots)]
    full = float(stat(torch.arange(n)))
    if len(boots) == 0:
        return Estimate(full, float("nan"), float("nan"))
    lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975])).tolist()
    return Estimate(full, lo, hi)


def gap_fraction(p: Tensor, lo: Tensor, hi: Tensor, toward_hi: bool = True) -> Callable[[Tensor], Tensor]:
    """Statistic: share of the (mean hi - mean lo) gap moved, from lo (or from hi if not toward_hi)."""

    def stat(i: Tensor) -> Tensor:
        gap = hi[i].mean() - lo[i].mean()
        moved = p[i].mean() - lo[i].mean() if toward_hi else hi[i].mean() - p[i].mean()
        return moved / gap

    return stat


# ---------------------------------------------------------------------------------------------
# data and directions


@dataclass
class SteeringData:
    """Held-out evaluation data, baselines and the directions fitted on the training facts."""

    train: list[ContrastPair]
    test: list[ContrastPair]
    answers: AnswerSet  # of the test pairs
    honest: list[Batch]  # test prompts, tokenized once
    lying: list[Batch]
    neutral: list[Batch]
    resid_dirs: Float[Tensor, "layer d_model"]  # honest -> lying, at blocks.l.hook_resid_post
    heads: HeadDirections
    base_honest: AnswerScores
    base_lying: AnswerScores
    clean_neutral: list[Tensor]  # unsteered log-probs on the neutral text
    neutral_sweep: list[Batch] = field(default_factory=list)  # the first lines only, for sweeps
    clean_neutral_sweep: list[Tensor] = field(default_factory=list)
    fv: Float[Tensor, " d_model"] | None = None  # optional function vector
    fv_layer: int | None = None


def prepare(
    model, pairs: Sequence[ContrastPair], *, test_frac: float = 0.3, seed: int = 0, batch_size: int = 16,
    n_neutral: int | None = None, n_neutral_sweep: int = 16, progress: bool = True,
) -> SteeringData:
    """Split by fact, fit the directions on the training facts, and score the unsteered baselines.

    Sweeps measure KL on the first ``n_neutral_sweep`` neutral lines (cost); :func:`evaluate` on the
    first ``n_neutral`` (default: all).
    """
    if len(pairs) == 0:
        raise PairError("no pairs")
    split = split_by_fact([p.fact_id for p in pairs], test_frac=test_frac, seed=seed)
    train = [pairs[i] for i in split.train]
    test = [pairs[i] for i in split.test]
    kinds = ("z", "resid_post")
    h = collect(model, [p.honest for p in train], kinds=kinds, batch_size=batch_size, progress=progress, desc="train honest")
    li = collect(model, [p.lying for p in train], kinds=kinds, batch_size=batch_size, progress=progress, desc="train lying")
    rows = list(range(len(train)))
    answers = answer_set(model.tokenizer, test)
    data = SteeringData(
        train=train, test=test, answers=answers,
        honest=batches(model, [p.honest for p in test], batch_size),
        lying=batches(model, [p.lying for p in test], batch_size),
        neutral=batches(model, neutral_lines()[:n_neutral], batch_size),
        resid_dirs=residual_directions(h["resid_post"], li["resid_post"], rows),
        heads=head_directions(h["z"], li["z"], rows),
        base_honest=None, base_lying=None, clean_neutral=[],  # type: ignore[arg-type]
    )
    data.base_honest = score_logits(last_logits(model, data.honest), answers)
    data.base_lying = score_logits(last_logits(model, data.lying), answers)
    data.clean_neutral = token_logprobs(model, data.neutral)
    if n_neutral is not None and n_neutral <= n_neutral_sweep:  # the same lines: reuse
        data.neutral_sweep, data.clean_neutral_sweep = data.neutral, data.clean_neutral
    else:
        data.neutral_sweep = batches(model, neutral_lines()[:n_neutral_sweep], batch_size)
        data.clean_neutral_sweep = token_logprobs(model, data.neutral_sweep)
    return data


def attach_function_vector(model, data: SteeringData, layer: int, *, k: int = 10, max_train: int = 24, batch_size: int = 16) -> str | None:
    """Build a lie function vector with :mod:`mechlie.function_vectors`, if that module works.

    The FV (Todd et al. 2023; sum of the mean outputs of the top-``k`` heads by average indirect
    effect on corrupted prompts) is built on at most ``max_train`` training pairs (the AIE costs a
    pass per head). It is added like the residual direction (all positions, at ``layer``), with
    positive alpha toward lying, which is the FV's own sign. The module is optional and written
    separately, so any failure only means "absent": returns None on success, else the reason.
    """
    try:
        from mechlie import function_vectors as fvm
        from mechlie.pairs import corrupted_fewshot

        train = data.train[:max_train]
        means = fvm.mean_head_activations(model, tokenize(model, [p.lying for p in train]), batch_size=batch_size)
        corrupt = tokenize(model, [corrupted_fewshot(p) for p in train])
        aie = fvm.head_aie(model, corrupt, answer_set(model.tokenizer, train), means.z, batch_size=batch_size, progress=False)
        fv = fvm.build_function_vector(means.head_out, aie.aie("truth_drop"), k)
        vec = torch.as_tensor(fv.vector).float().flatten().cpu()
        if vec.shape != (model.cfg.d_model,):
            return f"function vector has shape {tuple(vec.shape)}"
        data.fv, data.fv_layer = vec, layer
        return None
    except Exception as e:  # optional, concurrently written module: any failure means "absent"
        return f"{type(e).__name__}: {str(e)[:200]}"


# ---------------------------------------------------------------------------------------------
# interventions by kind


def intervention(data: SteeringData, kind: str, layer: int, alpha: float, *, k: int = 16, control: bool = False, seed: int = 0):
    """The intervention of ``kind`` (its random control if ``control``). ``alpha < 0`` = toward honesty.

    ``resid``: ``alpha * diff-of-means`` added at ``layer``. ``iti``: top-``k`` heads shifted by
    ``alpha * sigma``. ``ablation``: the ``layer`` direction projected out everywhere (``alpha``
    only selects whether it is applied: ``alpha == 0`` = nothing). ``fv``: ``alpha * fv`` at
    ``data.fv_layer`` (the FV is built to induce lying, so it already points honest -> lying).
    """
    if kind == "resid":
        v = data.resid_dirs[layer]
        return AddVectors({layer: random_like(v, seed + layer) if control else v}, alpha)
    if kind == "iti":
        shift = data.heads.top(k, alpha)
        return random_head_shift(shift, seed) if control else shift
    if kind == "ablation":
        v = data.resid_dirs[layer]
        if alpha == 0:
            return AddVectors({layer: v}, 0.0)
        return DirectionalAblation(random_like(v, seed + layer) if control else v)
    if kind == "fv":
        if data.fv is None:
            raise SteeringError("no function vector attached")
        v = data.fv
        return AddVectors({data.fv_layer: random_like(v, seed) if control else v}, alpha)
    raise SteeringError(f"unknown direction kind {kind!r}; kinds: {KINDS}")


# ---------------------------------------------------------------------------------------------
# sweep and full evaluation


@dataclass(frozen=True)
class SweepPoint:
    kind: str
    control: bool  # random direction of the same size
    layer: int  # -1 for kinds that span layers (ITI)
    strength: float  # |alpha|; the sweep steers lying prompts toward honesty (alpha = -strength)
    p_truth: float  # mean P(truth) on lying test prompts, steered
    recovered: float  # share of the honest-lying P(truth) gap closed
    kl: float  # mean per-token KL on (the sweep's share of) the neutral text


def sweep_point(model, data: SteeringData, kind: str, layer: int, strength: float, *, k: int = 16, control: bool = False) -> SweepPoint:
    iv = intervention(data, kind, layer, -strength, k=k, control=control)
    s = score_logits(last_logits(model, data.lying, [iv]), data.answers)
    kl, _ = neutral_effects(model, data.neutral_sweep, data.clean_neutral_sweep, [iv])
    hi, lo = data.base_honest.p_truth.mean(), data.base_lying.p_truth.mean()
    rec = float((s.p_truth.mean() - lo) / (hi - lo))
    return SweepPoint(kind, control, layer, strength, float(s.p_truth.mean()), rec, float(kl.mean()))


def sweep(
    model, data: SteeringData, *, kinds: Sequence[str], layers: Sequence[int], strengths: Sequence[float],
    iti_strengths: Sequence[float], k: int = 16, controls: bool = True, progress: bool = True,
) -> list[SweepPoint]:
    """Dose-response grid: per kind (and, with ``controls``, its random control), layers x strengths."""
    jobs = []
    for kind in kinds:
        if kind == "iti":
            grid = [(-1, a) for a in iti_strengths]
        elif kind == "ablation":
            grid = [(l, 1.0) for l in layers]
        elif kind == "fv":
            grid = [(data.fv_layer, a) for a in strengths]
        else:
            grid = [(l, a) for l in layers for a in strengths]
        jobs += [(kind, l, a, c) for c in ((False, True) if controls else (False,)) for l, a in grid]
    out = []
    for kind, l, a, c in tqdm(jobs, desc="sweep", disable=not progress):
        out.append(sweep_point(model, data, kind, l, a, k=k, control=c))
    return out


def pareto(points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """Points not beaten by another with lower (or equal) KL and more recovery."""
    best, out = -float("inf"), []
    for p in sorted(points, key=lambda p: (p.kl, -p.recovered)):
        if p.recovered > best:
            out.append(p)
            best = p.recovered
    return out


def choose(points: Sequence[SweepPoint], kl_budget: float = 0.1) -> SweepPoint:
    """Most recovery within the KL budget; if none fits, the lowest-KL point."""
    ok = [p for p in points if p.kl <= kl_budget]
    return max(ok, key=lambda p: p.recovered) if ok else min(points, key=lambda p: p.kl)


def evaluate(model, data: SteeringData, kind: str, layer: int, strength: float, *, k: int = 16, control: bool = False, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every effect of one intervention on the test facts and neutral text, with 95% CIs."""
    toward_honest = intervention(data, kind, layer, -strength, k=k, control=control)
    toward_lying = intervention(data, kind, layer, +strength, k=k, control=control) if kind != "ablation" else None
    hp, lp = data.base_honest.p_truth, data.base_lying.p_truth
    n = len(hp)
    lying_s = score_logits(last_logits(model, data.lying, [toward_honest]), data.answers)
    honest_s = score_logits(last_logits(model, data.honest, [toward_honest]), data.answers)
    known = data.base_honest.correct
    kl, dce = neutral_effects(model, data.neutral, data.clean_neutral, [toward_honest])
    res = {
        "kind": kind, "control": control, "layer": layer, "strength": strength, "k": k if kind == "iti" else None,
        "n_test_facts": n, "n_known": int(known.sum()), "n_neutral_tokens": len(kl),
        "p_truth_lying_steered": bootstrap(lambda i: lying_s.p_truth[i].mean(), n, n_boot=n_boot, seed=seed),
        "recovered": bootstrap(gap_fraction(lying_s.p_truth, lp, hp), n, n_boot=n_boot, seed=seed),
        "lie_rate_steered": bootstrap(lambda i: 1 - lying_s.correct[i][known[i]].float().mean(), n, n_boot=n_boot, seed=seed),
        "honest_acc_steered": bootstrap(lambda i: honest_s.correct[i].float().mean(), n, n_boot=n_boot, seed=seed),
        "kl": bootstrap(lambda i: kl[i].mean(), len(kl), n_boot=n_boot, seed=seed),
        "delta_ce": bootstrap(lambda i: dce[i].mean(), len(dce), n_boot=n_boot, seed=seed),
    }
    if toward_lying is not None:
        induced_s = score_logits(last_logits(model, data.honest, [toward_lying]), data.answers)
        res["p_truth_honest_induced"] = bootstrap(lambda i: induced_s.p_truth[i].mean(), n, n_boot=n_boot, seed=seed)
        res["induced"] = bootstrap(gap_fraction(induced_s.p_truth, lp, hp, toward_hi=False), n, n_boot=n_boot, seed=seed)
    return res


def baseline_summary(data: SteeringData, n_boot: int = 1000, seed: int = 0) -> dict:
    h, l = data.base_honest, data.base_lying
    n, known = len(h.p_truth), h.correct
    return {
        "n_train_facts": len({p.fact_id for p in data.train}), "n_test_facts": n, "n_known": int(known.sum()),
        "p_truth_honest": bootstrap(lambda i: h.p_truth[i].mean(), n, n_boot=n_boot, seed=seed),
        "p_truth_lying": bootstrap(lambda i: l.p_truth[i].mean(), n, n_boot=n_boot, seed=seed),
        "honest_acc": bootstrap(lambda i: h.correct[i].float().mean(), n, n_boot=n_boot, seed=seed),
        "lie_rate": bootstrap(lambda i: 1 - l.correct[i][known[i]].float().mean(), n, n_boot=n_boot, seed=seed),
    }


# ---------------------------------------------------------------------------------------------
# figures (returned, never shown; save with mechlie.plotting.save_figure)


def dose_heatmap(points: Sequence[SweepPoint], kind: str, metric: str = "p_truth", *, control: bool = False):
    """|alpha| x layer heatmap of ``metric`` ("p_truth", "recovered" or "kl") for one kind."""
    from mechlie.plotting import heatmap

    mine = [p for p in points if p.kind == kind and p.control == control]
    if not mine:
        raise ValueError(f"no sweep points for kind {kind!r} (control={control})")
    layers = sorted({p.layer for p in mine})
    strengths = sorted({p.strength for p in mine})
    grid = torch.full((len(strengths), len(layers)), float("nan"))
    for p in mine:
        grid[strengths.index(p.strength), layers.index(p.layer)] = getattr(p, metric)
    label = {"p_truth": "P(truth), lying prompts", "recovered": "gap recovered", "kl": "KL on neutral text (nats)"}[metric]
    name = f"{kind} (random direction)" if control else kind
    fig = heatmap(
        grid, f"{label}: {name}, steered toward honesty", x_label="layer", y_label="|alpha|", colorbar=metric,
        x_ticks=[str(l) for l in layers], y_ticks=[f"{s:g}" for s in strengths],
        text=[[f"{v:.3f}" for v in row] for row in grid.tolist()],
    )
    return fig.update_traces(texttemplate="%{text}")  # print the values in the cells


def frontier_figure(points: Sequence[SweepPoint], evaluated: dict | None = None):
    """Honesty recovered vs KL on neutral text: every sweep point, Pareto frontier as a line.

    ``evaluated[kind][control]`` (results of :func:`evaluate`) adds the chosen points and their
    random controls with 95% CIs on both axes.
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for kind, by_control in (evaluated or {}).items():
        for control, r in by_control.items():
            rec, kl = r["recovered"], r["kl"]
            fig.add_trace(go.Scatter(
                x=[kl.mean], y=[rec.mean], mode="markers", name=f"{kind}{' random' if control else ''} (chosen, 95% CI)",
                marker={"symbol": "x-open" if control else "diamond", "size": 13},
                error_x={"type": "data", "symmetric": False, "array": [kl.hi - kl.mean], "arrayminus": [kl.mean - kl.lo]},
                error_y={"type": "data", "symmetric": False, "array": [rec.hi - rec.mean], "arrayminus": [rec.mean - rec.lo]},
            ))
    for kind in dict.fromkeys(p.kind for p in points):
        for control in (False, True):
            mine = [p for p in points if p.kind == kind and p.control == control]
            if not mine:
                continue
            name = f"{kind} random" if control else kind
            front = pareto(mine)
            fig.add_trace(go.Scatter(
                x=[p.kl for p in mine], y=[p.recovered for p in mine], mode="markers", name=name,
                text=[f"layer {p.layer}, |alpha| {p.strength:g}" for p in mine],
                marker={"symbol": "x" if control else "circle", "size": 9},
            ))
            fig.add_trace(go.Scatter(
                x=[p.kl for p in front], y=[p.recovered for p in front], mode="lines", name=f"{name} frontier",
                line={"dash": "dot" if control else "solid"},
            ))
    fig.add_hline(y=1.0, line_dash="dash", annotation_text="honest baseline")
    fig.update_layout(
        title="Honesty recovered on held-out lying prompts vs side effects on neutral text",
        xaxis_title="mean KL(clean || steered) per token (nats)", yaxis_title="share of honest-lying P(truth) gap closed",
        xaxis_type="log", width=900, height=550,
    )
    return fig
