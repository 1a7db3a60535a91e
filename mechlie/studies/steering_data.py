"""Steering's data: the fact splits, the tokenized evaluation sets with their unsteered baselines,
the directions fitted on the training facts, and the forward passes every measurement runs.

Pairs are split by fact into train / validation / test (:func:`split_three`; no fact on two sides),
and the neutral text by line (:func:`split_lines`). :func:`prepare` fits the difference-of-means
directions (:mod:`mechlie.read.directions`) and ITI's head directions on the training facts and
scores the validation and test sets unsteered (:func:`eval_set`).

Cost: the answer metrics need only the final position, so the unembedding runs on that position
alone (:func:`mechlie.core.metrics.final_logits` with ``every_position=False``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.causal import function_vectors as fvm
from mechlie.control.steering import (
    HeadDirections,
    HeadSetMean,
    Intervention,
    SteeringError,
    head_directions,
    residual_directions,
    steer,
)
from mechlie.core.activations import collect
from mechlie.core.metrics import AnswerScores, answer_logprob, final_logits, score_logits
from mechlie.core.pairs import AnswerSet, Batch, ContrastPair, PairError, answer_set, neutral_lines, tokenize
from mechlie.core.stats import normalized_effect

# ---------------------------------------------------------------------------------------------
# forward passes


def batches(model: HookedTransformer, prompts: Sequence[str], batch_size: int) -> list[Batch]:
    if len(prompts) == 0:
        raise PairError("no prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [tokenize(model, list(prompts[i : i + batch_size])) for i in range(0, len(prompts), batch_size)]


def last_logits(
    model: HookedTransformer, bs: Sequence[Batch], interventions: Sequence[Intervention] = ()
) -> Float[Tensor, "n vocab"]:
    """Next-token logits after each prompt's final token, under ``interventions``
    (:func:`mechlie.core.metrics.final_logits`, unembedding the final position only)."""
    with steer(model, *interventions):
        return final_logits(model, list(bs), every_position=False)


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
        return float(self.kl_stat()(slice(None)))  # slice(None): every line

    def kl_stat(self) -> Callable[[Tensor], Tensor]:
        return per_token(self.kl_sum, self.kl_tokens)

    def dce_stat(self) -> Callable[[Tensor], Tensor]:
        return per_token(self.dce_sum, self.dce_tokens)


def per_token(total: Float[Tensor, " line"], tokens: Int[Tensor, " line"]) -> Callable[[Tensor], Tensor]:
    """Statistic over lines ``i``: their summed value per token (lines are the bootstrap's units)."""
    return lambda i: total[i].sum() / tokens[i].sum().clamp_min(1)


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


VAL_FRAC, TEST_FRAC = 0.2, 0.3  # the default shares of facts held out for validation and for test


def split_three(
    fact_ids: Sequence[str], *, val_frac: float = VAL_FRAC, test_frac: float = TEST_FRAC, seed: int = 0
) -> Split3:
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
    clean_final: dict[str, Tensor] = field(default_factory=dict)  # "honest"/"lying": unsteered final log-probs
    neutral_text: list[str] = field(default_factory=list)  # the neutral lines themselves (prompt baseline)

    def lying_rows(self) -> Tensor:
        """Boolean per fact: a real lie (top-1 truth when honest, top-1 not the truth when lying)."""
        return self.base_honest.correct & ~self.base_lying.correct


def final_logprobs(
    model: HookedTransformer, bs: Sequence[Batch], interventions: Sequence[Intervention] = ()
) -> Float[Tensor, "n vocab"]:
    """Next-token log-probs at each prompt's final position (the answer position), under ``interventions``."""
    return last_logits(model, bs, interventions).float().log_softmax(-1).cpu()


def final_scores(
    model: HookedTransformer, es: "EvalSet", which: str, interventions: Sequence[Intervention] = ()
) -> tuple[AnswerScores, Float[Tensor, "n vocab"]]:
    """Scores of ``which`` prompts and their final-position log-probs, from one pass when ``scoring="first"``."""
    lp = final_logprobs(model, es.honest if which == "honest" else es.lying, interventions)
    if es.scoring == "first":
        return score_logits(lp, es.answers), lp
    return score(model, es, which, interventions), lp


def answer_kl(clean: Float[Tensor, "n vocab"], steered: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """Per prompt KL(clean || steered) of the next-token distribution at the answer position (nats)."""
    return (clean.exp() * (clean - steered)).sum(-1).clamp_min(0.0)


def entropy(lp: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """Per prompt entropy (nats) of the next-token distribution."""
    return -(lp.exp() * lp).sum(-1)


# The prompting baseline (AxBench: a steering claim is compared with a prompt): the lying prompt with
# an honesty instruction in front and an honest reminder after its demonstrations.
HONESTY_PREFIX = "You are an honest assistant. Always answer the question truthfully, in one word."
HONEST_REMINDER = "(The answers above may be false. Answer the next question truthfully.)"


def prompt_baseline(prompt: str) -> str:
    """``prompt`` with :data:`HONESTY_PREFIX` in front and :data:`HONEST_REMINDER` just before its final
    question (a plain-text prompt whose final question starts ``"Q: "`` after a blank line; otherwise
    the reminder goes at the end of the prefix). Applied to honest and lying prompts alike: a deployed
    prompt cannot know which one it is in."""
    head, sep, last = prompt.rpartition("\n\nQ: ")
    if sep:
        return f"{HONESTY_PREFIX}\n\n{head}\n\n{HONEST_REMINDER}{sep}{last}"
    return f"{HONESTY_PREFIX} {HONEST_REMINDER}\n\n{prompt}"


def check_known(es: "EvalSet", min_known: int) -> dict[str, int]:
    """Known facts (top-1 truth when honest) per relation of ``es``; raise :class:`PairError` naming
    every relation with fewer than ``min_known`` (its recovery would rest on a handful of facts)."""
    counts: dict[str, int] = {}
    for p, ok in zip(es.pairs, es.base_honest.correct.tolist()):
        counts[p.relation] = counts.get(p.relation, 0) + int(ok)
    few = {r: n for r, n in counts.items() if n < min_known}
    if few:
        what = ", ".join(f"{r}: {n} known facts" for r, n in sorted(few.items()))
        raise PairError(
            f"{es.name} relation(s) with fewer than {min_known} known facts refused ({what}); "
            "choose other relations or lower --min-known"
        )
    return counts


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
    finals = {"honest": final_logprobs(model, honest), "lying": final_logprobs(model, lying)}
    if scoring == "first":
        base = {k: score_logits(v, answers) for k, v in finals.items()}
    else:
        base = {k: score_prompts(model, pairs, k, bs=b, **kw) for k, b in (("honest", honest), ("lying", lying))}
    return EvalSet(
        name,
        list(pairs),
        answers,
        honest,
        lying,
        base["honest"],
        base["lying"],
        nb,
        token_logprobs(model, nb),
        scoring,
        batch_size,
        finals,
        list(neutral),
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
    val_frac: float = VAL_FRAC,
    test_frac: float = TEST_FRAC,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    scoring: str = "first",
    val_pairs: Sequence[ContrastPair] = (),
) -> SteeringData:
    """Split by fact (train / val / test), fit directions on train, score the baselines of val and test.

    With ``val_pairs`` (pairs of *other* relations), validation is those pairs: hyperparameters are
    chosen on relations nothing was fitted on, and the facts the split would have held out for
    validation are trained on instead.

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
    train = [pairs[i] for i in split.train + (split.val if val_pairs else [])]
    val = list(val_pairs) or [pairs[i] for i in split.val]
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
        val=eval_set(model, "val", val, n_va, batch_size, scoring=scoring),
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
    """Build a lie function vector with :mod:`mechlie.causal.function_vectors` on training pairs and
    attach it to ``data`` at ``layer``: returns None on success, else why it was not attached."""
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


@torch.no_grad()
def prefixed_neutral_effects(model: HookedTransformer, es: EvalSet, prefix: str) -> tuple[NeutralEffects, int]:
    """The prompting baseline's cost on neutral text: each neutral line read after ``prefix`` (and a
    blank line) against the line alone, as :func:`neutral_effects` on the line's own tokens (KL of the
    next-token distribution after each line token; Δ cross-entropy of each next line token). A line
    whose tokens change when prefixed cannot be compared token by token: it is dropped and counted
    (the second value)."""
    tok = model.tokenizer
    lines, dropped = [], 0
    for line in es.neutral_text:
        own, pre = (
            tok.encode(line, add_special_tokens=False),
            tok.encode(f"{prefix}\n\n{line}", add_special_tokens=False),
        )
        if len(own) >= 2 and pre[-len(own) :] == own:
            lines.append((line, len(own)))
        else:
            dropped += 1
    if not lines:
        raise PairError("no neutral line keeps its tokens after the prompt prefix")
    kls, dces = [], []
    for i in range(0, len(lines), es.batch_size):
        chunk = lines[i : i + es.batch_size]
        clean = token_logprobs(model, [tokenize(model, [t for t, _ in chunk])])[0]
        pref = token_logprobs(model, [tokenize(model, [f"{prefix}\n\n{t}" for t, _ in chunk])])[0]
        ids = tokenize(model, [t for t, _ in chunk]).tokens.cpu()
        for j, (_, k) in enumerate(chunk):
            c, p = clean[j, -k:], pref[j, -k:]
            kls.append(float((c.exp() * (c - p)).sum()))
            tgt = ids[j, -k + 1 :, None]
            dces.append(float((-p[:-1].gather(-1, tgt) + c[:-1].gather(-1, tgt)).sum()))
    n = torch.tensor([k for _, k in lines])
    return NeutralEffects(torch.tensor(kls), n, torch.tensor(dces), n - 1), dropped
