"""Null distributions for a probe's AUROC: label permutations that break the label, and random directions.

Two nulls, each a set of probes scored like the real one (:mod:`mechlie.read.transfer` uses them):

- **Label permutation** (:func:`label_permutations`, :func:`refit_nulls`): each draw permutes the
  labels of the training rows *across all rows of the same stratum* (the relation), so the class
  counts of every relation are kept and a fact's label moves to other facts. (Permuting within a
  fact, as mechlie did before issue 19, leaves every fact whose rows share one label unchanged:
  72 of 114 on-policy training rows kept their real label.) The probe is then refitted on every
  permuted label vector the same way as the real one: same kind, same features, same
  hyperparameters, and contrast pairs rebuilt from the permuted labels (a label-0 and a label-1 row
  of the same fact; a draw with fewer than 2 such pairs is dropped for ``lat``, and counted).
- **Random direction** (:func:`random_nulls`): a random unit direction (isotropic Gaussian in raw
  activation space, normalised) per draw, oriented so that lies score higher on the *training*
  labels and given the midpoint bias (0 halfway between the training class means), as the
  fitted kinds are; for ``ensemble`` one such direction per layer, z-scored on the training rows and
  averaged over layers, as the ensemble is.

The refits are vectorised over draws where the kind allows, solving the same objective as
:func:`mechlie.read.probes.fit_probe` (a test checks each against ``fit_probe``):

- ``diff_of_means`` (and ``ensemble`` over it, the default base): class means are a matrix product.
- ``mass_mean``: the within-class scatter is the total scatter (label-free) minus
  ``n1 n0 / n * delta delta^T``, so one SVD of the centred rows and a Sherman-Morrison step give
  every draw's ``Sigma^-1 delta`` exactly.
- ``logistic``: the L2-penalised optimum lies in the row space of the standardised features, so the
  problem is solved exactly (Newton's method with backtracking, float64, to a Newton decrement below
  ``1e-10``) in ``r <= n`` coordinates for all draws at once. scikit-learn's lbfgs stops at its own
  tolerance (``1e-4``), so its solution and this one agree to a cosine of about 0.999, not bit for bit.
  For thousands of rows (the generalisation study) ``solver="lbfgs"`` solves the same objective by
  batched L-BFGS instead, ~30x faster there; a test checks both against ``fit_probe``.
- ``lat``: the top principal component of each draw's paired differences from the small Gram matrix.
- ``ccs``: no permutation null. CCS's optimisation (``n_tries`` x ``n_steps`` Adam steps) x 200 draws
  would dominate the run, so it has only the random-direction null (``nan`` for the other).
- any other kind (a probe registered later, ``ensemble`` over another base): ``fit_probe`` per draw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechlie.core.stats import auroc
from mechlie.read.probes import ProbeError, fit_probe

log = logging.getLogger(__name__)

NO_PERMUTATION_NULL = ("ccs",)
"""Kinds without a permutation null (see the module docstring)."""


@dataclass(frozen=True)
class NullProbes:
    """``D`` linear probes at once: ``score = X . direction + bias`` per draw; for an ensemble the
    per-layer scores are z-scored with ``mean``/``std`` and averaged over layers."""

    direction: Float[Tensor, " D *c d"]
    bias: Float[Tensor, " D *c"]
    mean: Float[Tensor, "D L"] | None = None
    std: Float[Tensor, "D L"] | None = None

    def __len__(self) -> int:
        return len(self.direction)

    def score(self, X: Float[Tensor, "n *c d"]) -> Float[Tensor, "n D"]:
        s = torch.einsum("n...d,D...d->nD...", X.float(), self.direction.float()) + self.bias
        if self.mean is not None:
            s = ((s - self.mean) / self.std).mean(-1)
        return s


def label_permutations(
    y: Float[Tensor, " n"], strata: Sequence[Sequence[int]], n_draws: int, seed: int
) -> Float[Tensor, "D n"]:
    """``[n_draws, n]`` label vectors: each permutes ``y`` across the rows of every stratum (one
    stratum = the rows of one relation), independently per stratum and draw (seeded), so each
    stratum keeps its class counts while its labels move between facts."""
    g = torch.Generator().manual_seed(seed)
    out = y.float().repeat(n_draws, 1)
    for idx in strata:
        if len(idx) < 2:
            continue
        t = torch.as_tensor(list(idx), dtype=torch.long)
        perm = torch.rand(n_draws, len(idx), generator=g).argsort(1)
        out[:, t] = y.float()[t][perm]
    return out


def _per_draw_auroc(S: Float[Tensor, " n D *c"], Y: Float[Tensor, "D n"]) -> Float[Tensor, " D *c"]:
    """AUROC of each draw's scores for its own labels (every draw has the same class counts)."""
    n1 = Y.sum(1)
    if not (n1 == n1[0]).all():
        raise ProbeError("every label draw must have the same class counts")
    St = S.movedim(0, 1)  # [D, n, *c]
    m = Y.bool()
    pos = St[m].view(len(Y), int(n1[0]), *S.shape[2:]).movedim(1, 0)
    neg = St[~m].view(len(Y), -1, *S.shape[2:]).movedim(1, 0)
    return auroc(pos, neg)


def _midpoint(X: Tensor, Y: Tensor, W: Tensor) -> Tensor:
    """Bias putting 0 halfway between each draw's class-mean projections: ``[D, *c]``."""
    proj = torch.einsum("n...d,D...d->Dn...", X, W)  # [D, n, *c]
    shape = (*Y.shape, *[1] * (proj.ndim - 2))
    y1, y0 = Y.view(shape), (1 - Y).view(shape)
    return -0.5 * ((proj * y1).sum(1) / y1.sum(1) + (proj * y0).sum(1) / y0.sum(1))


def _orient(X: Tensor, Y: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each draw's direction so lies score higher on its training labels; midpoint bias."""
    b = _midpoint(X, Y, W)
    s = torch.einsum("n...d,D...d->nD...", X, W) + b
    sign = torch.where(_per_draw_auroc(s, Y) < 0.5, -1.0, 1.0)
    W = W * sign[..., None]
    return W, _midpoint(X, Y, W)


def _class_means(X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    y1, y0 = Y / Y.sum(1, keepdim=True), (1 - Y) / (1 - Y).sum(1, keepdim=True)
    return torch.einsum("Dn,n...->D...", y1, X), torch.einsum("Dn,n...->D...", y0, X)


def diff_of_means_nulls(X: Float[Tensor, "n *c d"], Y: Float[Tensor, "D n"]) -> NullProbes:
    mu1, mu0 = _class_means(X.float(), Y)
    W = mu1 - mu0
    return NullProbes(W, _midpoint(X.float(), Y, W))


def mass_mean_nulls(X: Float[Tensor, "n d"], Y: Float[Tensor, "D n"], shrinkage: float = 0.1) -> NullProbes:
    """``fit_mass_mean`` for every draw (see the module docstring for the algebra)."""
    if not 0 < shrinkage <= 1:
        raise ProbeError(f"shrinkage must be in (0, 1], got {shrinkage}")
    Xd, Yd = X.double(), Y.double()
    n, dim = Xd.shape
    n1 = Yd.sum(1)
    k = n1 * (n - n1) / n  # [D]
    mu1, mu0 = _class_means(Xd, Yd)
    delta = mu1 - mu0  # [D, d]
    Zc = Xd - Xd.mean(0)
    _, S, Vh = torch.linalg.svd(Zc, full_matrices=False)  # total scatter T = Vh^T S^2 Vh
    a = (1 - shrinkage) / max(n - 2, 1)
    tr_within = (S**2).sum() - k * (delta**2).sum(1)  # tr(Sigma_w) * (n - 2)
    b = shrinkage * tr_within / max(n - 2, 1) / dim  # [D]
    proj = delta @ Vh.T  # [D, r]
    minv = (proj / (a * S**2 + b[:, None])) @ Vh + (delta - proj @ Vh) / b[:, None]  # (aT + bI)^-1 delta
    W = (minv / (1 - a * k * (delta * minv).sum(1))[:, None]).float()
    return NullProbes(W, _midpoint(X.float(), Y, W))


def logistic_nulls(
    X: Float[Tensor, "n d"], Y: Float[Tensor, "D n"], C: float = 1.0, solver: Literal["newton", "lbfgs"] = "newton"
) -> NullProbes:
    """``fit_logistic`` for every draw: ``min C sum_i logloss_i + |w|^2 / 2`` on standardised
    features, intercept unpenalised (scikit-learn's objective).

    ``solver="newton"`` (default): batched Newton in the row space of the features (float32 steps, then
    float64 steps to a Newton decrement < 1e-10): exact, for the few hundred rows of a detection run.
    ``solver="lbfgs"``: batched L-BFGS on the sum of the (independent) objectives, to scikit-learn's kind
    of tolerance: Newton's Hessian costs ``n r^2`` per draw and step, about 100 s per fit at ~2,000 rows
    x 576 features on one core, against ~3 s for L-BFGS (the generalisation study's size)."""
    if not C > 0:
        raise ProbeError(f"C must be > 0, got {C}")
    if solver == "lbfgs":
        return _lbfgs_logistic(X, Y, C)
    if solver != "newton":
        raise ProbeError(f"solver must be 'newton' or 'lbfgs', got {solver!r}")
    Xd = X.double()
    mu, sd = Xd.mean(0), Xd.std(0, unbiased=False)
    sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))
    U, S, Vh = torch.linalg.svd((Xd - mu) / sd, full_matrices=False)
    keep = S > S[0] * 1e-9
    F = torch.cat([U[:, keep] * S[keep], torch.ones(len(Xd), 1, dtype=torch.float64)], 1)  # [n, r + 1]
    pen = torch.ones(F.shape[1], dtype=torch.float64)
    pen[-1] = 0.0  # the intercept is not penalised
    th = torch.zeros(len(Y), F.shape[1], dtype=torch.float32)
    # float32 steps are twice as fast; a Newton step from their end point in float64 is exact.
    th = _newton(F.float(), Y.float(), C, pen.float(), th, tol=1e-4, max_iter=50)
    th = _newton(F, Y.double(), C, pen, th.double(), tol=1e-10, max_iter=20)
    W = (th[:, :-1] @ Vh[keep]) / sd
    b = th[:, -1] - W @ mu
    return NullProbes(W.float(), b.float())


def _lbfgs_logistic(X: Tensor, Y: Tensor, C: float, max_iter: int = 100) -> NullProbes:
    Xd = X.float()
    mu, sd = Xd.mean(0), Xd.std(0, unbiased=False)
    sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))
    Z = torch.cat([(Xd - mu) / sd, torch.ones(len(Xd), 1)], 1)
    pen = torch.ones(Z.shape[1])
    pen[-1] = 0.0  # the intercept is not penalised
    Yf = Y.float()
    with torch.enable_grad():
        th = torch.zeros(len(Y), Z.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS(
            [th], lr=1, max_iter=max_iter, history_size=10, tolerance_grad=1e-5, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            opt.zero_grad()
            z = th @ Z.T
            loss = C * (torch.nn.functional.softplus(z) - Yf * z).sum() + 0.5 * (pen * th**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    th = th.detach()
    W = th[:, :-1] / sd
    return NullProbes(W, th[:, -1] - W @ mu)


def _newton(F: Tensor, Y: Tensor, C: float, pen: Tensor, th: Tensor, *, tol: float, max_iter: int) -> Tensor:
    """Damped Newton on ``C sum softplus(z) - y z + pen . th^2 / 2`` (``z = F th``) for every row of
    ``th`` at once, until every Newton decrement is below ``tol`` (or ``max_iter``)."""

    def objective(t: Tensor) -> Tensor:
        z = t @ F.T
        return C * (torch.nn.functional.softplus(z) - Y * z).sum(1) + 0.5 * (pen * t**2).sum(1)

    f = objective(th)
    for _ in range(max_iter):
        p = torch.sigmoid(th @ F.T)
        grad = C * (p - Y) @ F + pen * th
        H = (F.T * (C * p * (1 - p))[:, None, :]) @ F + torch.diag(pen)
        step = torch.cholesky_solve(grad[..., None], torch.linalg.cholesky(H))[..., 0]
        decrement = (grad * step).sum(1)
        if decrement.max() < tol:
            break
        t = torch.ones(len(Y), dtype=th.dtype)
        for _ in range(30):  # backtracking (Armijo) per row; full Newton steps are accepted at once
            new = th - t[:, None] * step
            f_new = objective(new)
            bad = f_new > f - 1e-4 * t * decrement + 10 * torch.finfo(th.dtype).eps * f.abs()
            if not bad.any():
                break
            t = torch.where(bad, t / 2, t)
        th, f = new, f_new
    return th


def lat_nulls(
    X: Float[Tensor, "n d"], Y: Float[Tensor, "D n"], groups: Sequence[Sequence[int]], seed: int = 0
) -> tuple[NullProbes, Tensor]:
    """``fit_lat`` for every draw whose permuted labels leave >= 2 pairs (label-0 and label-1 rows
    of one fact, matched as :meth:`LabelledSet.pairs` does); returns the probes and the kept draws."""
    Xf = X.float()
    pairs, keep = [], []
    for j, yy in enumerate(Y.tolist()):
        pj = [pr for g in groups for pr in zip([i for i in g if yy[i] == 0], [i for i in g if yy[i] == 1])]
        if len(pj) >= 2:
            pairs.append(torch.tensor(pj, dtype=torch.long))
            keep.append(j)
    if not keep:
        return NullProbes(Xf.new_zeros(0, X.shape[-1]), Xf.new_zeros(0)), torch.zeros(0, dtype=torch.long)
    m = max(len(p) for p in pairs)
    D = torch.zeros(len(keep), m, X.shape[-1], dtype=torch.float64)
    valid = torch.zeros(len(keep), m, dtype=torch.float64)
    for j, p in enumerate(pairs):
        diffs = (Xf[p[:, 1]] - Xf[p[:, 0]]).double()
        # The same seeded random signs as fit_lat draws for these pairs.
        signs = torch.randint(0, 2, (len(p),), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
        diffs = diffs * signs[:, None]
        D[j, : len(p)] = diffs - diffs.mean(0)
        valid[j, : len(p)] = 1.0
    G = D @ D.transpose(1, 2)  # [D, m, m]; padded rows are 0 and add only zero eigenvalues
    u = torch.linalg.eigh(G).eigenvectors[..., -1]  # [D, m]
    v = torch.einsum("Dm,Dmd->Dd", u, D)
    v = (v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()
    idx = torch.tensor(keep, dtype=torch.long)
    W, b = _orient(Xf, Y[idx], v)
    return NullProbes(W, b), idx


def ensemble_nulls(X: Float[Tensor, "n L d"], Y: Float[Tensor, "D n"]) -> NullProbes:
    """``fit_ensemble`` with its default base (difference of means per layer) for every draw."""
    base = diff_of_means_nulls(X, Y)
    s = torch.einsum("nLd,DLd->DnL", X.float(), base.direction) + base.bias[:, None]
    return NullProbes(base.direction, base.bias, s.mean(1), s.std(1).clamp_min(1e-8))


def refit_nulls(
    kind: str,
    X: Float[Tensor, "n *c d"],
    Y: Float[Tensor, "D n"],
    groups: Sequence[Sequence[int]],
    *,
    seed: int = 0,
    **hp,
) -> tuple[NullProbes | None, Tensor]:
    """The probe ``kind`` refitted on every label vector in ``Y`` (features as the probe sees them:
    ``[n, d]`` for one layer, ``[n, L, d]`` for ``ensemble``). Returns the probes (``None`` for a
    kind without a permutation null) and the indices of the draws kept (a draw whose labels lack a
    class, or that leaves ``lat`` fewer than 2 pairs, is dropped)."""
    ok = (Y.sum(1) >= 2) & ((1 - Y).sum(1) >= 2)
    idx = ok.nonzero()[:, 0]
    Y = Y[idx]
    if kind in NO_PERMUTATION_NULL or not len(idx):
        return None, idx[:0]
    if kind == "diff_of_means" and not hp:
        return diff_of_means_nulls(X, Y), idx
    if kind == "mass_mean" and set(hp) <= {"shrinkage"}:
        return mass_mean_nulls(X, Y, **hp), idx
    if kind == "logistic" and set(hp) <= {"C"}:
        return logistic_nulls(X, Y, **hp), idx
    if kind == "lat" and not hp:
        probes, kept = lat_nulls(X, Y, groups, seed)
        return probes, idx[kept]
    if kind == "ensemble" and hp.get("base", "diff_of_means") == "diff_of_means" and set(hp) <= {"base"}:
        return ensemble_nulls(X, Y), idx
    return _loop_nulls(kind, X, Y, idx, groups, seed, hp)


def _loop_nulls(kind, X, Y, idx, groups, seed, hp) -> tuple[NullProbes | None, Tensor]:
    """``fit_probe`` per draw, for kinds without a vectorised refit."""
    fitted, kept = [], []
    for j, yy in enumerate(Y):
        lab = yy.tolist()
        pairs = [pr for g in groups for pr in zip([i for i in g if lab[i] == 0], [i for i in g if lab[i] == 1])]
        try:
            fitted.append(fit_probe(kind, X, yy, pairs=torch.tensor(pairs).view(-1, 2), seed=seed, **hp))
            kept.append(j)
        except ProbeError:  # e.g. fewer than 2 pairs for a kind that needs them: the draw is dropped
            continue
    if not fitted:
        return None, idx[:0]
    ens = kind == "ensemble"
    W = torch.stack([p.direction for p in fitted])
    b = torch.stack([p.layers.bias if ens else p.bias for p in fitted])
    mean = torch.stack([p.mean for p in fitted]) if ens else None
    std = torch.stack([p.std for p in fitted]) if ens else None
    return NullProbes(W, b, mean, std), idx[torch.tensor(kept, dtype=torch.long)]


def random_nulls(
    X: Float[Tensor, "n *c d"], y: Float[Tensor, " n"], n_draws: int, seed: int, *, ensemble: bool = False
) -> NullProbes:
    """``n_draws`` random-direction probes on training features ``X`` (``[n, d]``, or ``[n, L, d]``
    with ``ensemble``: one direction per layer, z-scored and averaged), oriented and biased on ``y``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_draws, *X.shape[1:], generator=g)
    W = W / W.norm(dim=-1, keepdim=True)
    Y = y.float().expand(n_draws, -1).contiguous()
    W, b = _orient(X.float(), Y, W)
    if not ensemble:
        return NullProbes(W, b)
    s = torch.einsum("nLd,DLd->DnL", X.float(), W) + b[:, None]
    return NullProbes(W, b, s.mean(1), s.std(1).clamp_min(1e-8))
