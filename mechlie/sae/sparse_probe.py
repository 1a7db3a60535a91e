"""Do the SAE's features help a lie probe? A k-sparse probe on SAE features against a raw-activation probe.

The question of SAEBench's sparse probing (Karvonen et al. 2025) and of DeepMind's negative result
on SAEs for downstream probing (Smith et al. 2025): is a probe that may read only ``k`` SAE features
as good as, or better than, a dense probe on the activations the SAE reads, on data neither was fitted on?

Both probes read the same rows, the final prompt token of every pair's honest (label 0) and lying
(label 1) prompt at one site, and both are L2-regularised logistic regressions on standardised
features (:func:`mechlie.read.probes.fit_probe` ``"logistic"``), each with one hyperparameter chosen
on validation facts:

- **k-sparse SAE probe**: the ``k`` features with the largest ``|mean f(lying) − mean f(honest)|``
  over the training pairs (SAEBench's mean-difference rule), then a logistic probe on those ``k``
  features only (``C = 1``); ``k`` from :data:`K_GRID`.
- **raw probe**: a logistic probe on all ``d_in`` activations; ``C`` from :data:`C_GRID`.

Choosing on validation: the training facts are split again by fact (30% validation, seeded); each
grid value is fitted on the rest and scored by validation AUROC (ties go to the smaller ``k`` /
stronger regularisation); the chosen value is refitted on every training fact.

Reported on **held-out facts** (the study's fact split) and on **held-out relations** (leave one
relation out: fitted and validated on the other relations, scored on the left-out one). Each AUROC
has a 95% bootstrap CI over held-out facts (one pair per fact), beside its permutation null: the
training labels swapped within a random half of the pairs (:func:`mechlie.core.stats.paired_swap_masks`),
then the *whole* fit redone with the chosen hyperparameter (top-``k`` selection included; the raw
probe through :func:`mechlie.read.nulls.refit_nulls`) and scored on the held-out rows. SAE − raw has
a paired bootstrap CI over the same facts.

Why within-pair swaps and not :func:`mechlie.read.nulls.label_permutations` (labels permuted across
the rows of a relation): a permuted label vector keeps a chance correlation with the real labels
(about ``1/sqrt(n)``), and the honest/lying signal at these sites is so strong that the refitted
probe then finds the real direction with a random sign; on SmolLM2 (block 20, 28 training pairs
per fold) that null's 95th percentile was 0.9-1.0. Swapping exactly half of the pairs makes every
null label vector orthogonal to the real one, so the null holds no copy of the real direction.
Over relations, the mean AUROC has a CI over relations (few units: read it as rough).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechlie.core.stats import auroc, bootstrap, paired_swap_masks
from mechlie.read.directions import split_by_fact
from mechlie.read.fits import pair_rows
from mechlie.read.nulls import refit_nulls
from mechlie.read.probes import fit_probe

K_GRID: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
"""Sparsities tried for the SAE probe (SAEBench reports k = 1, 2, 5, 10, 20, 50)."""
C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
"""Inverse regularisation strengths tried for the raw probe."""

Scorer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class PairData:
    """One site's final-token rows of ``n`` pairs: honest and lying, with each pair's fact and relation."""

    honest: Float[Tensor, "n d"]
    lying: Float[Tensor, "n d"]
    fact_ids: tuple[str, ...]
    relations: tuple[str, ...]

    def rows(self, idx: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``X`` (honest rows then lying rows of the pairs ``idx``) and labels (lying = 1)."""
        t = torch.as_tensor(list(idx), dtype=torch.long)
        X, y, _ = pair_rows(self.honest[t].float(), self.lying[t].float())
        return X, y


def top_features(X: Float[Tensor, "n d"], y: Float[Tensor, " n"], k: int) -> Tensor:
    """The ``k`` columns with the largest |mean over label-1 rows − mean over label-0 rows|."""
    diff = X[y == 1].mean(0) - X[y == 0].mean(0)
    return diff.abs().argsort(descending=True)[: min(k, X.shape[1])]


@dataclass(frozen=True)
class ProbeKind:
    """How one probe is fitted with hyperparameter ``h``, and its null refits for label draws ``Y``."""

    name: str
    grid: tuple
    fit: Callable[[Tensor, Tensor, object, int], Scorer]
    nulls: Callable[[Tensor, Tensor, object, Tensor], Tensor]  # (X_tr, Y[D, n], h, X_te) -> scores [n_te, D]


def _sparse_fit(X: Tensor, y: Tensor, k, seed: int) -> Scorer:
    cols = top_features(X, y, int(k))
    probe = fit_probe("logistic", X[:, cols], y, seed=seed)
    return lambda Z: probe.score(Z[:, cols].float())


def _sparse_nulls(X: Tensor, Y: Tensor, k, Z: Tensor) -> Tensor:
    """Every draw's own top-``k`` features (its labels' mean difference) and logistic probe, all
    draws at once: ``fit_logistic``'s objective (standardised features, ``C = 1``, intercept
    unpenalised) solved by batched Newton steps in float64."""
    w1, w0 = Y / Y.sum(1, keepdim=True), (1 - Y) / (1 - Y).sum(1, keepdim=True)
    cols = ((w1 - w0) @ X).abs().argsort(1, descending=True)[:, : min(int(k), X.shape[1])]  # [D, k]
    Xd = X.double()[:, cols].movedim(1, 0)  # [D, n, k]: each draw reads its own k features
    mu, sd = Xd.mean(1, keepdim=True), Xd.std(1, unbiased=False, keepdim=True)
    sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))
    F = torch.cat([(Xd - mu) / sd, torch.ones(*Xd.shape[:2], 1, dtype=torch.float64)], 2)  # [D, n, k + 1]
    pen = torch.ones(F.shape[2], dtype=torch.float64)
    pen[-1] = 0.0
    th = torch.zeros(len(Y), F.shape[2], dtype=torch.float64)
    y = Y.double()
    for _ in range(50):  # strictly convex and smooth: Newton from 0 converges in a few steps
        p = torch.sigmoid((F @ th[..., None])[..., 0])
        g = (F * (p - y)[..., None]).sum(1) + pen * th
        H = F.transpose(1, 2) @ (F * (p * (1 - p))[..., None]) + torch.diag(pen)
        step = torch.linalg.solve(H, g[..., None])[..., 0]
        th = th - step
        if step.abs().max() < 1e-10:
            break
    Zd = (Z.double()[:, cols].movedim(1, 0) - mu) / sd  # [D, n_te, k]
    return ((Zd @ th[:, :-1, None])[..., 0] + th[:, -1:]).T.float()  # [n_te, D]


def _raw_fit(X: Tensor, y: Tensor, C, seed: int) -> Scorer:
    probe = fit_probe("logistic", X, y, seed=seed, C=float(C))
    return lambda Z: probe.score(Z.float())


def _raw_nulls(X: Tensor, Y: Tensor, C, Z: Tensor) -> Tensor:
    probes, kept = refit_nulls("logistic", X, Y, [], C=float(C))
    if len(kept) < len(Y):
        raise ValueError(f"{len(Y) - len(kept)} label draws lack a class")  # cannot happen: counts are kept
    return probes.score(Z)


SPARSE = ProbeKind("sae_k_sparse", K_GRID, _sparse_fit, _sparse_nulls)
RAW = ProbeKind("raw_logistic", C_GRID, _raw_fit, _raw_nulls)


def _auroc_of(s: Tensor, y: Tensor) -> float:
    return float(auroc(s[y == 1], s[y == 0]))


def choose(kind: ProbeKind, data: PairData, train: Sequence[int], seed: int) -> tuple[object, dict]:
    """The grid value with the best validation AUROC (validation facts split off ``train`` by fact)."""
    sp = split_by_fact([data.fact_ids[i] for i in train], 0.3, seed)
    fit_idx, val_idx = [train[i] for i in sp.train], [train[i] for i in sp.test]
    X, y = data.rows(fit_idx)
    Xv, yv = data.rows(val_idx)
    scores = {h: _auroc_of(kind.fit(X, y, h, seed)(Xv), yv) for h in kind.grid}
    best = max(kind.grid, key=lambda h: (scores[h], -kind.grid.index(h)))  # ties: the earlier grid value
    return best, {str(h): round(a, 4) for h, a in scores.items()}


@dataclass(frozen=True)
class HeldOut:
    """One probe fitted on ``train`` and scored on ``test``; ``scores`` are the test rows'."""

    name: str
    chosen: object
    validation: dict
    auroc: float
    lo: float
    hi: float
    null_q95: float
    null_mean: float
    p_value: float
    n_facts: int
    scores: Tensor  # [2 n_test]: honest rows, then lying rows

    def to_dict(self) -> dict:
        keys = ("name", "chosen", "validation", "auroc", "lo", "hi", "null_q95", "null_mean", "p_value", "n_facts")
        return {k: getattr(self, k) for k in keys}


def _pair_auroc(s: Tensor, i: Tensor) -> Tensor:
    """AUROC of lying over honest rows for the resampled pairs ``i`` (rows ``i`` and ``n + i``)."""
    n = len(s) // 2
    return auroc(s[n + i], s[i])


def held_out(
    kind: ProbeKind, data: PairData, train: Sequence[int], test: Sequence[int], *, n_null: int, seed: int
) -> HeldOut:
    """Choose on validation, refit on ``train``, score ``test``: AUROC [CI over facts] and its null."""
    h, val = choose(kind, data, train, seed)
    X, y = data.rows(train)
    Xt, yt = data.rows(test)
    s = kind.fit(X, y, h, seed)(Xt)
    est = bootstrap(lambda i: _pair_auroc(s, i), len(test), seed=seed)
    swap = paired_swap_masks(len(train), n_null, seed).float()  # rows: honest pairs, then lying pairs
    Y = torch.cat([swap, 1 - swap], 1)
    null_s = kind.nulls(X, Y, h, Xt)  # [2 n_test, D]
    null = auroc(null_s[yt == 1], null_s[yt == 0])
    return HeldOut(
        name=kind.name,
        chosen=h,
        validation=val,
        auroc=est.mean,
        lo=est.lo,
        hi=est.hi,
        null_q95=float(torch.quantile(null, 0.95)),
        null_mean=float(null.mean()),
        p_value=float((1 + (null >= est.mean).sum()) / (1 + len(null))),
        n_facts=len(test),
        scores=s,
    )


def paired_difference(a: HeldOut, b: HeldOut, seed: int) -> dict:
    """AUROC of ``a`` minus ``b`` on the same held-out facts, with a paired bootstrap CI over them."""
    n = len(a.scores) // 2
    e = bootstrap(lambda i: _pair_auroc(a.scores, i) - _pair_auroc(b.scores, i), n, seed=seed)
    return {"diff": e.mean, "lo": e.lo, "hi": e.hi, "n_facts": n}


def winner(diff: dict, a: str = "SAE", b: str = "raw") -> str:
    """Which probe wins, read off the CI of ``a − b``: one only when the CI excludes 0."""
    if diff["lo"] > 0:
        return f"{a} probe better"
    if diff["hi"] < 0:
        return f"{b} probe better"
    return "no clear winner (the CI of the difference covers 0)"


def evaluate(
    kind: ProbeKind,
    data: PairData,
    train: Sequence[int],
    test: Sequence[int],
    *,
    n_null: int = 200,
    seed: int = 0,
    min_facts: int = 3,
    relations: bool = True,
) -> tuple[dict[str, HeldOut], dict[str, str]]:
    """``kind`` on the held-out facts (``"held_out"``) and, with ``relations``, on every held-out
    relation (``"loro/<relation>"``: fitted on the other relations' pairs, scored on all of its own),
    and the folds left out with the reason (fewer than ``min_facts`` facts to score, or to fit and
    validate on). The relation folds do not depend on ``train`` / ``test``: another split of the same
    facts can leave them out."""
    out: dict[str, HeldOut] = {}
    skipped: dict[str, str] = {}
    folds = {"held_out": (list(train), list(test))}
    for rel in sorted(set(data.relations)) if relations else ():
        inside = [i for i, r in enumerate(data.relations) if r == rel]
        folds[f"loro/{rel}"] = ([i for i, r in enumerate(data.relations) if r != rel], inside)
    for name, (tr, te) in folds.items():
        n_fit = len({data.fact_ids[i] for i in tr})
        if len(te) < min_facts or n_fit < 2 * min_facts:
            skipped[name] = f"{len(te)} facts to score, {n_fit} to fit and validate on"
            continue
        out[name] = held_out(kind, data, tr, te, n_null=n_null, seed=seed)
    return out, skipped


def compare(sae: dict[str, HeldOut], raw: dict[str, HeldOut], seed: int = 0) -> dict:
    """SAE vs raw probe on every fold both have: each probe's AUROC, null and choice, the paired
    difference and who wins; and over held-out relations, the means with CIs over relations."""
    folds = {}
    for name in sae.keys() & raw.keys():
        d = paired_difference(sae[name], raw[name], seed)
        folds[name] = {"sae": sae[name].to_dict(), "raw": raw[name].to_dict(), "sae_minus_raw": d, "verdict": winner(d)}
    out: dict = {"folds": dict(sorted(folds.items()))}
    rels = sorted(n for n in folds if n.startswith("loro/"))
    if len(rels) >= 2:
        a = torch.tensor([sae[r].auroc for r in rels])
        b = torch.tensor([raw[r].auroc for r in rels])
        means = {}
        for key, v in (("sae", a), ("raw", b), ("sae_minus_raw", a - b)):
            e = bootstrap(lambda i, v=v: v[i].mean(), len(rels), seed=seed, method="percentile")
            means[key] = {"mean": e.mean, "lo": e.lo, "hi": e.hi}
        means["sae"]["null_q95_mean"] = float(torch.tensor([sae[r].null_q95 for r in rels]).mean())
        means["raw"]["null_q95_mean"] = float(torch.tensor([raw[r].null_q95 for r in rels]).mean())
        d = means["sae_minus_raw"]
        means["verdict"] = winner({"lo": d["lo"], "hi": d["hi"]})
        means["n_relations"] = len(rels)
        out["loro_mean"] = means
    return out
