"""On-policy lie labels: what the model actually answers, and the states it answers from.

The framing label ("this prompt asks for a lie") is not the behaviour: a small model told to lie
often tells the truth, and a prompt-framing probe can learn the prompt's text instead of "I am
lying now". Following the research notes (points 1 and 2), a lie is labelled by what the model
*does*:

==========================  ===========================================================
label                       meaning
==========================  ===========================================================
``honest``                  honest framing, fact known (answered correctly when honest)
``unknown``                 the fact is not known: the greedy honest answer is wrong
``lie``                     lying framing, fact known, answered falsely
``truth_under_lie_framing`` lying framing, fact known, answered truthfully
==========================  ===========================================================

Answers come from :func:`mechlie.core.generation.generate` (KV-cached): greedy, and ``k`` samples at
temperature ``T`` from the same lying prompt. The samples give lies *and* truths under the same
prompt, which removes the prompt-text confound. An answer is true when its text starts with the
truth (case-insensitive, whole words), so multi-token answers work.

Two definitions of "known": here a fact is known when the greedy honest *text* starts with the
truth (:attr:`OnPolicy.known`, ``n_known_greedy`` in :meth:`OnPolicy.counts`);
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

import logging
import re
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

log = logging.getLogger(__name__)

LABELS: tuple[str, ...] = ("honest", "unknown", "lie", "truth_under_lie_framing")


@dataclass(frozen=True)
class GenStates:
    tokens: Int[Tensor, "n steps"]  # generated ids (pad after a row stopped)
    new_mask: Int[Tensor, "n steps"]  # 1 = a generated token
    texts: list[str]  # decoded continuations (cut before a stop string)
    # kind -> [n, steps, L, (H,) d]; [:, s] is the state of the position that chose token s
    states: dict[str, Tensor]
    layers: tuple[int, ...]

    def take(self, idx: Sequence[int]) -> "GenStates":
        """The rows ``idx`` (e.g. the greedy rows of an ``n_per_prompt`` generation)."""
        t = torch.as_tensor(list(idx), dtype=torch.long)
        return GenStates(
            self.tokens[t],
            self.new_mask[t],
            [self.texts[i] for i in t.tolist()],
            {k: v[t] for k, v in self.states.items()},
            self.layers,
        )


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
    )


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .,:;!?\"'")


def answer_matches(generated: str, answer: str) -> bool:
    """Does ``generated`` start with ``answer`` as whole words (case-insensitive)?"""
    g, a = _norm(generated), _norm(answer)
    if not a:
        raise PairError("empty answer")
    return g == a or (g.startswith(a) and not g[len(a)].isalnum())


@dataclass(frozen=True)
class OnPolicy:
    """On-policy answers and labels for a list of pairs (``n`` pairs, ``k`` samples each)."""

    pairs: list[ContrastPair]
    honest: GenStates  # greedy answers to the honest prompts
    greedy: GenStates  # greedy answers to the lying prompts
    samples: GenStates | None  # k sampled answers per lying prompt, rows i*k .. i*k+k-1
    k: int
    temperature: float

    @property
    def known(self) -> Bool[Tensor, " n"]:
        """Known by the *greedy-text* definition: the greedy honest answer starts with the truth
        (:func:`answer_matches`). Not :attr:`mechlie.core.metrics.Behaviour.known` (first token)."""
        return torch.tensor([answer_matches(t, p.truth) for t, p in zip(self.honest.texts, self.pairs)])

    def _lying_labels(self, texts: Sequence[str], pair_idx: Sequence[int]) -> list[str]:
        known = self.known
        out = []
        for t, i in zip(texts, pair_idx):
            if not known[i]:
                out.append("unknown")
            else:
                out.append("truth_under_lie_framing" if answer_matches(t, self.pairs[i].truth) else "lie")
        return out

    @property
    def honest_labels(self) -> list[str]:
        return ["honest" if k else "unknown" for k in self.known.tolist()]

    @property
    def greedy_labels(self) -> list[str]:
        return self._lying_labels(self.greedy.texts, range(len(self.pairs)))

    @property
    def sample_labels(self) -> list[str]:
        """Labels of the sampled answers, ``n * k`` rows (pair ``i // k``)."""
        if self.samples is None:
            return []
        return self._lying_labels(self.samples.texts, [i // self.k for i in range(len(self.pairs) * self.k)])

    def counts(self) -> dict[str, dict[str, int]]:
        """Label counts per relation for honest greedy, lying greedy and lying samples, with
        ``n_known_greedy`` (= ``honest/honest``: known by the greedy-text definition)."""
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

    def rows(
        self,
        contrast: str = "within_prompt",
        site: str = "answer",
        kind: str = "resid_post",
        pair_mask: Sequence[bool] | None = None,
    ) -> tuple[Float[Tensor, "m L d"], Float[Tensor, " m"], list[str]]:
        """Labelled rows for a probe: features ``[m, L, d]``, labels (1 = lie), fact ids.

        Args:
            contrast: ``"within_prompt"``: sampled answers to the same lying prompts, ``lie`` vs
                ``truth_under_lie_framing`` (no prompt-text difference);
                ``"vs_honest"``: greedy ``lie`` answers vs greedy ``honest`` answers of known facts.
            site: ``"prompt"`` (final prompt token, ``states[:, 0]``) or ``"answer"`` (the first
                generated answer token, ``states[:, 1]``).
            pair_mask: keep only rows of pairs where it is true (e.g. one relation or format).
        """
        mask = self._mask(pair_mask)
        step = {"prompt": 0, "answer": 1}.get(site)
        if step is None:
            raise ValueError(f"site must be 'prompt' or 'answer', got {site!r}")

        def pick(g: GenStates, idx: list[int]) -> tuple[Tensor, Tensor]:
            st = g.states[kind]
            if st.shape[1] <= step:
                raise ValueError(f"no state at the {site} site: generation stopped after {st.shape[1]} step(s)")
            ok = g.new_mask[idx, step].bool() if step > 0 else torch.ones(len(idx), dtype=torch.bool)
            return st[idx, step], ok

        if contrast == "within_prompt":
            if self.samples is None:
                raise ValueError("within-prompt rows need sampled answers (k > 0)")
            labs = self.sample_labels
            idx = [i for i, lab in enumerate(labs) if lab in ("lie", "truth_under_lie_framing") and mask[i // self.k]]
            X, ok = pick(self.samples, idx)
            y = torch.tensor([float(labs[i] == "lie") for i in idx])
            facts = [self.pairs[i // self.k].fact_id for i in idx]
        elif contrast == "vs_honest":
            gl, hl = self.greedy_labels, self.honest_labels
            li = [i for i, lab in enumerate(gl) if lab == "lie" and mask[i]]
            hi = [i for i, lab in enumerate(hl) if lab == "honest" and mask[i]]
            Xl, okl = pick(self.greedy, li)
            Xh, okh = pick(self.honest, hi)
            X, ok = torch.cat([Xh, Xl]), torch.cat([okh, okl])
            y = torch.cat([torch.zeros(len(hi)), torch.ones(len(li))])
            facts = [self.pairs[i].fact_id for i in hi + li]
        else:
            raise ValueError(f"contrast must be 'within_prompt' or 'vs_honest', got {contrast!r}")
        keep = ok.nonzero().flatten().tolist()
        if len(keep) < len(facts):
            log.warning(
                "rows(%s, %s): left out %d of %d rows whose answer stopped before the %s site "
                "(no generated token to read a state from)",
                contrast,
                site,
                len(facts) - len(keep),
                len(facts),
                site,
            )
        return X[keep], y[keep], [facts[i] for i in keep]


def known_side_by_side(first_token: Bool[Tensor, " n"], op: OnPolicy) -> dict[str, int]:
    """Both definitions of "known" over the same pairs, side by side: ``first_token``
    (:attr:`mechlie.core.metrics.Behaviour.known`: the honest top-1 first token is the truth's) and
    ``op.known`` (greedy text starts with the truth), with how many facts each alone counts.

    Example:
        >>> known_side_by_side(behaviour(model, pairs).known, on_policy(model, pairs))
        {'n': 150, 'known_first_token': 79, 'known_greedy': 76, 'known_both': 75, ...}
    """
    ft, gr = first_token.bool().cpu(), op.known
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
) -> OnPolicy:
    """Greedy honest/lying answers and ``k`` sampled lying answers, with their states.

    Args:
        pairs: honest/lying pairs (their truth is what an answer is checked against).
        k: samples per lying prompt at ``temperature`` (0 = greedy only).
        max_new_tokens: answer length; generation also stops at a newline.

    Returns:
        :class:`OnPolicy`; ``.counts()`` gives the label counts per relation, ``.rows()`` the
        labelled features for a probe.

    Example:
        >>> op = on_policy(model, load_builtin("capitals", tokenizer=model.tokenizer, n=20), k=4)
        >>> op.counts()["all"]
    """
    if not pairs:
        raise PairError("no pairs to label")
    if k < 0 or max_new_tokens < 2:
        raise ValueError("k must be >= 0 and max_new_tokens >= 2 (the answer-token state needs one step)")
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        # A multi-token truth must fit in the answer, or a cut-off prefix would be judged a lie.
        longest = max(min(len(seq) for seq in answer_sequences(tok, p.truth)) for p in pairs)
        if longest > max_new_tokens:
            log.info("max_new_tokens raised from %d to %d: the longest truth's length", max_new_tokens, longest)
            max_new_tokens = longest
    kw = dict(
        kinds=kinds,
        layers=layers,
        max_new_tokens=max_new_tokens,
        stop_strings=("\n",),
        batch_size=batch_size,
        progress=progress,
    )
    honest = generate_with_states(model, [p.honest for p in pairs], **kw)
    lying = [p.lying for p in pairs]
    if not k:
        return OnPolicy(list(pairs), honest, generate_with_states(model, lying, **kw), None, 0, temperature)
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
    return OnPolicy(list(pairs), honest, greedy, samples, k, temperature)
