"""Effects of steering on lying, and its side effects, with a train / validation / test split,
controls from many random draws, and 95% CIs.

Setup (:func:`prepare`): pairs are split by fact into train / validation / test
(:func:`split_three`; no fact on two sides). Directions (difference of means, from
:mod:`mechlie.read.directions`) and learned edits (:mod:`mechlie.control.edits`) are fitted on the training facts;
every hyperparameter (layer, alpha, K heads, an edit's penalty) is chosen on the validation facts
(:func:`sweep` + :func:`choose` see only ``data.val``); every reported number is measured on the test
facts (:func:`evaluate`). The neutral text is split by line the same way: a learned edit's KL
penalty uses the training lines, sweeps the validation lines, reports the test lines.

A *setting* (:class:`Setting`) is ``(kind, layer, alpha, param)``. ``alpha`` is signed, with one
convention everywhere: directions point honest -> lying, so ``alpha < 0`` steers toward honesty and
``alpha > 0`` toward lying. ``param`` is K heads for head kinds, or the key of a learned edit. Kinds
live in a registry (:func:`register_kind`); each gives the intervention and its random control of the
same size:

- ``resid``: ``alpha * d_l`` at ``blocks.l.hook_resid_post``, ``d_l`` the diff-of-means direction;
  control: a Gaussian direction of the same norm.
- ``iti``: the top-``K`` heads by standardized gap, shifted by ``alpha * sigma * unit`` (ITI);
  control: the same heads along random z-directions whose *write* ``|shift @ W_O|`` matches.
- ``causal``: the same head shift on the ``K`` heads that activation patching ranked highest on the
  training pairs (:func:`mechlie.causal.patching.patch_final_position`), not the probe-ranked ones.
- ``causal_mean``: the ``K`` patching-ranked heads' final-position ``z`` moved toward their
  honest-run mean (:class:`mechlie.control.steering.HeadSetMean`; ``alpha = -1`` sets it to the mean);
  control: ``K`` random heads moved toward their own means.
- ``probe_mean``: the same on ITI's probe-ranked top-``K`` heads (head choice compared at equal
  intervention).
- ``ablation``: project ``d_l`` out everywhere; control: a random direction projected out.
- ``fv``: a function vector (optional module).
- ``learned`` / ``lowrank`` / ``gated``: a learned edit (:mod:`mechlie.control.edits`) at scale ``-alpha``
  of its trained size (``alpha = -1`` is the edit as trained); control: a random edit of the same
  size (for ``gated``: the same gate writing a random vector of the same norm).

Effects of one setting on an evaluation set (:func:`evaluate`), each with a 95% bootstrap CI:

- ``recovered``: on the *lying* prompts, the share of the honest-lying P(truth) gap closed,
  ``(mean p_steered - mean p_lying) / (mean p_honest - mean p_lying)``; resampled over facts.
- ``lie_rate``: among known facts (top-1 correct when honest), the share whose lying prompt's
  top-1 is not the truth, before and after steering.
- ``induced``: on the *honest* prompts, the same setting with alpha's sign flipped (toward lying).
- ``honest_acc``: top-1 accuracy on honest prompts under the honesty-ward setting.
- ``kl`` and ``delta_ce``: on neutral text (``mechlie/data/neutral.txt``), the token-weighted mean of
  ``KL(p_clean || p_steered)`` per next-token distribution and the change in next-token
  cross-entropy; the CI resamples *lines* (tokens of a line are not independent).
- ``control``: ``n_controls`` random draws of the same size (:func:`controls`), reported as the
  distribution of their effects (mean and 2.5-97.5% quantiles over draws) and the share of draws that
  recover at least as much as the real setting.

Cost: the answer metrics need only the final position, so the unembedding runs on that position
alone (``return_type=None`` plus a hook on the final normalized residual).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from importlib.resources import files
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.control.steering import (
    AddVectors,
    DirectionalAblation,
    HeadDirections,
    HeadSetMean,
    HeadShift,
    Intervention,
    SteeringError,
    head_directions,
    random_head_set_mean,
    random_head_shift,
    random_like,
    residual_directions,
    steer,
)
from mechlie.core.activations import collect
from mechlie.core.metrics import AnswerScores, answer_logprob, score_logits
from mechlie.core.pairs import AnswerSet, Batch, ContrastPair, PairError, answer_set, tokenize
from mechlie.core.stats import Estimate, bootstrap, normalized_effect


def spread(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Distribution of a control over its random draws: mean and the central ``level`` quantiles."""
    v = torch.tensor([float(x) for x in values])
    v = v[torch.isfinite(v)]
    if len(v) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    q = (1 - level) / 2
    lo, hi = torch.quantile(v, torch.tensor([q, 1 - q])).tolist()
    return Estimate(float(v.mean()), lo, hi, len(v))


# ---------------------------------------------------------------------------------------------
# forward passes


def neutral_lines() -> list[str]:
    text = files("mechlie").joinpath("data/neutral.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def batches(model: HookedTransformer, prompts: Sequence[str], batch_size: int) -> list[Batch]:
    if len(prompts) == 0:
        raise PairError("no prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [tokenize(model, list(prompts[i : i + batch_size])) for i in range(0, len(prompts), batch_size)]


def _final_hook_name(model: HookedTransformer) -> str:
    if model.cfg.normalization_type is not None:
        return "ln_final.hook_normalized"
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


@torch.no_grad()
def last_logits(
    model: HookedTransformer, bs: Sequence[Batch], interventions: Sequence[Intervention] = ()
) -> Float[Tensor, "n vocab"]:
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
def token_logprobs(
    model: HookedTransformer, bs: Sequence[Batch], interventions: Sequence[Intervention] = ()
) -> list[Float[Tensor, "b pos vocab"]]:
    with steer(model, *interventions):
        return [model(b.tokens, attention_mask=b.attention_mask).float().log_softmax(-1).cpu() for b in bs]


@dataclass(frozen=True)
class NeutralEffects:
    """Per neutral *line*: summed per-token KL and Δ cross-entropy, and how many tokens each has."""

    kl_sum: Float[Tensor, " line"]
    kl_tokens: Int[Tensor, " line"]
    dce_sum: Float[Tensor, " line"]
    dce_tokens: Int[Tensor, " line"]

    @property
    def kl(self) -> float:
        """Token-weighted mean KL (nats per token)."""
        return float(self.kl_sum.sum() / self.kl_tokens.sum().clamp_min(1))

    def kl_stat(self) -> Callable[[Tensor], Tensor]:
        return lambda i: self.kl_sum[i].sum() / self.kl_tokens[i].sum().clamp_min(1)

    def dce_stat(self) -> Callable[[Tensor], Tensor]:
        return lambda i: self.dce_sum[i].sum() / self.dce_tokens[i].sum().clamp_min(1)


def neutral_effects(
    model: HookedTransformer, bs: Sequence[Batch], clean: Sequence[Tensor], interventions: Sequence[Intervention]
) -> NeutralEffects:
    """KL(clean || steered) of every real token's next-token distribution and Δ cross-entropy of
    every real (t, t+1), summed per line (row)."""
    kls, nk, dces, nd = [], [], [], []
    for b, lp_c, lp_s in zip(bs, clean, token_logprobs(model, bs, interventions)):
        real = b.attention_mask.bool().cpu()
        kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1)
        kls.append((kl * real).sum(-1))
        nk.append(real.sum(-1))
        # Cross-entropy of token t+1 from position t, where both are real tokens.
        tgt = b.tokens[:, 1:].cpu()
        both = real[:, 1:] & real[:, :-1]
        ce = lambda lp: -lp[:, :-1].gather(-1, tgt[..., None])[..., 0]
        dces.append(((ce(lp_s) - ce(lp_c)) * both).sum(-1))
        nd.append(both.sum(-1))
    return NeutralEffects(torch.cat(kls), torch.cat(nk), torch.cat(dces), torch.cat(nd))


def gap_fraction(p: Tensor, lo: Tensor, hi: Tensor, toward_hi: bool = True) -> Callable[[Tensor], Tensor]:
    """Statistic: share of the (mean hi - mean lo) gap moved, from lo (or from hi if not toward_hi)."""

    def stat(i: Tensor) -> Tensor:
        if toward_hi:
            return normalized_effect(p[i].mean(), lo[i].mean(), hi[i].mean())
        return normalized_effect(p[i].mean(), hi[i].mean(), lo[i].mean())  # hi - p over hi - lo

    return stat


# ---------------------------------------------------------------------------------------------
# splits and data


@dataclass(frozen=True)
class Split3:
    train: list[int]
    val: list[int]
    test: list[int]


def split_three(fact_ids: Sequence[str], *, val_frac: float = 0.2, test_frac: float = 0.3, seed: int = 0) -> Split3:
    """Indices into ``fact_ids`` split train / validation / test so that no fact is on two sides."""
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"need 0 < val_frac, test_frac and val_frac + test_frac < 1, got {val_frac}, {test_frac}")
    facts = sorted(set(fact_ids))
    if len(facts) < 3:
        raise PairError(f"need at least 3 distinct facts for train / validation / test splits, got {len(facts)}")
    random.Random(seed).shuffle(facts)
    n = len(facts)
    n_test = min(max(1, round(test_frac * n)), n - 2)
    n_val = min(max(1, round(val_frac * n)), n - n_test - 1)
    side = {f: "test" for f in facts[:n_test]} | {f: "val" for f in facts[n_test : n_test + n_val]}
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, f in enumerate(fact_ids):
        out[side.get(f, "train")].append(i)
    return Split3(out["train"], out["val"], out["test"])


def split_lines(lines: Sequence[str], seed: int = 0, n_train: int = 16) -> tuple[list[str], list[str], list[str]]:
    """Neutral lines split train (a learned edit's penalty) / validation / test, seeded."""
    if len(lines) < n_train + 2:
        raise ValueError(f"need at least {n_train + 2} neutral lines, got {len(lines)}")
    order = list(lines)
    random.Random(f"{seed}/neutral").shuffle(order)
    rest = order[n_train:]
    return order[:n_train], rest[: len(rest) // 2], rest[len(rest) // 2 :]


SCORINGS: tuple[str, ...] = ("first", "full")


@dataclass
class EvalSet:
    """One side of the split, tokenized once, with its unsteered baselines.

    ``scoring`` says how answers are scored: ``"first"`` (default) by the first token of each
    spelling at the final prompt position (:func:`mechlie.core.pairs.answer_set`, ``multi_token="first"``);
    ``"full"`` by the teacher-forced log-probability of the whole answer
    (:func:`mechlie.core.metrics.answer_logprob`, run under the steering hooks), with "correct" meaning
    the full truth is more likely than the full lie. Pairs whose truth and lie share a first token
    can only be scored ``"full"`` (their ``answers`` is then None).
    """

    name: str
    pairs: list[ContrastPair]
    answers: AnswerSet | None
    honest: list[Batch]
    lying: list[Batch]
    base_honest: AnswerScores
    base_lying: AnswerScores
    neutral: list[Batch]  # this side's neutral lines
    clean_neutral: list[Tensor]  # their unsteered log-probs
    scoring: str = "first"
    batch_size: int = 16


def score_prompts(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    which: str,
    interventions: Sequence[Intervention] = (),
    *,
    scoring: str = "first",
    answers: AnswerSet | None = None,
    bs: Sequence[Batch] | None = None,
    batch_size: int = 16,
) -> AnswerScores:
    """Answer scores of the ``which`` (``"honest"`` or ``"lying"``) prompts of ``pairs`` under ``interventions``.

    ``scoring="first"``: first-token scores at the final position (``answers`` and the tokenized
    ``bs`` are made here when not given). ``scoring="full"``: full answers, teacher-forced inside
    :func:`mechlie.control.steering.steer`, so the answer tokens are steered like any prompt position.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    prompts = [getattr(p, which) for p in pairs]
    if scoring == "first":
        answers = answers if answers is not None else answer_set(model.tokenizer, pairs)
        return score_logits(last_logits(model, bs or batches(model, prompts, batch_size), interventions), answers)
    if any(isinstance(iv, HeadSetMean) for iv in interventions):
        # It patches each pass's last position: in a teacher-forced pass that is the answer's last
        # token, not the final prompt token, so the answer's probability would not see it.
        raise SteeringError("final-position mean patching cannot be scored on full answers; use scoring='first'")
    with torch.no_grad(), steer(model, *interventions):
        lt = answer_logprob(model, prompts, [p.truth for p in pairs], batch_size=batch_size)
        ll = answer_logprob(model, prompts, [p.lie for p in pairs], batch_size=batch_size)
    return AnswerScores(
        p_truth=lt.exp(),
        logit_diff=lt - ll,
        correct=lt > ll,
        choice_cov=torch.full_like(lt, float("nan")),
        logp_truth_seq=lt,
        logp_lie_seq=ll,
    )


def score(
    model: HookedTransformer, es: EvalSet, which: str, interventions: Sequence[Intervention] = ()
) -> AnswerScores:
    """:func:`score_prompts` on an evaluation set's honest or lying prompts, with its scoring."""
    return score_prompts(
        model,
        es.pairs,
        which,
        interventions,
        scoring=es.scoring,
        answers=es.answers,
        bs=es.honest if which == "honest" else es.lying,
        batch_size=es.batch_size,
    )


def eval_set(
    model: HookedTransformer,
    name: str,
    pairs: Sequence[ContrastPair],
    neutral: Sequence[str],
    batch_size: int = 16,
    *,
    scoring: str = "first",
) -> EvalSet:
    """Tokenize one side of the split and score its unsteered baselines (``scoring``: see :class:`EvalSet`)."""
    if len(pairs) == 0:
        raise PairError(f"the {name} set has no pairs")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    try:
        answers = answer_set(model.tokenizer, pairs)
    except PairError:
        if scoring == "first":
            raise
        answers = None  # truth and lie share a first token somewhere: full answers only
    honest = batches(model, [p.honest for p in pairs], batch_size)
    lying = batches(model, [p.lying for p in pairs], batch_size)
    nb = batches(model, list(neutral), batch_size)
    kw = dict(scoring=scoring, answers=answers, batch_size=batch_size)
    return EvalSet(
        name,
        list(pairs),
        answers,
        honest,
        lying,
        score_prompts(model, pairs, "honest", bs=honest, **kw),
        score_prompts(model, pairs, "lying", bs=lying, **kw),
        nb,
        token_logprobs(model, nb),
        scoring,
        batch_size,
    )


@dataclass
class SteeringData:
    """Split data, baselines, the directions fitted on the training facts, and learned edits."""

    train: list[ContrastPair]
    val: EvalSet
    test: EvalSet
    neutral_train: list[str]  # neutral lines a learned edit may train its KL penalty on
    resid_dirs: Float[Tensor, "layer d_model"]  # honest -> lying, at blocks.l.hook_resid_post
    heads: HeadDirections
    causal_heads: tuple[tuple[int, int], ...] = ()  # heads ranked by patching on training pairs
    edits: dict[str, Intervention] = field(default_factory=dict)  # learned edits by name
    extra: dict[str, EvalSet] = field(default_factory=dict)  # transfer sets (other relations / formats)
    train_resid: tuple[Tensor, Tensor] | None = None  # training (honest, lying) resid_post [n, layer, d], for probes
    head_means: tuple[Tensor, Tensor] | None = None  # mean final-position z [layer, head, d_head]: (honest, lying)
    fv: Float[Tensor, " d_model"] | None = None
    fv_layer: int | None = None


def prepare(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    *,
    val_frac: float = 0.2,
    test_frac: float = 0.3,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    scoring: str = "first",
) -> SteeringData:
    """Split by fact (train / val / test), fit directions on train, score the baselines of val and test.

    Args:
        model: the model.
        pairs: contrast pairs (honest, lying); at least 3 distinct facts.
        val_frac, test_frac: shares of facts held out for validation and for test.
        scoring: ``"first"`` (first answer token) or ``"full"`` (teacher-forced full answers), see :class:`EvalSet`.

    Returns:
        :class:`SteeringData`; add learned edits with :mod:`mechlie.control.edits` and causal heads with
        :func:`attach_causal_heads`.

    Example:
        >>> data = prepare(model, load_builtin("all", tokenizer=model.tokenizer, n=20))  # doctest: +SKIP
        >>> best = choose(sweep(model, data, [Setting("resid", 8, -a) for a in (1, 2)]))  # doctest: +SKIP
        >>> evaluate(model, data, best.setting)["recovered"]  # on the test facts  # doctest: +SKIP
    """
    split = split_three([p.fact_id for p in pairs], val_frac=val_frac, test_frac=test_frac, seed=seed)
    train = [pairs[i] for i in split.train]
    n_tr, n_va, n_te = split_lines(neutral_lines(), seed)
    kinds = ("z", "resid_post")
    h = collect(
        model, [p.honest for p in train], kinds=kinds, batch_size=batch_size, progress=progress, desc="train honest"
    )
    li = collect(
        model, [p.lying for p in train], kinds=kinds, batch_size=batch_size, progress=progress, desc="train lying"
    )
    rows = list(range(len(train)))
    return SteeringData(
        train=train,
        val=eval_set(model, "val", [pairs[i] for i in split.val], n_va, batch_size, scoring=scoring),
        test=eval_set(model, "test", [pairs[i] for i in split.test], n_te, batch_size, scoring=scoring),
        neutral_train=n_tr,
        resid_dirs=residual_directions(h["resid_post"], li["resid_post"], rows),
        heads=head_directions(h["z"], li["z"], rows),
        train_resid=(h["resid_post"].float(), li["resid_post"].float()),
        head_means=(h["z"].float().mean(0), li["z"].float().mean(0)),
    )


def reference_directions(
    data: SteeringData, layer: int, fits: Sequence[str] = ("diff_of_means", "mass_mean", "logistic")
) -> dict[str, Tensor]:
    """Directions (honest -> lying) at ``layer`` from the fit registry of :mod:`mechlie.read.directions`
    (probe kinds come from :mod:`mechlie.read.probes`), on the training facts: what a learned edit is
    compared with."""
    import mechlie.read.probes  # noqa: F401  (registers the probe fits)
    from mechlie.read.directions import get_fit

    if data.train_resid is None:
        raise SteeringError("no training activations kept")
    h, li = data.train_resid
    return {f: get_fit(f)(h[:, layer], li[:, layer]) for f in fits}


def attach_causal_heads(
    model: HookedTransformer,
    data: SteeringData,
    *,
    max_pairs: int = 24,
    batch_size: int = 16,
    progress: bool = True,
    heads: Sequence[tuple[int, int]] = (),
) -> None:
    """Rank heads by their patching effect (honest -> lying ``z`` at the final position) on at most
    ``max_pairs`` *training* pairs, and store the ranking in ``data.causal_heads``; or store ``heads``
    as given (e.g. a head sweep's top heads; note that a sweep over *all* facts has seen the test facts)."""
    from mechlie.causal.patching import patch_final_position

    if heads:
        for l, h in heads:
            if not (0 <= l < model.cfg.n_layers and 0 <= h < model.cfg.n_heads):
                raise SteeringError(f"head L{l}H{h} is not in this model ({model.cfg.n_layers} x {model.cfg.n_heads})")
        data.causal_heads = tuple((int(l), int(h)) for l, h in heads)
        return

    res = patch_final_position(model, data.train[:max_pairs], "z", batch_size=batch_size, progress=progress)
    eff = res.effect("p_truth").nan_to_num(-float("inf"))
    n_heads = eff.shape[-1]
    order = eff.flatten().argsort(descending=True)
    data.causal_heads = tuple((int(i) // n_heads, int(i) % n_heads) for i in order)


def attach_function_vector(
    model: HookedTransformer, data: SteeringData, layer: int, *, k: int = 10, max_train: int = 24, batch_size: int = 16
) -> str | None:
    """Build a lie function vector with :mod:`mechlie.causal.function_vectors` on training pairs, if that
    module works (optional, written separately): returns None on success, else the reason."""
    try:
        from mechlie.causal import function_vectors as fvm
        from mechlie.core.pairs import corrupted_fewshot

        train = data.train[:max_train]
        means = fvm.mean_head_activations(model, tokenize(model, [p.lying for p in train]), batch_size=batch_size)
        corrupt = tokenize(model, [corrupted_fewshot(p) for p in train])
        aie = fvm.head_aie(
            model, corrupt, answer_set(model.tokenizer, train), means.z, batch_size=batch_size, progress=False
        )
        fv = fvm.build_function_vector(means.head_out, aie.aie("truth_drop"), k)
        vec = torch.as_tensor(fv.vector).float().flatten().cpu()
        if vec.shape != (model.cfg.d_model,):
            return f"function vector has shape {tuple(vec.shape)}"
        data.fv, data.fv_layer = vec, layer
        return None
    except Exception as e:  # optional, concurrently written module: any failure means "absent"
        return f"{type(e).__name__}: {str(e)[:200]}"


# ---------------------------------------------------------------------------------------------
# settings and the kind registry


@dataclass(frozen=True)
class Setting:
    kind: str
    layer: int  # -1 for kinds that span layers (head kinds, learned edits)
    alpha: float  # signed: < 0 toward honesty, > 0 toward lying
    param: str = ""  # K heads for head kinds; the edit's name for learned kinds

    def flipped(self) -> "Setting":
        return replace(self, alpha=-self.alpha)


Build = Callable[[HookedTransformer, SteeringData, Setting], Intervention]
Control = Callable[[HookedTransformer, SteeringData, Setting, int], Intervention]


@dataclass(frozen=True)
class Kind:
    build: Build
    control: Control  # (model, data, setting, seed): a random intervention of the same size


KINDS: dict[str, Kind] = {}


def register_kind(name: str, build: Build, control: Control) -> None:
    """Add an intervention kind: ``build`` makes it from a setting, ``control`` its random control."""
    KINDS[name] = Kind(build, control)


def intervention(
    model: HookedTransformer, data: SteeringData, setting: Setting, *, control_seed: int | None = None
) -> Intervention:
    """The intervention for ``setting``, or its random control (seeded) if ``control_seed`` is given."""
    kind = KINDS.get(setting.kind)
    if kind is None:
        raise SteeringError(f"unknown kind {setting.kind!r}; kinds: {sorted(KINDS)}")
    return (
        kind.build(model, data, setting) if control_seed is None else kind.control(model, data, setting, control_seed)
    )


def _layer_dir(data: SteeringData, s: Setting) -> Tensor:
    if not 0 <= s.layer < len(data.resid_dirs):
        raise SteeringError(f"layer {s.layer} out of range: {len(data.resid_dirs)} layers")
    return data.resid_dirs[s.layer]


def _k(s: Setting) -> int:
    try:
        return int(s.param)
    except ValueError:
        raise SteeringError(f"kind {s.kind!r} needs param = K heads, got {s.param!r}") from None


def _causal_shift(data: SteeringData, s: Setting) -> HeadShift:
    heads = _causal_heads(data, s)
    units = torch.stack([data.heads.units[l, h] for l, h in heads])
    sigmas = torch.stack([data.heads.sigmas[l, h] for l, h in heads])
    return HeadShift(heads, units, sigmas, s.alpha)


def _set_mean(data: SteeringData, heads: tuple[tuple[int, int], ...], s: Setting) -> HeadSetMean:
    if data.head_means is None:
        raise SteeringError("no head means kept (prepare() keeps them)")
    hm, lm = data.head_means
    pick = lambda t: torch.stack([t[l, h] for l, h in heads])  # noqa: E731
    return HeadSetMean(heads, pick(hm), pick(lm), s.alpha)


def _causal_heads(data: SteeringData, s: Setting) -> tuple[tuple[int, int], ...]:
    k = _k(s)
    if not 0 < k <= len(data.causal_heads):
        raise SteeringError(
            f"causal kinds need 1..{len(data.causal_heads)} ranked heads (attach_causal_heads first), got K={k}"
        )
    return data.causal_heads[:k]


def _mean_control(data: SteeringData, iv: HeadSetMean, seed: int) -> HeadSetMean:
    assert data.head_means is not None  # _set_mean checked it
    return random_head_set_mean(iv, data.head_means[0], data.head_means[1], seed)


def _edit(data: SteeringData, s: Setting):
    if s.param not in data.edits:
        raise SteeringError(f"no learned edit named {s.param!r}; edits: {sorted(data.edits)}")
    return data.edits[s.param]


def _fv(data: SteeringData) -> tuple[int, Tensor]:
    if data.fv is None or data.fv_layer is None:
        raise SteeringError("no function vector attached")
    return data.fv_layer, data.fv


def _ablation(v: Tensor, s: Setting) -> Intervention:
    # alpha only says whether it is applied: ablation has no strength.
    return DirectionalAblation(v) if s.alpha != 0 else AddVectors({s.layer: v}, 0.0)


register_kind(
    "resid",
    lambda m, d, s: AddVectors({s.layer: _layer_dir(d, s)}, s.alpha),
    lambda m, d, s, seed: AddVectors({s.layer: random_like(_layer_dir(d, s), seed)}, s.alpha),
)
register_kind(
    "iti",
    lambda m, d, s: d.heads.top(_k(s), s.alpha),
    lambda m, d, s, seed: random_head_shift(d.heads.top(_k(s), s.alpha), m, seed),
)
register_kind(
    "causal", lambda m, d, s: _causal_shift(d, s), lambda m, d, s, seed: random_head_shift(_causal_shift(d, s), m, seed)
)
register_kind(
    "causal_mean",
    lambda m, d, s: _set_mean(d, _causal_heads(d, s), s),
    lambda m, d, s, seed: _mean_control(d, _set_mean(d, _causal_heads(d, s), s), seed),
)
register_kind(
    "probe_mean",
    lambda m, d, s: _set_mean(d, d.heads.top(_k(s), s.alpha).heads, s),
    lambda m, d, s, seed: _mean_control(d, _set_mean(d, d.heads.top(_k(s), s.alpha).heads, s), seed),
)
register_kind(
    "ablation",
    lambda m, d, s: _ablation(_layer_dir(d, s), s),
    lambda m, d, s, seed: _ablation(random_like(_layer_dir(d, s), seed), s),
)
register_kind(
    "fv",
    lambda m, d, s: AddVectors({_fv(d)[0]: _fv(d)[1]}, s.alpha),
    lambda m, d, s, seed: AddVectors({_fv(d)[0]: random_like(_fv(d)[1], seed)}, s.alpha),
)
for _name in ("learned", "lowrank", "gated"):
    register_kind(
        _name,
        lambda m, d, s: _edit(d, s).scaled(s.alpha),
        lambda m, d, s, seed: _edit(d, s).random_control(seed).scaled(s.alpha),
    )


# ---------------------------------------------------------------------------------------------
# sweep on validation, choice, evaluation on test


@dataclass(frozen=True)
class SweepPoint:
    setting: Setting
    split: str  # which evaluation set it was measured on ("val" for choosing)
    p_truth: float  # mean P(truth) on that set's lying prompts, steered
    recovered: float  # share of the honest-lying P(truth) gap closed
    kl: float  # token-weighted mean KL on that set's neutral lines

    @property
    def kind(self) -> str:
        return self.setting.kind

    @property
    def layer(self) -> int:
        return self.setting.layer

    @property
    def alpha(self) -> float:
        return self.setting.alpha


def _recovered(s: AnswerScores, es: EvalSet) -> float:
    return float(normalized_effect(s.p_truth.mean(), es.base_lying.p_truth.mean(), es.base_honest.p_truth.mean()))


def measure(model: HookedTransformer, es: EvalSet, iv: Intervention) -> tuple[AnswerScores, NeutralEffects]:
    """Lying prompts' scores and neutral-text effects of one intervention on one evaluation set."""
    return score(model, es, "lying", [iv]), neutral_effects(model, es.neutral, es.clean_neutral, [iv])


def sweep(
    model: HookedTransformer, data: SteeringData, settings: Sequence[Setting], *, on: str = "val", progress: bool = True
) -> list[SweepPoint]:
    """Score each setting on ``data.val`` (default): the grid hyperparameters are chosen from.

    Only the validation set is read (``on="test"`` exists for figures of the whole grid on test,
    never for choosing).
    """
    es = {"val": data.val, "test": data.test}[on]
    out = []
    for s in tqdm(settings, desc=f"sweep ({on})", disable=not progress):
        scores, ne = measure(model, es, intervention(model, data, s))
        out.append(SweepPoint(s, es.name, float(scores.p_truth.mean()), _recovered(scores, es), ne.kl))
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
    """Most recovery within the KL budget; if none fits, the lowest-KL point. Validation points only."""
    if not points:
        raise ValueError("no sweep points to choose from")
    if any(p.split != "val" for p in points):
        raise ValueError("hyperparameters are chosen on validation points only")
    ok = [p for p in points if p.kl <= kl_budget]
    return max(ok, key=lambda p: p.recovered) if ok else min(points, key=lambda p: p.kl)


def controls(
    model: HookedTransformer,
    data: SteeringData,
    setting: Setting,
    es: EvalSet,
    *,
    n_draws: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """``n_draws`` random interventions of the same size: their effects' distribution over draws."""
    rec, kl, lie = [], [], []
    known = es.base_honest.correct
    for j in tqdm(range(n_draws), desc="controls", disable=not progress):
        scores, ne = measure(model, es, intervention(model, data, setting, control_seed=seed + 1000 * j + 1))
        rec.append(_recovered(scores, es))
        kl.append(ne.kl)
        lie.append(float(1 - scores.correct[known].float().mean()) if known.any() else float("nan"))
    return {
        "n_draws": n_draws,
        "recovered": spread(rec),
        "kl": spread(kl),
        "lie_rate": spread(lie),
        "recovered_draws": rec,
        "kl_draws": kl,
    }


def evaluate(
    model: HookedTransformer,
    data: SteeringData,
    setting: Setting,
    *,
    on: str = "test",
    n_controls: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Every effect of one setting on the test facts and test neutral lines, with 95% CIs, and its
    random control from ``n_controls`` draws.

    Args:
        setting: the (validation-chosen) setting; ``alpha < 0`` steers toward honesty.
        on: ``"test"`` (reported numbers) or the name of a transfer set in ``data.extra``.

    Returns:
        dict of :class:`Estimate` (and the control's distribution under ``"control"``).
    """
    es = data.test if on == "test" else data.extra[on]
    iv = intervention(model, data, setting)
    hp, lp = es.base_honest.p_truth, es.base_lying.p_truth
    n = len(hp)
    known = es.base_honest.correct
    lying_s, ne = measure(model, es, iv)
    honest_s = score(model, es, "honest", [iv])
    b = lambda stat, m=n: bootstrap(stat, m, n_boot=n_boot, seed=seed)
    lie = lambda s: lambda i: 1 - s.correct[i][known[i]].float().mean()
    res = {
        "setting": setting,
        "on": es.name,
        "n_facts": n,
        "n_known": int(known.sum()),
        "n_neutral_lines": len(ne.kl_sum),
        "n_neutral_tokens": int(ne.kl_tokens.sum()),
        "p_truth_lying_steered": b(lambda i: lying_s.p_truth[i].mean()),
        "recovered": b(gap_fraction(lying_s.p_truth, lp, hp)),
        "lie_rate_before": b(lie(es.base_lying)),
        "lie_rate_steered": b(lie(lying_s)),
        "honest_acc_before": b(lambda i: es.base_honest.correct[i].float().mean()),
        "honest_acc_steered": b(lambda i: honest_s.correct[i].float().mean()),
        "kl": b(ne.kl_stat(), len(ne.kl_sum)),
        "delta_ce": b(ne.dce_stat(), len(ne.dce_sum)),
    }
    if setting.kind != "ablation":
        induced = score(model, es, "honest", [intervention(model, data, setting.flipped())])
        res["p_truth_honest_induced"] = b(lambda i: induced.p_truth[i].mean())
        res["induced"] = b(gap_fraction(induced.p_truth, lp, hp, toward_hi=False))
        res["lie_rate_induced"] = b(lie(induced))
    if n_controls > 0:
        c = controls(model, data, setting, es, n_draws=n_controls, seed=seed)
        c["share_recovering_at_least_real"] = sum(r >= res["recovered"].mean for r in c["recovered_draws"]) / n_controls
        res["control"] = c
    return res


def baseline_summary(es: EvalSet, n_boot: int = 1000, seed: int = 0) -> dict:
    h, l = es.base_honest, es.base_lying
    n, known = len(h.p_truth), h.correct
    return {
        "set": es.name,
        "n_facts": len({p.fact_id for p in es.pairs}),
        "n_pairs": n,
        "n_known": int(known.sum()),
        "p_truth_honest": bootstrap(lambda i: h.p_truth[i].mean(), n, n_boot=n_boot, seed=seed),
        "p_truth_lying": bootstrap(lambda i: l.p_truth[i].mean(), n, n_boot=n_boot, seed=seed),
        "honest_acc": bootstrap(lambda i: h.correct[i].float().mean(), n, n_boot=n_boot, seed=seed),
        "lie_rate": bootstrap(lambda i: 1 - l.correct[i][known[i]].float().mean(), n, n_boot=n_boot, seed=seed),
    }


def lying_rows(es: EvalSet) -> list[int]:
    """Rows where the model actually lies: top-1 truth when honest, top-1 not the truth when lying."""
    return [i for i in range(len(es.pairs)) if bool(es.base_honest.correct[i]) and not bool(es.base_lying.correct[i])]


__all__ = [
    "EvalSet",
    "Estimate",
    "Kind",
    "KINDS",
    "NeutralEffects",
    "Setting",
    "Split3",
    "SCORINGS",
    "SteeringData",
    "SweepPoint",
    "attach_causal_heads",
    "attach_function_vector",
    "baseline_summary",
    "batches",
    "bootstrap",
    "choose",
    "controls",
    "eval_set",
    "evaluate",
    "gap_fraction",
    "intervention",
    "last_logits",
    "lying_rows",
    "measure",
    "neutral_effects",
    "neutral_lines",
    "pareto",
    "prepare",
    "reference_directions",
    "register_kind",
    "score",
    "score_prompts",
    "split_lines",
    "split_three",
    "spread",
    "sweep",
    "token_logprobs",
]
