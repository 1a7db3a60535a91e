"""The one fit registry: every way mechlie turns honest/lying activations into a direction or a probe.

An entry (:class:`FitEntry`) has a name, a *direction fit* factory and, for a probe kind, a
*probe fitter*:

- ``FITS[name](**hyperparameters)`` is a :data:`Fit`, ``(honest[n, *c, d], lying[n, *c, d]) ->
  direction[*c, d]`` (pointing honest -> lying), used by
  :func:`mechlie.read.directions.score_directions` and its nulls;
- ``FITTERS[name]`` is the probe fitter ``(X, y, pairs, seed, **hyperparameters) -> Probe`` used by
  :func:`mechlie.read.probes.fit_probe`.

Adding a probe is one decorated function: :func:`register_probe` stores the fitter, and its
direction fit is derived from it (the fitted probe's ``direction`` on the stacked pairs), so
:func:`mechlie.read.directions.get_fit`, :func:`mechlie.read.probes.fit_probe` and
:func:`mechlie.read.probes.probe_kinds` see it. :func:`register_fit` adds a direction fit that is
not a probe. The built-in probe kinds register when :mod:`mechlie.read.probes` is imported, which
:mod:`mechlie.read.directions` (home of ``get_fit``) does.

Example:
    >>> from mechlie.read.probes import Probe
    >>> @register_probe("first_pair")
    ... def fit_first_pair(X, y, pairs=None, seed=0):
    ...     return Probe("first_pair", X[y == 1][0] - X[y == 0][0], torch.zeros(X.shape[1:-1]))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor

Fit = Callable[[Tensor, Tensor], Tensor]
"""``fit(honest[n, *c, d], lying[n, *c, d]) -> direction[*c, d]`` (pointing honest -> lying)."""

ProbeFitter = Callable[..., Any]
"""``fitter(X[n, *c, d], y[n], pairs[m, 2] | None, seed, **hyperparameters) -> Probe``."""


class ProbeError(ValueError):
    """Data a probe cannot be fitted on or applied to."""


def pair_rows(
    honest: Float[Tensor, "m *c d"], lying: Float[Tensor, "m *c d"]
) -> tuple[Float[Tensor, "n *c d"], Float[Tensor, " n"], Int[Tensor, "m 2"]]:
    """Stack honest/lying activations into ``X``, labels ``y`` (lying = 1) and ``pairs``."""
    if honest.shape != lying.shape:
        raise ProbeError(f"honest {tuple(honest.shape)} and lying {tuple(lying.shape)} shapes differ")
    m = len(honest)
    X = torch.cat([honest, lying])
    y = torch.cat([torch.zeros(m), torch.ones(m)])
    pairs = torch.stack([torch.arange(m), torch.arange(m, 2 * m)], 1)
    return X, y, pairs


def diff_of_means(honest: Float[Tensor, "n *c d"], lying: Float[Tensor, "n *c d"]) -> Float[Tensor, "*c d"]:
    """Mean lying activation minus mean honest activation (the default fit)."""
    if honest.shape[1:] != lying.shape[1:]:
        raise ValueError(f"honest {tuple(honest.shape)} and lying {tuple(lying.shape)} shapes differ")
    return lying.float().mean(0) - honest.float().mean(0)


@dataclass(frozen=True)
class FitEntry:
    """One registered fit. Calling it with hyperparameters gives its direction :data:`Fit` (the
    ``FITS[name](**hyperparameters)`` contract): ``direction(**hp)`` when given, else the probe's
    direction fitted on the stacked pairs (seed 0)."""

    name: str
    direction: Callable[..., Fit] | None = None  # (**hyperparameters) -> Fit
    probe: ProbeFitter | None = None

    def __call__(self, **hyperparameters) -> Fit:
        if self.direction is not None:
            return self.direction(**hyperparameters)
        probe, kind = self.probe, self.name

        def fit(honest: Float[Tensor, "n *c d"], lying: Float[Tensor, "n *c d"]) -> Float[Tensor, "*c d"]:
            X, y, pairs = pair_rows(honest, lying)
            return probe(X, y, pairs, 0, **hyperparameters).direction

        fit.__name__ = f"{kind}_fit"
        return fit


FITS: dict[str, FitEntry] = {}
"""The registry, by name: ``FITS[name](**hyperparameters)`` returns a :data:`Fit`; ``FITS[name].probe``
is the probe fitter of a probe kind (else ``None``)."""


class _ProbeFitters(Mapping):
    """``FITTERS[kind]``: the probe fitters of :data:`FITS`, in registration order (a live view)."""

    def __getitem__(self, kind: str) -> ProbeFitter:
        entry = FITS.get(kind)
        if entry is None or entry.probe is None:
            raise KeyError(kind)
        return entry.probe

    def __iter__(self) -> Iterator[str]:
        return (name for name, entry in FITS.items() if entry.probe is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"FITTERS({list(self)})"


FITTERS: Mapping[str, ProbeFitter] = _ProbeFitters()


def register_fit(name: str) -> Callable[[Callable[..., Fit]], Callable[..., Fit]]:
    """Decorator registering a direction-fit factory ``(**hyperparameters) -> Fit`` under ``name``.

    Example:
        >>> @register_fit("first_row")
        ... def first_row() -> Fit:
        ...     return lambda honest, lying: lying[0] - honest[0]
        >>> FITS["first_row"]()(torch.zeros(2, 3), torch.ones(2, 3)).tolist()
        [1.0, 1.0, 1.0]
    """

    def deco(factory: Callable[..., Fit]) -> Callable[..., Fit]:
        old = FITS.get(name)
        if old is not None and old.direction is not factory:
            raise ValueError(f"a fit named {name!r} is already registered")
        FITS[name] = FitEntry(name, factory)
        return factory

    return deco


def register_probe(name: str, *, direction: Fit | None = None) -> Callable[[ProbeFitter], ProbeFitter]:
    """Decorator registering a probe fitter ``(X, y, pairs, seed, **hyperparameters) -> Probe``
    under ``name``; it is then a probe kind for :func:`mechlie.read.probes.fit_probe` and a
    direction fit for :func:`mechlie.read.directions.get_fit`. ``direction``: a cheaper fit giving
    the same direction, used instead of refitting the probe (diff of means, whose null is vectorised)."""

    def deco(fitter: ProbeFitter) -> ProbeFitter:
        old = FITS.get(name)
        if old is not None and old.probe is not fitter:
            raise ValueError(f"a fit named {name!r} is already registered")
        FITS[name] = FitEntry(name, None if direction is None else (lambda: direction), fitter)
        return fitter

    return deco


__all__ = [
    "FITS",
    "FITTERS",
    "Fit",
    "FitEntry",
    "ProbeError",
    "ProbeFitter",
    "diff_of_means",
    "pair_rows",
    "register_fit",
    "register_probe",
]
