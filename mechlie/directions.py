"""Difference-of-means directions (honest -> lying), fact-level splits, and held-out AUROC.

A direction is ``mean(lying) - mean(honest)`` over the training facts, for every component at
once: tensors of shape ``[n, *component, d]`` give directions of shape ``[*component, d]``, so
one call scores every layer (``resid_*``: component = ``[L]``) or every head (``head_out`` / ``z``:
component = ``[L, H]``).

Scoring: project the held-out facts' activations onto the direction and compute the AUROC of
"lying" vs "honest" (0.5 = chance, 1 = perfect, < 0.5 = reversed). Every AUROC comes with two
controls computed the same way on the same split:

- ``auroc_shuffled``: the direction refit on training data whose honest/lying labels are permuted
  (pooled, then randomly reassigned), which catches leakage and label bugs;
- ``auroc_random``: a random Gaussian direction, which shows how separable the two framings are
  without learning anything (honest and lying prompts differ in text, so this can be far from 0.5).

Splits are made by ``fact_id``: both prompts of a fact, and every pair sharing a fact, land on the
same side.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechlie.stats import auroc  # noqa: F401  (re-exported: directions.auroc is stats.auroc)


@dataclass(frozen=True)
class Direction:
    vector: Float[Tensor, " d"]
    hook_name: str  # where it is read, e.g. "blocks.12.hook_resid_post"
    method: str = "diff_of_means"
    head: int | None = None  # for a per-head direction, the head whose output it lives in


@dataclass(frozen=True)
class Split:
    train: list[int]
    test: list[int]


def split_by_fact(fact_ids: Sequence[str], test_frac: float = 0.3, seed: int = 0) -> Split:
    """Indices into ``fact_ids`` split so that no fact appears on both sides."""
    if not 0 < test_frac < 1:
        raise ValueError("test_frac must be in (0, 1)")
    facts = sorted(set(fact_ids))
    if len(facts) < 2:
        raise ValueError(f"need at least 2 distinct facts to split, got {len(facts)}")
    random.Random(seed).shuffle(facts)
    n_test = min(max(1, round(test_frac * len(facts))), len(facts) - 1)
    test_facts = set(facts[:n_test])
    test = [i for i, f in enumerate(fact_ids) if f in test_facts]
    train = [i for i, f in enumerate(fact_ids) if f not in test_facts]
    return Split(train, test)


Fit = Callable[[Tensor, Tensor], Tensor]
"""``fit(honest[n, *c, d], lying[n, *c, d]) -> direction[*c, d]`` (pointing honest -> lying)."""

FITS: dict[str, Callable[..., Fit]] = {}
"""Registered fit factories by name: ``FITS[name](**hyperparameters)`` returns a ``Fit``."""


def register_fit(name: str) -> Callable[[Callable[..., Fit]], Callable[..., Fit]]:
    """Decorator registering a factory ``(**hyperparameters) -> Fit`` under ``name``.

    Example:
        >>> @register_fit("first_row")
        ... def first_row() -> Fit:
        ...     return lambda honest, lying: lying[0] - honest[0]
        >>> get_fit("first_row")(torch.zeros(2, 3), torch.ones(2, 3)).tolist()
        [1.0, 1.0, 1.0]
    """

    def deco(factory: Callable[..., Fit]) -> Callable[..., Fit]:
        if name in FITS and FITS[name] is not factory:
            raise ValueError(f"a fit named {name!r} is already registered")
        FITS[name] = factory
        return factory

    return deco


def get_fit(fit: str | Fit, **hyperparameters) -> Fit:
    """The ``Fit`` registered under ``fit`` (built with ``hyperparameters``), or ``fit`` itself if callable."""
    if callable(fit):
        if hyperparameters:
            raise ValueError("hyperparameters only apply to a registered fit name")
        return fit
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}; registered: {sorted(FITS)}")
    return FITS[fit](**hyperparameters)


def diff_of_means(honest: Float[Tensor, "n *c d"], lying: Float[Tensor, "n *c d"]) -> Float[Tensor, "*c d"]:
    """Mean lying activation minus mean honest activation (the default fit)."""
    if honest.shape[1:] != lying.shape[1:]:
        raise ValueError(f"honest {tuple(honest.shape)} and lying {tuple(lying.shape)} shapes differ")
    return lying.float().mean(0) - honest.float().mean(0)


@register_fit("diff_of_means")
def _diff_of_means_factory() -> Fit:
    return diff_of_means


def project(acts: Float[Tensor, "n *c d"], direction: Float[Tensor, "*c d"]) -> Float[Tensor, "n *c"]:
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (acts.float() * unit).sum(-1)


@dataclass(frozen=True)
class DirectionScores:
    direction: Float[Tensor, "*c d"]  # fitted on the training facts
    auroc: Float[Tensor, "*c"]  # held out
    auroc_shuffled: Float[Tensor, "*c"]
    auroc_random: Float[Tensor, "*c"]
    train_auroc: Float[Tensor, "*c"]


def score_directions(
    honest: Float[Tensor, "n *c d"],
    lying: Float[Tensor, "n *c d"],
    split: Split,
    seed: int = 0,
) -> DirectionScores:
    """Fit diff-of-means on ``split.train`` and score it (and its controls) on ``split.test``.

    Row ``i`` of ``honest`` and of ``lying`` are the two prompts of pair ``i``.
    """
    if honest.shape != lying.shape:
        raise ValueError(f"honest {tuple(honest.shape)} and lying {tuple(lying.shape)} must match")
    if set(split.train) & set(split.test):
        raise ValueError("train and test share rows")
    tr, te = torch.tensor(split.train), torch.tensor(split.test)
    h_tr, l_tr, h_te, l_te = honest[tr], lying[tr], honest[te], lying[te]
    direction = diff_of_means(h_tr, l_tr)

    def held_out(d: Tensor) -> Tensor:
        return auroc(project(l_te, d), project(h_te, d))

    gen = torch.Generator().manual_seed(seed)
    pooled = torch.cat([h_tr, l_tr])
    perm = torch.randperm(len(pooled), generator=gen)
    fake_h, fake_l = pooled[perm[: len(h_tr)]], pooled[perm[len(h_tr) :]]
    random_dir = torch.randn(direction.shape, generator=gen)
    return DirectionScores(
        direction=direction,
        auroc=held_out(direction),
        auroc_shuffled=held_out(diff_of_means(fake_h, fake_l)),
        auroc_random=held_out(random_dir),
        train_auroc=auroc(project(l_tr, direction), project(h_tr, direction)),
    )
