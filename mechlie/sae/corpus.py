"""The offline corpus SAEs are trained on, and a site's activations over text.

:func:`build_corpus`: for models without a published SAE (the embedded ones), a small corpus that
needs no download: the built-in pair prompts of every format, ``mechlie/data/neutral.txt``, and the
model's own samples. The SAE is unsupervised: it never sees which prompt is the lying one.

Held-out facts stay held out: ``exclude_facts`` (a study passes every fact it analyses) are never
drawn for the pair prompts nor used to start a sample, and any line that still holds one of their
question texts (a sample that wandered into one) is dropped; :attr:`Corpus.excluded` counts both.
Before issue 22 the pair prompts were drawn with no such rule, and 40 of the 120 facts the SAE study
analyses had their prompts in the corpus.

Positions: SAEs are trained on every position of the corpus except each line's first token
(position 0 is the attention sink, whose norm is far larger than any other, as Gao et al. 2024
also exclude): :func:`collect_sites`. The decomposition of the lie direction reads the final
prompt token (offset ``-1``): :func:`final_acts_at`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Collection, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.core.pairs import FORMATS, RELATIONS, load_builtin, neutral_lines, tokenize
from mechlie.sae.loading import Site

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """Lines of text to train an SAE on, each with where it came from."""

    texts: tuple[str, ...]
    sources: tuple[str, ...]  # "pairs", "neutral" or "samples", one per text
    # (reason, count) of what was kept out to keep analysed facts held out (see the module docstring)
    excluded: tuple[tuple[str, int], ...] = ()

    def counts(self) -> dict[str, int]:
        return {s: self.sources.count(s) for s in sorted(set(self.sources))}

    def split(self, eval_frac: float, seed: int) -> tuple[list[int], list[int]]:
        """(train, eval) line indices; eval lines are never trained on."""
        idx = list(range(len(self.texts)))
        random.Random(seed).shuffle(idx)
        n_eval = max(1, round(eval_frac * len(idx)))
        return sorted(idx[n_eval:]), sorted(idx[:n_eval])


def _pair_lines(
    model: HookedTransformer, pairs_per_format: int, seed: int, exclude: Collection[str]
) -> tuple[list[str], list[str], set[str], int]:
    """The pair prompts of the corpus (honest and lying prompt of ``pairs_per_format`` facts per
    relation and format, drawn seeded among the facts not in ``exclude``), the kept facts'
    questions, the excluded facts' questions, and how many prompts of excluded facts were passed over."""
    texts, questions, banned = [], [], set()
    n_passed = 0
    for fmt in FORMATS:
        pool = load_builtin("all", fmt, tokenizer=model.tokenizer, seed=seed)
        for rel in RELATIONS:
            of_rel = [p for p in pool if p.relation == rel]
            kept = [p for p in of_rel if p.fact_id not in exclude]
            banned |= {p.question for p in of_rel if p.fact_id in exclude and p.question}
            n_passed += 2 * (len(of_rel) - len(kept))
            if pairs_per_format and pairs_per_format < len(kept):
                idx = sorted(random.Random(f"{seed}/corpus/{fmt}/{rel}").sample(range(len(kept)), pairs_per_format))
                kept = [kept[i] for i in idx]
            for p in kept:
                texts += [p.honest, p.lying]
                if p.question:
                    questions.append(f"Q: {p.question}\nA:")
    return texts, questions, banned, n_passed


def build_corpus(
    model: HookedTransformer,
    *,
    pairs_per_format: int = 10,
    n_samples: int = 32,
    sample_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 16,
    exclude_facts: Collection[str] = (),
) -> Corpus:
    """An offline corpus: built-in pair prompts, neutral text, and the model's own samples.

    The pair prompts are the honest and the lying prompt of ``pairs_per_format`` facts per
    relation and format (0 = every fact), drawn among the facts not in ``exclude_facts``. The
    samples are sampled (temperature 1, seeded) from the first four words of each neutral line and
    of the kept pairs' questions. A line holding the question of an excluded fact is dropped. The
    SAE is unsupervised: it never sees which prompt is the lying one.
    """
    from mechlie.core.generation import generate

    exclude = set(exclude_facts)
    texts, questions, banned, n_passed = _pair_lines(model, pairs_per_format, seed, exclude)
    sources = ["pairs"] * len(texts)
    neutral = neutral_lines()
    texts += neutral
    sources += ["neutral"] * len(neutral)
    if n_samples > 0:
        starts = [" ".join(line.split()[:4]) for line in neutral] + sorted(set(questions))
        rng = random.Random(seed)
        starts = [rng.choice(starts) for _ in range(n_samples)]
        # One batch of up to 32 rows: each cached step costs about the same for 16 or 32 rows on a CPU.
        gen_batch = max(batch_size, 32)
        for i in tqdm(range(0, n_samples, gen_batch), desc="model samples", leave=False):
            out = generate(
                model,
                starts[i : i + gen_batch],
                max_new_tokens=sample_tokens,
                do_sample=True,
                seed=seed + i,
                eos_token_id=None,
            )
            texts += [s + t for s, t in zip(starts[i : i + gen_batch], out.texts)]
            sources += ["samples"] * len(out.texts)
    clean = [not any(q in t for q in banned) for t in texts]
    # A line longer than the context cannot be run whole; it is left out (and said so).
    bos = int(bool(model.cfg.default_prepend_bos))  # tokenize() adds at most one BOS
    fits = [len(model.tokenizer.encode(t, add_special_tokens=False)) + bos <= model.cfg.n_ctx for t in texts]
    excluded = (
        ("analysed facts", len(exclude)),
        ("their pair prompts passed over", n_passed),
        ("lines holding an analysed question, dropped", clean.count(False)),
        ("lines longer than the context, dropped", sum(c and not f for c, f in zip(clean, fits))),
    )
    if exclude or not all(fits):
        log.info("corpus: %s", ", ".join(f"{n} {why}" for why, n in excluded))
    keep = [c and f for c, f in zip(clean, fits)]
    return Corpus(tuple(t for t, k in zip(texts, keep) if k), tuple(s for s, k in zip(sources, keep) if k), excluded)


@dataclass(frozen=True)
class SiteActs:
    """A site's activations at the kept tokens of some lines, one row a token."""

    acts: Float[Tensor, "tok d_in"]
    line: Int[Tensor, " tok"]  # corpus line of each token
    pos: Int[Tensor, " tok"]  # its position in the line (0 = first token)


def _stop_layer(site: Site) -> int:
    return site.layer + 1  # blocks 0..layer run; every blocks.<layer>.* hook has fired


@torch.no_grad()
def collect_sites(
    model: HookedTransformer,
    texts: Sequence[str],
    sites: Sequence[Site],
    *,
    batch_size: int = 16,
    skip_first: int = 1,
    progress: bool = True,
) -> dict[Site, SiteActs]:
    """Each site's activation at every real token of ``texts`` but the first ``skip_first``, all
    sites from one pass (run only up to the last block any site needs); a site named twice is read once."""
    sites = list(dict.fromkeys(sites))
    for site in sites:
        site.validate(model)
    acts: dict[Site, list[Tensor]] = {s_: [] for s_ in sites}
    lines, poss = [], []
    for i in tqdm(range(0, len(texts), batch_size), desc="corpus activations", disable=not progress, leave=False):
        b = tokenize(model, list(texts[i : i + batch_size]))
        kept: dict[Site, Tensor] = {}
        hooks = [
            (s_.hook_name, lambda a, hook, s_=s_: kept.__setitem__(s_, s_.read(a).detach().float().cpu()))
            for s_ in sites
        ]
        with model.hooks(fwd_hooks=hooks):
            model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=max(_stop_layer(s_) for s_ in sites))
        mask = b.attention_mask.cpu().bool()
        pos = mask.long().cumsum(-1) - 1  # position within each (left-padded) line
        keep = mask & (pos >= skip_first)
        for s_ in sites:
            acts[s_].append(kept[s_][keep])
        poss.append(pos[keep])
        lines.append((torch.arange(len(mask))[:, None].expand_as(mask) + i)[keep])
    line, pos = torch.cat(lines), torch.cat(poss)
    return {s_: SiteActs(torch.cat(a), line, pos) for s_, a in acts.items()}


def collect_site(
    model: HookedTransformer,
    texts: Sequence[str],
    site: Site,
    *,
    batch_size: int = 16,
    skip_first: int = 1,
    progress: bool = True,
) -> SiteActs:
    """:func:`collect_sites` for one site."""
    return collect_sites(model, texts, [site], batch_size=batch_size, skip_first=skip_first, progress=progress)[site]


@torch.no_grad()
def final_acts_at(
    model: HookedTransformer, prompts: Sequence[str], sites: Sequence[Site], *, batch_size: int = 16
) -> dict[Site, Tensor]:
    """Each site's activation ``[n, d_in]`` at each prompt's final token, all sites in one pass."""
    sites = list(dict.fromkeys(sites))
    for site in sites:
        site.validate(model)
    out: dict[Site, list[Tensor]] = {s_: [] for s_ in sites}
    for i in range(0, len(prompts), batch_size):
        b = tokenize(model, list(prompts[i : i + batch_size]))
        hooks = [(s_.hook_name, lambda a, hook, s_=s_: out[s_].append(s_.read(a)[:, -1].float().cpu())) for s_ in sites]
        with model.hooks(fwd_hooks=hooks):
            model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=max(_stop_layer(s_) for s_ in sites))
    return {s_: torch.cat(v) for s_, v in out.items()}


def final_acts(
    model: HookedTransformer, prompts: Sequence[str], site: Site, *, batch_size: int = 16
) -> Float[Tensor, "n d_in"]:
    """The site's activation at each prompt's final token."""
    return final_acts_at(model, prompts, [site], batch_size=batch_size)[site]
