"""On-policy lie labels: what the model actually answers, and the states it answers from.

The framing label ("this prompt asks for a lie") is not the behaviour: a small model told to lie
often tells the truth, and a prompt-framing probe can learn the prompt's text instead of "I am
lying now". Following the research notes (points 1 and 2), a lie is labelled by what the model
*does*:

==========================  ===========================================================
label                       meaning
==========================  ===========================================================
``honest``                  honest framing, fact known (answered correctly when honest)
``unknown``                 the fact is not known: the greedy honest answer is not the truth
``lie``                     lying framing, fact known, answered with a *valid* false answer
                            of the relation (class ``lie`` of :func:`classify_answer`)
``truth_under_lie_framing`` lying framing, fact known, answered with the truth or an alias
``paraphrase``              lying framing, fact known, the truth reworded ("the Euro")
``junk``                    lying framing, fact known, no answer of the relation (" Zabuab")
==========================  ===========================================================

Answers come from :func:`mechlie.core.generation.generate` (KV-cached): greedy, and ``k`` samples at
temperature ``T`` from the same lying prompt. The samples give lies *and* truths under the same
prompt, which removes the prompt-text confound. Answers are classed by :func:`classify_answer`
(whole words, case-insensitive, so multi-token answers work) against the relation's valid answers
(``on_policy(..., answers=...)``). Junk and paraphrases are counted (:meth:`OnPolicy.counts`,
:func:`mechlie.read.rates.lie_rates`) and kept out of the lie/truth rows unless asked for
(:meth:`OnPolicy.rows` ``positive``/``negative``; :meth:`OnPolicy.labelled_rows`).

Surprisal: every generation keeps each token's log-prob under the model's own (untempered)
distribution (:attr:`GenStates.logprobs`), so :attr:`GenStates.surprisal_first` (-log P of the
answer's first token) and :attr:`GenStates.surprisal_answer` (summed over the answer) are a
training-free baseline for any detector on the same rows.

Two definitions of "known": here a fact is known when the greedy honest *text* starts with the
truth or an alias (class ``truth``; :attr:`OnPolicy.known`, ``n_known_greedy`` in :meth:`OnPolicy.counts`);
:attr:`mechlie.core.metrics.Behaviour.known` asks only that the honest prompt's top-1 *first token*
be the truth's (``n_known_first_token``). They can differ on a few facts (a right first token
followed by other words, or a top-1 spelling variant); :func:`known_side_by_side` counts both.

States (:func:`generate_with_states`) are read from the generator's own passes: pass 0 sees the
whole prompt and its final position chose generated token 0; pass ``s`` sees generated token
``s-1`` alone. So ``states[:, 0]`` is the final prompt token and ``states[:, 1]`` is the first
generated answer token (the notes' "generated token itself"). Samples of one prompt share
``states[:, 0]``; only generation-time states can tell their lies from their truths.

Cost: the greedy lying answer and the ``k`` samples come from *one* prompt pass per lying prompt
(``generate(..., n_per_prompt=k + 1, greedy_first=True)``), so labelling ``n`` pairs runs ``2n``
prompt passes, not ``(k + 2) n``. Multi-token answers: ``max_new_tokens`` is raised to the longest
spelling of any truth (logged), so a generated answer is never judged on a cut-off prefix.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.core.generation import generate
from mechlie.core.hooks import hook_name
from mechlie.core.pairs import ContrastPair, PairError, answer_sequences

# Re-exported: labels.py is where callers look for the answer classes.
from mechlie.read.answers import ANSWER_CLASSES, answer_matches, classify_answer, valid_answer_sets

log = logging.getLogger(__name__)

LABELS: tuple[str, ...] = ("honest", "unknown", "lie", "truth_under_lie_framing", "paraphrase", "junk")
# The labels of a known fact's answer to a lying prompt.
LYING_LABELS: tuple[str, ...] = ("lie", "truth_under_lie_framing", "paraphrase", "junk")

__all__ = [
    "ANSWER_CLASSES",
    "LABELS",
    "LYING_LABELS",
    "GenStates",
    "OnPolicy",
    "answer_matches",
    "classify_answer",
    "generate_with_states",
    "known_side_by_side",
    "on_policy",
]


@dataclass(frozen=True)
class GenStates:
    tokens: Int[Tensor, "n steps"]  # generated ids (pad after a row stopped)
    new_mask: Int[Tensor, "n steps"]  # 1 = a generated token
    texts: list[str]  # decoded continuations (cut before a stop string)
    # kind -> [n, steps, L, (H,) d]; [:, s] is the state of the position that chose token s
    states: dict[str, Tensor]
    layers: tuple[int, ...]
    # log P(token s | prompt, tokens < s) under the model's own (untempered) distribution; NaN after a stop
    logprobs: Float[Tensor, "n steps"] | None = None
    n_answer: Int[Tensor, " n"] | None = None  # generated tokens that are the answer (the stop token excluded)

    def take(self, idx: Sequence[int]) -> "GenStates":
        """The rows ``idx`` (e.g. the greedy rows of an ``n_per_prompt`` generation)."""
        t = torch.as_tensor(list(idx), dtype=torch.long)
        return GenStates(
            self.tokens[t],
            self.new_mask[t],
            [self.texts[i] for i in t.tolist()],
            {k: v[t] for k, v in self.states.items()},
            self.layers,
            None if self.logprobs is None else self.logprobs[t],
            None if self.n_answer is None else self.n_answer[t],
        )

    def _need_logprobs(self) -> tuple[Tensor, Tensor]:
        if self.logprobs is None or self.n_answer is None:
            raise ValueError("these generations kept no log-probs (made before GenStates had them)")
        return self.logprobs, self.n_answer

    @property
    def surprisal_first(self) -> Float[Tensor, " n"]:
        """-log P of the first generated token under the prompt (the issue's training-free baseline)."""
        return -self._need_logprobs()[0][:, 0]

    @property
    def surprisal_answer(self) -> Float[Tensor, " n"]:
        """-log P of the whole generated answer: summed over its tokens, the stop token (newline or EOS)
        excluded; 0 for an empty answer (a row whose first token was the stop)."""
        lp, n = self._need_logprobs()
        keep = torch.arange(lp.shape[1])[None] < n[:, None]
        return -torch.where(keep, lp, torch.zeros_like(lp)).sum(1)


def _pad_steps(t: Tensor, steps: int, value: float | int) -> Tensor:
    if t.shape[1] == steps:
        return t
    pad = torch.full((t.shape[0], steps - t.shape[1], *t.shape[2:]), value, dtype=t.dtype)
    return torch.cat([t, pad], 1)


@torch.no_grad()
def generate_with_states(
    model: HookedTransformer,
    prompts: Sequence[str],
    *,
    kinds: Sequence[str] = ("resid_post",),
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    **generate_kw,
) -> GenStates:
    """:func:`mechlie.core.generation.generate` that also keeps every pass's final-position state.

    Args:
        kinds: activation kinds read from a hook (``resid_post``, ``resid_pre``, ``mlp_out``, ``z``...).
        layers: blocks to keep (default all).
        batch_size: prompts generated together (each chunk is seeded ``seed + chunk index``).
        generate_kw: passed to :func:`generate` (``max_new_tokens``, ``do_sample``, ``temperature``,
            ``seed``, ``stop_strings``, ``n_per_prompt``, ``greedy_first``...).

    Returns:
        :class:`GenStates`; ``states[kind][:, s]`` is the state from which token ``s`` was chosen
        (NaN where a row had stopped). With ``n_per_prompt = m`` there are ``m`` rows per prompt.

    Example:
        >>> g = generate_with_states(model, [p.lying for p in pairs], max_new_tokens=3)
        >>> g.states["resid_post"].shape  # [n, steps, L, d_model]
    """
    layers = tuple(range(model.cfg.n_layers)) if layers is None else tuple(layers)
    if not layers or min(layers) < 0 or max(layers) >= model.cfg.n_layers:
        raise ValueError(f"layers must be within 0..{model.cfg.n_layers - 1}, got {layers}")
    if len(prompts) == 0:
        raise PairError("no prompts to generate from")
    seed = generate_kw.pop("seed", 0)
    chunks = []
    logprobs: list[tuple[Tensor, Tensor]] = []
    for c, start in enumerate(
        tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False)
    ):
        store: dict[str, dict[int, list[Tensor]]] = {k: {l: [] for l in layers} for k in kinds}

        def saver(kind: str, layer: int, store=store):
            def hook(act: Tensor, hook) -> None:
                store[kind][layer].append(act[:, -1].detach().float().cpu())

            return hook

        hooks = [(hook_name(k, l), saver(k, l)) for k in kinds for l in layers]
        with model.hooks(fwd_hooks=hooks):
            result = generate(model, list(prompts[start : start + batch_size]), seed=seed + c, **generate_kw)
        steps = result.tokens.shape[1]
        rows = result.tokens.shape[0]
        # With n_per_prompt > 1 the prompt pass has one row per prompt: repeat it for its continuations.
        widen = lambda t: t.repeat_interleave(rows // t.shape[0], 0) if t.shape[0] != rows else t  # noqa: E731
        states = {
            k: torch.stack([torch.stack([widen(t) for t in store[k][l][:steps]], 1) for l in layers], 2) for k in kinds
        }
        chunks.append((result, states))
        logprobs.append(_token_logprobs(result))
    steps = max(r.tokens.shape[1] for r, _ in chunks)
    mask = torch.cat([_pad_steps(r.new_mask, steps, 0) for r, _ in chunks])
    states = {}
    for k in kinds:
        st = torch.cat([_pad_steps(s[k], steps, float("nan")) for _, s in chunks])
        states[k] = st.masked_fill(~mask.bool().view(*mask.shape, *[1] * (st.ndim - 2)), float("nan"))
    return GenStates(
        tokens=torch.cat([_pad_steps(r.tokens, steps, 0) for r, _ in chunks]),
        new_mask=mask,
        texts=[t for r, _ in chunks for t in r.texts],
        states=states,
        layers=layers,
        logprobs=torch.cat([_pad_steps(lp, steps, float("nan")) for lp, _ in logprobs]),
        n_answer=torch.cat([n for _, n in logprobs]),
    )


def _token_logprobs(result) -> tuple[Tensor, Tensor]:
    """Each generated token's log-prob under the logits it was chosen from (untempered: the model's own
    distribution, whatever the sampling temperature), NaN where not generated; and the answer's length
    in tokens: the kept tokens, less the stop token of a row that stopped at EOS or a stop string."""
    lp = result.logprobs.float().masked_fill(~result.new_mask.bool(), float("nan"))
    stopped = torch.tensor([r in ("eos", "stop_string") for r in result.stop_reason], dtype=torch.long)
    return lp, (result.new_mask.sum(1) - stopped).clamp(min=0)


# Lying-prompt label of a known fact, by the class of its answer.
_LYING_LABEL = {"truth": "truth_under_lie_framing", "lie": "lie", "paraphrase": "paraphrase", "junk": "junk"}


@dataclass(frozen=True)
class OnPolicy:
    """On-policy answers and labels for a list of pairs (``n`` pairs, ``k`` samples each).

    ``answers``: relation -> its valid answers, what makes a generated answer a ``lie`` rather than
    ``junk`` (:func:`classify_answer`). Without it (or for a relation it lacks) the valid answers of a
    relation are the designated lies and truths of its pairs, plus the built-in relation's answers for
    a built-in relation: a narrower set, so a real answer of the relation missing from it is ``junk``.
    A relation with none of these (a user's own pairs without designated lies, not built-in) has no
    valid set at all: its non-empty answers that are neither the truth nor a paraphrase count as
    ``lie`` *unvalidated*, as before valid labels existed (logged as a warning).
    """

    pairs: list[ContrastPair]
    honest: GenStates  # greedy answers to the honest prompts
    greedy: GenStates  # greedy answers to the lying prompts
    samples: GenStates | None  # k sampled answers per lying prompt, rows i*k .. i*k+k-1
    k: int
    temperature: float
    answers: dict[str, list[str]] | None = None

    @functools.cached_property
    def valid_answers(self) -> dict[str, tuple[str, ...] | None]:
        """Relation -> the valid answers used to tell a lie from junk, ``None`` where there are none
        (see the class docstring; :func:`valid_answer_sets`)."""
        return valid_answer_sets(self.pairs, self.answers)

    def classes(self, texts: Sequence[str], pair_idx: Sequence[int]) -> list[str]:
        """:func:`classify_answer` of each text against its pair's truth, aliases and relation."""
        valid = self.valid_answers
        return [
            classify_answer(t, self.pairs[i].truth, self.pairs[i].aliases, valid[self.pairs[i].relation])
            for t, i in zip(texts, pair_idx)
        ]

    @functools.cached_property
    def honest_classes(self) -> list[str]:
        return self.classes(self.honest.texts, range(len(self.pairs)))

    @functools.cached_property
    def greedy_classes(self) -> list[str]:
        """Class of each greedy lying answer (:data:`ANSWER_CLASSES`), whether the fact is known or not."""
        return self.classes(self.greedy.texts, range(len(self.pairs)))

    @functools.cached_property
    def sample_classes(self) -> list[str]:
        """Class of each sampled lying answer, ``n * k`` rows (pair ``i // k``)."""
        if self.samples is None:
            return []
        return self.classes(self.samples.texts, [i // self.k for i in range(len(self.pairs) * self.k)])

    @property
    def known(self) -> Bool[Tensor, " n"]:
        """Known by the *greedy-text* definition: the greedy honest answer is the truth or an alias
        (class ``truth`` of :func:`classify_answer`). Not :attr:`mechlie.core.metrics.Behaviour.known` (first token)."""
        return torch.tensor([c == "truth" for c in self.honest_classes], dtype=torch.bool)

    def _lying_labels(self, classes: Sequence[str], pair_idx: Sequence[int]) -> list[str]:
        known = self.known.tolist()
        return [_LYING_LABEL[c] if known[i] else "unknown" for c, i in zip(classes, pair_idx)]

    @property
    def honest_labels(self) -> list[str]:
        return ["honest" if k else "unknown" for k in self.known.tolist()]

    @property
    def greedy_labels(self) -> list[str]:
        return self._lying_labels(self.greedy_classes, range(len(self.pairs)))

    @property
    def sample_labels(self) -> list[str]:
        """Labels of the sampled answers, ``n * k`` rows (pair ``i // k``)."""
        return self._lying_labels(self.sample_classes, [i // self.k for i in range(len(self.sample_classes))])

    def counts(self) -> dict[str, dict[str, int]]:
        """Label counts per relation for honest greedy, lying greedy and lying samples (``lie``,
        ``truth_under_lie_framing``, ``paraphrase``, ``junk``, ``unknown``), with ``n_known_greedy``
        (= ``honest/honest``: known by the greedy-text definition)."""
        out: dict[str, dict[str, int]] = {}
        rels = [p.relation for p in self.pairs]
        for name, labels, rel in (
            ("honest", self.honest_labels, rels),
            ("greedy", self.greedy_labels, rels),
            ("sampled", self.sample_labels, [r for r in rels for _ in range(self.k)]),
        ):
            for r in sorted(set(rels)) + ["all"]:
                c = Counter(lab for lab, rr in zip(labels, rel) if r == "all" or rr == r)
                out.setdefault(r, {}).update({f"{name}/{lab}": c[lab] for lab in LABELS if c[lab]})
                out[r]["n_pairs"] = sum(1 for rr in rels if r == "all" or rr == r)
                if name == "honest":
                    out[r]["n_known_greedy"] = c["honest"]
        return out

    def framing_rows(
        self,
        *,
        known_only: bool = True,
        relation: str | None = None,
        kind: str = "resid_post",
        pair_mask: Sequence[bool] | None = None,
    ) -> tuple[Float[Tensor, "m L d"], Float[Tensor, " m"], list[str]]:
        """Framing labels at the final prompt token: honest prompts (0) vs lying prompts (1) of
        the same facts, only facts the model knows unless ``known_only=False``; only pairs of
        ``relation`` and where ``pair_mask`` is true, if given."""
        known = self.known.tolist()
        mask = self._mask(pair_mask)
        idx = [
            i
            for i, p in enumerate(self.pairs)
            if (known[i] or not known_only) and (relation is None or p.relation == relation) and mask[i]
        ]
        X = torch.cat([self.honest.states[kind][idx, 0], self.greedy.states[kind][idx, 0]])
        y = torch.cat([torch.zeros(len(idx)), torch.ones(len(idx))])
        facts = [self.pairs[i].fact_id for i in idx] * 2
        return X, y, facts

    def _mask(self, pair_mask: Sequence[bool] | None) -> list[bool]:
        if pair_mask is None:
            return [True] * len(self.pairs)
        if len(pair_mask) != len(self.pairs):
            raise ValueError(f"pair_mask has {len(pair_mask)} entries for {len(self.pairs)} pairs")
        return [bool(m) for m in pair_mask]

    def labelled_rows(
        self,
        contrast: str = "within_prompt",
        site: str = "answer",
        kind: str = "resid_post",
        pair_mask: Sequence[bool] | None = None,
        *,
        labels: Sequence[str] = LYING_LABELS,
        allow_empty: bool = False,
    ) -> tuple[Float[Tensor, "m L d"], list[str], list[str]]:
        """Rows with their label names: features ``[m, L, d]``, labels, fact ids.

        ``within_prompt``: the sampled answers to the lying prompts whose label is in ``labels``
        (:data:`LYING_LABELS`: ``lie``, ``truth_under_lie_framing``, ``paraphrase``, ``junk``).
        ``vs_honest``: the greedy ``honest`` answers, then the greedy lying answers whose label is in
        ``labels``. Every row left out is counted in one log line by reason (fact unknown, a label not
        asked for, outside ``pair_mask``, stopped before ``site``); no row left raises ``ValueError``
        unless ``allow_empty``.
        """
        mask = self._mask(pair_mask)
        step = {"prompt": 0, "answer": 1}.get(site)
        if step is None:
            raise ValueError(f"site must be 'prompt' or 'answer', got {site!r}")
        bad = set(labels) - set(LYING_LABELS)
        if bad:
            raise ValueError(f"labels must be among {LYING_LABELS}, got {sorted(bad)}")
        if contrast == "within_prompt":
            if self.samples is None:
                raise ValueError("within-prompt rows need sampled answers (k > 0)")
            sources = [(self.samples, self.sample_labels, [i // self.k for i in range(len(self.sample_labels))])]
        elif contrast == "vs_honest":
            rng = list(range(len(self.pairs)))
            sources = [(self.honest, self.honest_labels, rng), (self.greedy, self.greedy_labels, rng)]
        else:
            raise ValueError(f"contrast must be 'within_prompt' or 'vs_honest', got {contrast!r}")
        wanted = set(labels) | ({"honest"} if contrast == "vs_honest" else set())
        dropped: Counter = Counter()
        Xs, ys, facts = [], [], []
        for g, labs, pair_of in sources:
            st = g.states[kind]
            if st.shape[1] <= step:
                raise ValueError(f"no state at the {site} site: generation stopped after {st.shape[1]} step(s)")
            idx = []
            for r, (lab, i) in enumerate(zip(labs, pair_of)):
                if not mask[i]:
                    dropped["outside pair_mask"] += 1
                elif lab not in wanted:
                    dropped["whose fact is unknown" if lab == "unknown" else f"labelled {lab} (not asked for)"] += 1
                elif step > 0 and not g.new_mask[r, step]:
                    dropped[f"whose answer stopped before the {site} site"] += 1
                else:
                    idx.append(r)
            Xs.append(st[idx, step])
            ys += [labs[r] for r in idx]
            facts += [self.pairs[pair_of[r]].fact_id for r in idx]
        self._log_dropped(contrast, site, len(ys), dropped, allow_empty)
        return torch.cat(Xs), ys, facts

    def _log_dropped(self, contrast: str, site: str, kept: int, dropped: Counter, allow_empty: bool) -> None:
        total = kept + sum(dropped.values())
        why = "; ".join(f"left out {n} of {total} rows {reason}" for reason, n in sorted(dropped.items()))
        msg = f"rows({contrast}, {site}): kept {kept} of {total} rows" + (f"; {why}" if why else "")
        if not kept and not allow_empty:
            n_known = int(self.known.sum())
            raise ValueError(
                f"no labelled rows left ({n_known} of {len(self.pairs)} facts known: a fact is known when its greedy "
                f"honest answer is the truth): {msg}; pass allow_empty=True to get empty rows instead"
            )
        # Only a drop that loses data the caller asked for is a warning; a mask or label choice is theirs.
        lost = any(r.startswith("whose") for r in dropped)
        log.log(logging.WARNING if lost else logging.INFO, msg)

    def rows(
        self,
        contrast: str = "within_prompt",
        site: str = "answer",
        kind: str = "resid_post",
        pair_mask: Sequence[bool] | None = None,
        *,
        positive: Sequence[str] = ("lie",),
        negative: Sequence[str] = ("truth_under_lie_framing",),
        allow_empty: bool = False,
    ) -> tuple[Float[Tensor, "m L d"], Float[Tensor, " m"], list[str]]:
        """Labelled rows for a probe: features ``[m, L, d]``, labels (1 = ``positive``), fact ids.

        Args:
            contrast: ``"within_prompt"``: sampled answers to the same lying prompts, ``positive``
                (default: valid ``lie`` s) vs ``negative`` (default: ``truth_under_lie_framing``),
                with no prompt-text difference; ``"vs_honest"``: greedy lying answers labelled
                ``positive`` vs greedy ``honest`` answers of known facts (``negative`` unused).
            site: ``"prompt"`` (final prompt token, ``states[:, 0]``) or ``"answer"`` (the first
                generated answer token, ``states[:, 1]``).
            pair_mask: keep only rows of pairs where it is true (e.g. one relation or format).
            positive, negative: lying labels (:data:`LYING_LABELS`) on each side; e.g.
                ``positive=("junk",)`` gives junk answers vs truths. Junk and paraphrase are on
                neither side by default: they are counted (:meth:`counts`) and left out (logged).
            allow_empty: return empty tensors rather than raise when no row is left.
        """
        if set(positive) & set(negative):
            raise ValueError(f"a label cannot be both positive and negative: {sorted(set(positive) & set(negative))}")
        labels = list(positive) + ([] if contrast == "vs_honest" else list(negative))
        X, labs, facts = self.labelled_rows(contrast, site, kind, pair_mask, labels=labels, allow_empty=allow_empty)
        y = torch.tensor([float(lab in positive) for lab in labs])
        return X, y, facts


def known_side_by_side(first_token: Bool[Tensor, " n"], greedy: OnPolicy | Bool[Tensor, " n"]) -> dict[str, int]:
    """Both definitions of "known" over the same pairs, side by side: ``first_token``
    (:attr:`mechlie.core.metrics.Behaviour.known`: the honest top-1 first token is the truth's) and the
    greedy-text one (``OnPolicy.known`` or :func:`greedy_known`'s mask: the greedy honest answer is the
    truth), with how many facts each alone counts.

    Example:
        >>> known_side_by_side(behaviour(model, pairs).known, greedy_known(model, pairs))
        {'n': 150, 'known_first_token': 79, 'known_greedy': 76, 'known_both': 75, ...}
    """
    ft = first_token.bool().cpu()
    gr = greedy.known if isinstance(greedy, OnPolicy) else greedy.bool().cpu()
    if len(ft) != len(gr):
        raise ValueError(f"first-token known has {len(ft)} entries for {len(gr)} on-policy pairs")
    return {
        "n": len(gr),
        "known_first_token": int(ft.sum()),
        "known_greedy": int(gr.sum()),
        "known_both": int((ft & gr).sum()),
        "known_first_token_only": int((ft & ~gr).sum()),
        "known_greedy_only": int((gr & ~ft).sum()),
    }


def _answer_budget(model: HookedTransformer, pairs: Sequence[ContrastPair], max_new_tokens: int) -> int:
    """``max_new_tokens`` raised to the longest truth's length (logged): a multi-token truth must fit in
    the answer, or a cut-off prefix would be judged a lie."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return max_new_tokens
    longest = max(min(len(seq) for seq in answer_sequences(tok, p.truth)) for p in pairs)
    if longest > max_new_tokens:
        log.info("max_new_tokens raised from %d to %d: the longest truth's length", max_new_tokens, longest)
    return max(longest, max_new_tokens)


def greedy_known(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    *,
    max_new_tokens: int = 4,
    batch_size: int = 16,
    answers: dict[str, list[str]] | None = None,
) -> Bool[Tensor, " n"]:
    """:attr:`OnPolicy.known` (the greedy honest answer is the truth or an alias) from the honest prompts
    alone: the same generation settings and classes as :func:`on_policy`, without its lying-prompt pass
    or kept states, for callers that only need the known mask (half the generation cost)."""
    if not pairs:
        raise PairError("no pairs to label")
    honest = generate_with_states(
        model,
        [p.honest for p in pairs],
        kinds=("resid_post",),
        layers=(model.cfg.n_layers - 1,),  # states are not read: the cheapest block to keep
        max_new_tokens=_answer_budget(model, pairs, max_new_tokens),
        stop_strings=("\n",),
        batch_size=batch_size,
    )
    valid = valid_answer_sets(pairs, answers)
    cls = [classify_answer(t, p.truth, p.aliases, valid[p.relation]) for t, p in zip(honest.texts, pairs)]
    return torch.tensor([c == "truth" for c in cls], dtype=torch.bool)


def on_policy(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    *,
    k: int = 5,
    temperature: float = 1.0,
    max_new_tokens: int = 4,
    kinds: Sequence[str] = ("resid_post",),
    layers: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    answers: dict[str, list[str]] | None = None,
) -> OnPolicy:
    """Greedy honest/lying answers and ``k`` sampled lying answers, with their states.

    Args:
        pairs: honest/lying pairs (their truth is what an answer is checked against).
        k: samples per lying prompt at ``temperature`` (0 = greedy only).
        max_new_tokens: answer length; generation also stops at a newline.
        answers: relation -> its valid answers (e.g. ``mechlie.core.corpus.relation_answers``): a lying
            answer is a ``lie`` only if it is one of them, else ``junk`` or ``paraphrase``
            (:func:`classify_answer`). Without it, each relation's pairs' own lies and truths (and a
            built-in relation's answers) are the valid set (:class:`OnPolicy`); a relation missing
            from ``answers`` falls back the same way (logged).

    Returns:
        :class:`OnPolicy`; ``.counts()`` gives the label counts per relation, ``.rows()`` the
        labelled features for a probe.

    Example:
        >>> op = on_policy(model, load_builtin("capitals", tokenizer=model.tokenizer, n=20), k=4)
        >>> op.counts()["all"]
    """
    if not pairs:
        raise PairError("no pairs to label")
    missing = sorted({p.relation for p in pairs} - set(answers or {})) if answers is not None else []
    if missing:
        log.warning("answers has no valid answers for %s: their pairs' own answers are the valid set", missing)
    if k < 0 or max_new_tokens < 2:
        raise ValueError("k must be >= 0 and max_new_tokens >= 2 (the answer-token state needs one step)")
    kw = dict(
        kinds=kinds,
        layers=layers,
        max_new_tokens=_answer_budget(model, pairs, max_new_tokens),
        stop_strings=("\n",),
        batch_size=batch_size,
        progress=progress,
    )
    honest = generate_with_states(model, [p.honest for p in pairs], **kw)
    lying = [p.lying for p in pairs]
    if not k:
        return OnPolicy(list(pairs), honest, generate_with_states(model, lying, **kw), None, 0, temperature, answers)
    # One prompt pass per lying prompt: row 0 of each group greedy, rows 1..k sampled.
    g = generate_with_states(
        model,
        lying,
        do_sample=True,
        temperature=temperature,
        seed=seed,
        n_per_prompt=k + 1,
        greedy_first=True,
        **kw,
    )
    rows = range(len(pairs) * (k + 1))
    greedy = g.take([r for r in rows if r % (k + 1) == 0])
    samples = g.take([r for r in rows if r % (k + 1) != 0])
    return OnPolicy(list(pairs), honest, greedy, samples, k, temperature, answers)
