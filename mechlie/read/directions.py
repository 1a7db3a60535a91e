"""Directions (honest -> lying) from pluggable fits, fact-level splits, and held-out AUROC.

A *fit* maps training activations to a direction for every component at once: tensors of shape
``[n, *component, d]`` give directions of shape ``[*component, d]``, so one call scores every
layer (``resid_*``: component = ``[L]``) or every head (``head_out`` / ``z``: component =
``[L, H]``). Fits live in the one registry of :mod:`mechlie.read.fits` (``FITS``, ``register_fit``,
``get_fit``, re-exported here); the default, ``diff_of_means``, is ``mean(lying) - mean(honest)``
over the training facts. Every probe kind of :mod:`mechlie.read.probes` is registered there too,
so ``score_directions(..., fit="logistic")`` scores it, and its nulls, the same way.

Scoring (``score_directions``): project the held-out facts' activations onto the direction and
compute the AUROC of "lying" vs "honest" (0.5 = chance, 1 = perfect, < 0.5 = reversed), with a
95% percentile-bootstrap CI over the held-out *facts* (``stats.bootstrap_tensor``). Two controls,
each from many draws, computed on the same split:

- the permutation null: in each of ``n_perm`` draws the honest/lying labels are swapped within a
  random half of the pairs (``stats.paired_swap_masks``), on the training pairs *and* on the
  held-out pairs; the direction is refit with the *same* fit and scored on the swapped held-out
  labels. Under "the direction carries no honest/lying information" the learned AUROC is one more
  draw of this distribution.
- random directions: ``n_random`` Gaussian directions per component scored on the real labels.
  Honest and lying prompts differ in text, so random directions can separate them well; a learned
  direction that does no better than the random bar has learned nothing beyond "the prompts differ".

Each control gives two bars, and both are reported:

- the **per-component bar** (``null_q95``, ``random_q95``): the 95th percentile of that
  component's own draws. "Does *this* component beat its own null?" It is uncorrected for the
  number of components: under the null about 5% of components pass it by chance.
- the **max bar** (``null_bar``, ``random_bar``, ``stats.max_null_threshold``): the 95th percentile
  over draws of the maximum over components (family-wise 5%). "Does the *best* component beat
  chance?" Applied to every component it is far stricter than each one's own bar (it is the bar
  for the best of many), so a count of components above it is a conservative count.

A component's per-component bar is never above the max bar (in every draw the component's value
is at most the maximum), and for components whose nulls are alike it is well below it.

What the label-swap null tests: only that the honest and the lying prompts' activations differ at
all. With framing labels the two prompts differ in their text (the few-shot demonstrations' true
or false answers), so passing it says a component encodes which prompt it saw, not that it
encodes lying.

For the default diff-of-means fit the null is vectorised: a null direction is the mean of
sign-flipped pair differences, one matrix product over a ``[n_perm, n_train]`` sign matrix.
Any other fit is refit once per draw.

Splits are made by ``fact_id``: both prompts of a fact, and every pair sharing a fact, land on the
same side.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechlie.core import stats
from mechlie.core.stats import auroc  # noqa: F401  (re-exported: directions.auroc is stats.auroc)
from mechlie.read import probes  # noqa: F401  (its @register_probe fitters fill the registry get_fit reads)
from mechlie.read.fits import FITS, Fit, diff_of_means, register_fit  # noqa: F401  (re-exported)


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
    fact_ids: Sequence[str] | None = None  # per row; held-out CIs resample facts (else rows)


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
    return Split(train, test, list(fact_ids))


def get_fit(fit: str | Fit, **hyperparameters) -> Fit:
    """The ``Fit`` registered under ``fit`` (built with ``hyperparameters``), or ``fit`` itself if callable."""
    if callable(fit):
        if hyperparameters:
            raise ValueError("hyperparameters only apply to a registered fit name")
        return fit
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}; registered: {sorted(FITS)}")
    return FITS[fit](**hyperparameters)


def project(acts: Float[Tensor, "n *c d"], direction: Float[Tensor, "*c d"]) -> Float[Tensor, " n *c"]:
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (acts.float() * unit).sum(-1)


@dataclass(frozen=True)
class DirectionScores:
    """Held-out scores of a fitted direction per component, with CIs and many-draw controls."""

    direction: Float[Tensor, "*c d"]  # fitted on the training facts
    auroc: Float[Tensor, "*c"]  # held out
    auroc_lo: Float[Tensor, "*c"]  # 95% bootstrap CI over held-out facts
    auroc_hi: Float[Tensor, "*c"]
    train_auroc: Float[Tensor, "*c"]
    null_auroc: Float[Tensor, " perm *c"]  # within-pair label swaps (train and test), same fit
    random_auroc: Float[Tensor, " rand *c"]  # Gaussian directions, real labels
    null_bar: float  # 95th percentile over draws of the max over components of null_auroc (the best's bar)
    random_bar: float  # the same for random_auroc; per-component bars: null_q95, random_q95
    n_test_facts: int
    n_test: int  # held-out pairs
    fit: str = "diff_of_means"

    @property
    def null_mean(self) -> Float[Tensor, "*c"]:
        return self.null_auroc.mean(0)

    @property
    def null_q95(self) -> Float[Tensor, "*c"]:
        """Per-component 95th percentile of the null (uncorrected for the choice of component)."""
        return torch.quantile(self.null_auroc, 0.95, dim=0)

    @property
    def random_mean(self) -> Float[Tensor, "*c"]:
        return self.random_auroc.mean(0)

    @property
    def random_q95(self) -> Float[Tensor, "*c"]:
        """Per-component 95th percentile of the random directions (uncorrected for the choice of component)."""
        return torch.quantile(self.random_auroc, 0.95, dim=0)

    @property
    def beats_null(self) -> Tensor:
        """Components whose held-out AUROC exceeds the max-over-components null bar."""
        return self.auroc > self.null_bar

    @property
    def beats_random(self) -> Tensor:
        """Components whose held-out AUROC exceeds the max-over-components random-direction bar."""
        return self.auroc > self.random_bar

    @property
    def beats_null_own(self) -> Tensor:
        """Components whose held-out AUROC exceeds their own label-swap null's 95th percentile."""
        return self.auroc > self.null_q95

    @property
    def beats_random_own(self) -> Tensor:
        """Components whose held-out AUROC exceeds their own random directions' 95th percentile."""
        return self.auroc > self.random_q95

    def summary(self) -> dict:
        """JSON-ready numbers: the best component against the max bars, and how many components pass
        the max bar (``n_pass``) and their own per-component bar (``n_pass_own``)."""
        best = int(self.auroc.flatten().argmax())
        idx = list(torch.unravel_index(torch.tensor(best), self.auroc.shape)) if self.auroc.ndim else []
        at = tuple(int(i) for i in idx)
        return {
            "fit": self.fit,
            "n_test_pairs": self.n_test,
            "n_test_facts": self.n_test_facts,
            "n_components": int(self.auroc.numel()),
            "max": {
                "auroc": float(self.auroc[at]),
                "lo": float(self.auroc_lo[at]),
                "hi": float(self.auroc_hi[at]),
                "component": list(at),
            },
            "mean": float(self.auroc.mean()),
            "null": {
                "n_draws": int(self.null_auroc.shape[0]),
                "mean": float(self.null_auroc.mean()),
                "max_bar_95": self.null_bar,
                "n_pass": int(self.beats_null.sum()),
                "own_q95_range": [float(self.null_q95.min()), float(self.null_q95.max())],
                "n_pass_own": int(self.beats_null_own.sum()),
            },
            "random": {
                "n_draws": int(self.random_auroc.shape[0]),
                "mean": float(self.random_auroc.mean()),
                "max_bar_95": self.random_bar,
                "n_pass": int(self.beats_random.sum()),
                "own_q95_range": [float(self.random_q95.min()), float(self.random_q95.max())],
                "n_pass_own": int(self.beats_random_own.sum()),
            },
        }

    def to_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """Tensors and JSON metadata, for ``mechlie.core.io.save_tensors``."""
        tensors = {
            k: getattr(self, k)
            for k in ("direction", "auroc", "auroc_lo", "auroc_hi", "train_auroc", "null_auroc", "random_auroc")
        }
        meta = {k: getattr(self, k) for k in ("null_bar", "random_bar", "n_test_facts", "n_test", "fit")}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict) -> "DirectionScores":
        return cls(**tensors, **meta)


def _unit(d: Tensor) -> Tensor:
    return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def null_directions(
    honest: Float[Tensor, "n *c d"],
    lying: Float[Tensor, "n *c d"],
    swaps: Tensor,
    fit: str | Fit = "diff_of_means",
) -> Float[Tensor, "perm *c d"]:
    """The fit refit on each draw of within-pair label swaps (``swaps[perm, n]``, True = swap).

    Diff of means is linear in the pair differences, so its null directions are one matrix
    product: ``mean_i s_i (lying_i - honest_i)`` with signs ``s = 1 - 2 swap``.
    """
    fit_fn = get_fit(fit)
    if swaps.shape[1] != len(honest):
        raise ValueError(f"swaps has {swaps.shape[1]} columns for {len(honest)} pairs")
    if fit_fn is diff_of_means:
        signs = 1.0 - 2.0 * swaps.float()  # [P, n]
        diffs = (lying.float() - honest.float()).reshape(len(honest), -1)
        return (signs @ diffs / len(honest)).reshape(len(swaps), *honest.shape[1:])
    out = []
    for m in swaps:
        w = m.reshape(-1, *([1] * (honest.ndim - 1)))
        out.append(fit_fn(torch.where(w, lying, honest), torch.where(w, honest, lying)).float())
    return torch.stack(out)


def _held_out_ci(
    proj_h: Tensor, proj_l: Tensor, split: Split, n_boot: int, seed: int
) -> tuple[stats.TensorEstimate, int]:
    """95% CI of the held-out AUROC over held-out *facts* (every pair of a resampled fact comes
    along: pairs sharing a fact are not independent), and the number of held-out facts."""
    facts = [split.fact_ids[i] for i in split.test] if split.fact_ids is not None else list(range(len(split.test)))
    order = sorted(set(facts), key=facts.index)
    rows = [torch.tensor([j for j, f in enumerate(facts) if f == u]) for u in order]
    if all(len(r) == 1 for r in rows):

        def held_out_auroc_batched(idx: Tensor) -> Tensor:
            # one pair per fact: a block of resamples [b, n] at once, the sample axis first for auroc
            r = torch.cat(rows)[idx]
            return auroc(proj_l[r].movedim(1, 0), proj_h[r].movedim(1, 0))

        ci = stats.bootstrap_tensor(held_out_auroc_batched, len(rows), n_boot=n_boot, seed=seed, batched=True)
        return ci, len(rows)

    def held_out_auroc(idx: Tensor) -> Tensor:
        r = torch.cat([rows[i] for i in idx.tolist()])
        return auroc(proj_l[r], proj_h[r])

    return stats.bootstrap_tensor(held_out_auroc, len(rows), n_boot=n_boot, seed=seed), len(rows)


def _control_aurocs(
    h_tr: Tensor,
    l_tr: Tensor,
    h_te: Tensor,
    l_te: Tensor,
    direction: Tensor,
    fit_fn: Fit,
    n_perm: int,
    n_random: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Held-out AUROCs of the two controls: ``[n_perm, *c]`` for the fit refit on within-pair label
    swaps (swapped on the held-out pairs too), ``[n_random, *c]`` for Gaussian directions."""
    c_shape, d = direction.shape[:-1], direction.shape[-1]
    n_te = len(h_te)

    def scores(dirs: Tensor, swap_te: Tensor | None) -> Tensor:
        """Held-out AUROC of ``dirs[k, *c, d]``; ``swap_te[k, n_te]`` swaps test labels per draw."""
        u = _unit(dirs).reshape(len(dirs), -1, d)  # [k, C, d]
        ph = torch.einsum("ncd,kcd->nkc", h_te.reshape(n_te, -1, d), u)
        pl = torch.einsum("ncd,kcd->nkc", l_te.reshape(n_te, -1, d), u)
        if swap_te is not None:
            w = swap_te.T.unsqueeze(-1)  # [n_te, k, 1]
            ph, pl = torch.where(w, pl, ph), torch.where(w, ph, pl)
        return auroc(pl, ph).reshape(len(dirs), *c_shape)

    null_chunks, rand_chunks = [], []
    # Chunks bound the memory: a draw's directions are [*c, d] (155k floats for 270 heads).
    chunk = 50
    swap_tr = stats.paired_swap_masks(len(h_tr), n_perm, seed)
    swap_te = stats.paired_swap_masks(n_te, n_perm, seed + 1)
    for k in range(0, n_perm, chunk):
        dirs = null_directions(h_tr, l_tr, swap_tr[k : k + chunk], fit_fn)
        null_chunks.append(scores(dirs, swap_te[k : k + chunk]))
    g = torch.Generator().manual_seed(seed)
    for k in range(0, n_random, chunk):
        m = min(chunk, n_random - k)
        rand_chunks.append(scores(torch.randn(m, *direction.shape, generator=g), None))
    return torch.cat(null_chunks), torch.cat(rand_chunks)


def score_directions(
    honest: Float[Tensor, "n *c d"],
    lying: Float[Tensor, "n *c d"],
    split: Split,
    *,
    fit: str | Fit = "diff_of_means",
    n_perm: int = 200,
    n_random: int = 200,
    n_boot: int = 1000,
    seed: int = 0,
) -> DirectionScores:
    """Fit a direction on ``split.train`` and score it, its CI and its controls on ``split.test``.

    Args:
        honest, lying: activations; row ``i`` of each holds the two prompts of pair ``i``.
        split: train/test rows (from ``split_by_fact``; its ``fact_ids`` make the CI resample facts).
        fit: a registered fit name (``FITS``) or a ``Fit``; the null refits with the same one.
        n_perm: draws of the within-pair label-swap null.
        n_random: random Gaussian directions.
        n_boot: bootstrap resamples of the held-out facts.
        seed: seeds the swaps, the random directions and the bootstrap.

    Returns:
        ``DirectionScores`` (see its fields; ``summary()`` gives the JSON numbers).

    Example:
        >>> h, l = torch.randn(40, 3, 8), torch.randn(40, 3, 8) + 1.0
        >>> s = score_directions(h, l, split_by_fact([f"f{i}" for i in range(40)]), n_perm=50)
        >>> bool((s.auroc > s.null_bar).all())
        True
    """
    if honest.shape != lying.shape:
        raise ValueError(f"honest {tuple(honest.shape)} and lying {tuple(lying.shape)} must match")
    if set(split.train) & set(split.test):
        raise ValueError("train and test share rows")
    if not split.train or not split.test:
        raise ValueError("train and test must both be non-empty")
    if n_perm < 1 or n_random < 1:
        raise ValueError("n_perm and n_random must be >= 1")
    fit_fn = get_fit(fit)
    fit_name = fit if isinstance(fit, str) else getattr(fit, "__name__", "custom")
    tr, te = torch.tensor(split.train), torch.tensor(split.test)
    h_tr, l_tr, h_te, l_te = honest[tr].float(), lying[tr].float(), honest[te].float(), lying[te].float()
    direction = fit_fn(h_tr, l_tr).float()

    proj_h, proj_l = project(h_te, direction), project(l_te, direction)
    ci, n_test_facts = _held_out_ci(proj_h, proj_l, split, n_boot, seed)
    null_auroc, random_auroc = _control_aurocs(h_tr, l_tr, h_te, l_te, direction, fit_fn, n_perm, n_random, seed)
    return DirectionScores(
        direction=direction,
        auroc=auroc(proj_l, proj_h),
        auroc_lo=ci.lo,
        auroc_hi=ci.hi,
        train_auroc=auroc(project(l_tr, direction), project(h_tr, direction)),
        null_auroc=null_auroc,
        random_auroc=random_auroc,
        null_bar=stats.max_null_threshold(null_auroc),
        random_bar=stats.max_null_threshold(random_auroc),
        n_test_facts=n_test_facts,
        n_test=len(te),
        fit=fit_name,
    )


NEAR = 0.01  # AUROC gap below which two components are reported as practically equal


@dataclass(frozen=True)
class SeedScores:
    """Held-out AUROC of every component on several splits by fact (each split fits its own
    directions on its training facts): how far "the best component" rests on one split.

    The interval is the 95% t-interval of the mean over split seeds (``mean ± t * sd / sqrt(n)``).
    The splits share facts, so it measures split-to-split variation of the mean (which facts happen
    to be held out), not sampling variation over independent sets of facts; the per-split CIs over
    held-out facts are wider.
    """

    seeds: tuple[int, ...]
    auroc: Float[Tensor, " seed *c"]
    fit: str = "diff_of_means"
    test_frac: float = 0.3

    @property
    def mean(self) -> Float[Tensor, "*c"]:
        return self.auroc.mean(0)

    @property
    def sd(self) -> Float[Tensor, "*c"]:
        return self.auroc.std(0) if len(self.seeds) > 1 else torch.zeros_like(self.mean)

    def interval(self) -> tuple[Tensor, Tensor]:
        """(lo, hi): the 95% t-interval of the mean over seeds, per component."""
        from scipy.stats import t

        n = len(self.seeds)
        half = float(t.ppf(0.975, n - 1)) * self.sd / n**0.5 if n > 1 else torch.zeros_like(self.mean)
        return self.mean - half, self.mean + half

    @property
    def chosen(self) -> int:
        """The flat index of the component with the highest mean (ties: the first)."""
        return int(self.mean.flatten().argmax())

    def paired_interval(self) -> tuple[Tensor, Tensor]:
        """(lo, hi) per component: the 95% t-interval over seeds of (chosen - component), the paired
        difference on the same splits (sharper than comparing two intervals, and still meaningful
        where the chosen one sits at the ceiling with zero spread)."""
        from scipy.stats import t

        a = self.auroc.reshape(len(self.seeds), -1)
        d = a[:, self.chosen : self.chosen + 1] - a
        n = len(self.seeds)
        sd = d.std(0) if n > 1 else torch.zeros(d.shape[1])
        half = float(t.ppf(0.975, n - 1)) * sd / n**0.5 if n > 1 else torch.zeros(d.shape[1])
        return d.mean(0) - half, d.mean(0) + half

    def summary(self) -> dict:
        """Per component (flat order): mean, SD, CI, and the share of seeds where it is the best
        (ties count for every tied component); the chosen one, the components whose CI overlaps the
        chosen one's, and those it does not beat on the same splits (paired CI of the difference
        reaches 0): the choice is noise-level among them."""
        lo, hi = (x.flatten() for x in self.interval())
        m = self.mean.flatten()
        c = self.chosen
        overlap = [j for j in range(len(m)) if j != c and bool(lo[c] <= hi[j])]
        plo, _ = self.paired_interval()
        tied = [j for j in range(len(m)) if j != c and bool(plo[j] <= 0)]
        a = self.auroc.reshape(len(self.seeds), -1)
        share = (a >= a.max(1, keepdim=True).values - 1e-9).float().mean(0)
        rivals = sorted(set(overlap) | set(tied))
        names = ", ".join(map(str, rivals[:12])) + (", ..." if len(rivals) > 12 else "")
        head = f"component {c} has the highest mean AUROC ({m[c]:.3f} [{lo[c]:.3f}, {hi[c]:.3f}])"
        if rivals:
            many = len(rivals) > 1
            verdict = (
                f"{head}, but {len(rivals)} other{'s' if many else ''} ({names}) {'overlap' if many else 'overlaps'} "
                f"its CI or {'are' if many else 'is'} not beaten by it on the same splits: the choice is noise-level "
                "among them"
            )
        else:
            verdict = f"{head} and beats every other on the same splits: the choice is not noise-level"
        close = [j for j in range(len(m)) if j != c and bool(m[c] - m[j] <= NEAR)]
        if close:
            verdict += (
                f"; {len(close)} other{'s' if len(close) > 1 else ''} ({', '.join(map(str, close[:12]))}) "
                f"{'are' if len(close) > 1 else 'is'} within {NEAR} AUROC of it, a difference too small to matter"
            )
        return {
            "fit": self.fit,
            "seeds": list(self.seeds),
            "test_frac": self.test_frac,
            "interval": "95% t-interval of the mean over split seeds (the splits share facts)",
            "mean": m.tolist(),
            "sd": self.sd.flatten().tolist(),
            "lo": lo.tolist(),
            "hi": hi.tolist(),
            "best_share": share.tolist(),
            "chosen": c,
            "chosen_best_share": float(share[c]),
            "overlapping": overlap,
            "not_beaten": tied,
            "within_0.01": close,
            "noise_level": bool(rivals),
            "verdict": verdict,
        }


def scores_over_seeds(
    honest: Float[Tensor, "n *c d"],
    lying: Float[Tensor, "n *c d"],
    fact_ids: Sequence[str],
    seeds: Sequence[int],
    *,
    fit: str | Fit = "diff_of_means",
    test_frac: float = 0.3,
) -> SeedScores:
    """Held-out AUROC of every component for each split seed (``split_by_fact(fact_ids, test_frac,
    seed)``), with the same ``fit`` as the reported scores: use the probe that is reported, or the
    choice of component is made with one probe and reported with another."""
    if honest.shape != lying.shape or len(honest) != len(fact_ids):
        raise ValueError(
            f"honest {tuple(honest.shape)}, lying {tuple(lying.shape)} and {len(fact_ids)} fact ids must match"
        )
    if not seeds:
        raise ValueError("need at least one split seed")
    fit_fn = get_fit(fit)
    out = []
    for seed in seeds:
        sp = split_by_fact(fact_ids, test_frac, seed)
        tr, te = torch.tensor(sp.train), torch.tensor(sp.test)
        direction = fit_fn(honest[tr].float(), lying[tr].float()).float()
        out.append(auroc(project(lying[te], direction), project(honest[te], direction)))
    name = fit if isinstance(fit, str) else getattr(fit, "__name__", "custom")
    return SeedScores(tuple(int(s) for s in seeds), torch.stack(out), name, test_frac)
