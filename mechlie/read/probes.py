"""Linear lie probes behind one interface: fit on labelled activations, score new ones, save, load.

Every probe is fitted for every component at once: activations ``X`` of shape ``[n, *c, d]``
(``*c`` = ``[L]`` for residual/MLP features, ``[L, H]`` for per-head features) and labels
``y[n]`` (1 = lying, 0 = honest) give a :class:`Probe` whose ``score(X)`` is ``[n, *c]``. Higher
scores mean "lying": every direction points honest -> lying (mechlie's sign convention).

A linear probe is stored in raw activation space as ``score = X . direction + bias``, whatever
its fitting method (standardisation is folded into ``direction`` / ``bias``), so one scoring
function, one file format and one AUROC serve all of them. Each fitter is registered in the one
fit registry (:mod:`mechlie.read.fits`) with ``@register_probe``, which also makes it a direction
fit for :func:`mechlie.read.directions.score_directions`. Kinds (:data:`PROBES`):

- ``diff_of_means``: ``mu_1 - mu_0``; bias puts 0 at the midpoint of the class means.
- ``mass_mean``: the mass-mean probe with the covariance correction, iid version (Marks &
  Tegmark 2023, "The Geometry of Truth"): ``Sigma^-1 (mu_1 - mu_0)`` with ``Sigma`` the
  within-class covariance, shrunk towards ``tr(Sigma)/d * I`` (``shrinkage``) because ``d`` is
  often larger than ``n``.
- ``logistic``: standardised features, L2-regularised logistic regression (scikit-learn
  ``LogisticRegression``, as Apollo's deception probes, Goldowsky-Dill et al. 2025), one fit per
  component; ``C`` is the inverse regularisation strength.
- ``lat``: RepE's linear artificial tomography reading vector (Zou et al. 2023): the first
  principal component of the paired differences ``lying_i - honest_i`` (random signs, so the PCA
  sees the axis, not the mean); needs ``pairs``; its sign is fixed on the training labels.
- ``ccs``: Contrast-Consistent Search (Burns et al. 2022), unsupervised: over contrast pairs
  ``(a_i, b_i)`` (each slot mean-centred) it minimises ``(p(a) - (1 - p(b)))^2 + min(p(a),
  p(b))^2`` for ``p = sigmoid(w.x + b)``; best of ``n_tries`` seeded inits. It never sees the
  labels except to fix the sign at the end. Needs ``pairs``. The slot order of each pair is
  randomised (seeded) unless ``randomize_slots=False``: for honest/lying pairs the framing is the
  slot, and centring each slot would otherwise remove exactly the honest/lying difference.
- ``ensemble``: a base probe per layer (``X`` is ``[n, L, d]``) whose scores are z-scored on the
  training data and averaged over layers; ``score`` is ``[n]``.

``pairs`` is ``[m, 2]`` row indices into ``X`` (slot a, slot b) of the contrast pairs.
:func:`pair_rows` builds ``X, y, pairs`` from honest/lying tensors.

:func:`grad_features` is a feature extractor, not a probe: activation x gradient of the
answer's log-probability, per head (the notes found head activations + gradients 0.94 vs
0.73 for activations alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.core.stats import auroc
from mechlie.read.fits import (
    FITTERS,
    FitEntry,
    ProbeError,
    diff_of_means,
    pair_rows,  # noqa: F401  (re-exported: probes.pair_rows is fits.pair_rows)
    register_probe,
)


@dataclass(frozen=True)
class Probe:
    """A linear probe on ``[*c, d]`` features: ``score = X . direction + bias``."""

    kind: str
    direction: Float[Tensor, "*c d"]
    bias: Float[Tensor, "*c"]
    meta: dict = field(default_factory=dict)

    def score(self, X: Float[Tensor, "n *c d"]) -> Float[Tensor, "n *c"]:  # noqa: F821 (a shape, not names)
        if tuple(X.shape[1:]) != tuple(self.direction.shape):
            raise ProbeError(
                f"{self.kind} probe expects features of shape [n, {', '.join(map(str, self.direction.shape))}], "
                f"got {tuple(X.shape)}"
            )
        return (X.float() * self.direction).sum(-1) + self.bias

    def to_tensors(self) -> tuple[dict[str, Tensor], dict]:
        return {"direction": self.direction.contiguous(), "bias": self.bias.contiguous()}, {
            "kind": self.kind,
            **self.meta,
        }


@dataclass(frozen=True)
class EnsembleProbe:
    """A probe per layer; the score is the mean over layers of the z-scored layer scores."""

    layers: Probe  # direction [L, d]
    mean: Float[Tensor, " L"]  # training-score mean per layer
    std: Float[Tensor, " L"]
    kind: str = "ensemble"
    meta: dict = field(default_factory=dict)

    @property
    def direction(self) -> Float[Tensor, "L d"]:
        return self.layers.direction

    def score(self, X: Float[Tensor, "n L d"]) -> Float[Tensor, " n"]:
        return ((self.layers.score(X) - self.mean) / self.std).mean(-1)

    def to_tensors(self) -> tuple[dict[str, Tensor], dict]:
        t, m = self.layers.to_tensors()
        return {**t, "mean": self.mean.contiguous(), "std": self.std.contiguous()}, {
            **m,
            "kind": "ensemble",
            "base": self.layers.kind,
            **self.meta,
        }


AnyProbe = Probe | EnsembleProbe


def probe_from_tensors(tensors: dict[str, Tensor], meta: dict) -> AnyProbe:
    """Inverse of ``probe.to_tensors()``."""
    meta = dict(meta)
    kind = meta.pop("kind")
    if kind == "ensemble":
        base = meta.pop("base")
        return EnsembleProbe(
            Probe(base, tensors["direction"], tensors["bias"]), tensors["mean"], tensors["std"], meta=meta
        )
    return Probe(kind, tensors["direction"], tensors["bias"], meta)


# ---------------------------------------------------------------------------------------------
# input checks and helpers


def _check(X: Tensor, y: Tensor, min_per_class: int = 2) -> tuple[Tensor, Tensor]:
    if X.ndim < 2:
        raise ProbeError(f"features must be [n, *components, d], got shape {tuple(X.shape)}")
    if y.ndim != 1 or len(y) != len(X):
        raise ProbeError(f"labels must be [n] with n = {len(X)}, got shape {tuple(y.shape)}")
    y = y.float()
    if not ((y == 0) | (y == 1)).all():
        raise ProbeError("labels must be 0 (honest) or 1 (lying)")
    n1, n0 = int(y.sum()), int((1 - y).sum())
    if min(n0, n1) == 0:
        raise ProbeError(f"need both classes to fit a probe, got {n0} honest and {n1} lying")
    if min(n0, n1) < min_per_class:
        raise ProbeError(f"too few examples: {n0} honest and {n1} lying; need at least {min_per_class} of each")
    X = X.float()
    if not torch.isfinite(X).all():
        raise ProbeError("features contain NaN or inf")
    return X, y


def _check_pairs(pairs: Tensor | None, n: int, kind: str) -> Tensor:
    if pairs is None:
        raise ProbeError(f"the {kind} probe needs contrast pairs: pass pairs=[m, 2] row indices (see pair_rows)")
    pairs = torch.as_tensor(pairs, dtype=torch.long)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) < 2:
        raise ProbeError(f"pairs must be [m >= 2, 2] row indices, got shape {tuple(pairs.shape)}")
    if pairs.min() < 0 or pairs.max() >= n:
        raise ProbeError(f"pair indices out of range for {n} rows")
    return pairs


def _midpoint_bias(X: Tensor, y: Tensor, direction: Tensor) -> Tensor:
    proj = (X * direction).sum(-1)
    return -0.5 * (proj[y == 1].mean(0) + proj[y == 0].mean(0))


def _orient(X: Tensor, y: Tensor, direction: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each component so that lying scores above honest on the training data."""
    s = (X * direction).sum(-1) + bias
    a = auroc(s[y == 1], s[y == 0])
    sign = torch.where(a < 0.5, -1.0, 1.0)
    return direction * sign[..., None], bias * sign


# ---------------------------------------------------------------------------------------------
# fitters: (X, y, pairs, seed, **hyperparameters) -> Probe, each registered as a probe kind and a
# direction fit (mechlie.read.fits); registration order is the order of PROBES.


@register_probe("diff_of_means", direction=diff_of_means)
def fit_diff_of_means(X: Tensor, y: Tensor, pairs: Tensor | None = None, seed: int = 0) -> Probe:
    X, y = _check(X, y)
    d = X[y == 1].mean(0) - X[y == 0].mean(0)
    return Probe("diff_of_means", d, _midpoint_bias(X, y, d))


@register_probe("mass_mean")
def fit_mass_mean(X: Tensor, y: Tensor, pairs: Tensor | None = None, seed: int = 0, shrinkage: float = 0.1) -> Probe:
    if not 0 < shrinkage <= 1:
        raise ProbeError(f"shrinkage must be in (0, 1], got {shrinkage}")
    X, y = _check(X, y)
    Xd = X.double()
    mu1, mu0 = Xd[y == 1].mean(0), Xd[y == 0].mean(0)
    centred = torch.where((y == 1).view(-1, *[1] * (X.ndim - 1)), Xd - mu1, Xd - mu0)  # [n, *c, d]
    c = centred.movedim(0, -2)  # [*c, n, d]
    cov = c.transpose(-1, -2) @ c / max(len(X) - 2, 1)  # [*c, d, d]
    dim = cov.shape[-1]
    eye = torch.eye(dim, dtype=cov.dtype)
    scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(1e-12)
    cov = (1 - shrinkage) * cov + shrinkage * scale * eye
    d = torch.linalg.solve(cov, (mu1 - mu0)[..., None])[..., 0].float()
    return Probe("mass_mean", d, _midpoint_bias(X, y, d), {"shrinkage": shrinkage})


@register_probe("logistic")
def fit_logistic(X: Tensor, y: Tensor, pairs: Tensor | None = None, seed: int = 0, C: float = 1.0) -> Probe:
    from sklearn.linear_model import LogisticRegression

    if not C > 0:
        raise ProbeError(f"C must be > 0, got {C}")
    X, y = _check(X, y)
    comp = X.shape[1:-1]
    flat = X.reshape(len(X), -1, X.shape[-1]).numpy().astype(np.float64)
    labels = y.numpy().astype(int)
    dirs, biases = [], []
    for j in range(flat.shape[1]):
        xj = flat[:, j]
        mu, sd = xj.mean(0), xj.std(0)
        sd = np.where(sd > 1e-8, sd, 1.0)
        clf = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit((xj - mu) / sd, labels)
        w = clf.coef_[0] / sd
        dirs.append(w)
        biases.append(clf.intercept_[0] - (mu * w).sum())
    d = torch.tensor(np.stack(dirs), dtype=torch.float32).reshape(*comp, X.shape[-1])
    b = torch.tensor(biases, dtype=torch.float32).reshape(comp)
    return Probe("logistic", d, b, {"C": C})


@register_probe("lat")
def fit_lat(X: Tensor, y: Tensor, pairs: Tensor | None = None, seed: int = 0) -> Probe:
    X, y = _check(X, y)
    pairs = _check_pairs(pairs, len(X), "lat")
    diffs = X[pairs[:, 1]] - X[pairs[:, 0]]  # [m, *c, d]
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (len(diffs),), generator=g).float() * 2 - 1
    diffs = diffs * signs.view(-1, *[1] * (diffs.ndim - 1))
    D = diffs.movedim(0, -2)  # [*c, m, d]
    D = D - D.mean(-2, keepdim=True)
    v = torch.linalg.svd(D.double(), full_matrices=False).Vh[..., 0, :].float()  # [*c, d]
    d, b = _orient(X, y, v, _midpoint_bias(X, y, v))
    return Probe("lat", d, _midpoint_bias(X, y, d))


@register_probe("ccs")
def fit_ccs(
    X: Tensor,
    y: Tensor,
    pairs: Tensor | None = None,
    seed: int = 0,
    n_tries: int = 5,
    n_steps: int = 600,
    lr: float = 1e-2,
    weight_decay: float = 0.01,
    randomize_slots: bool = True,
) -> Probe:
    X, y = _check(X, y)
    pairs = _check_pairs(pairs, len(X), "ccs")
    g = torch.Generator().manual_seed(seed)
    if randomize_slots:
        # Burns et al.'s slots are a template ("Yes"/"No") that per-slot centring removes. For
        # honest/lying pairs the framing *is* the slot, so a fixed order would erase the signal.
        swap = torch.randint(0, 2, (len(pairs),), generator=g).bool()
        pairs = torch.where(swap[:, None], pairs.flip(1), pairs)
    a, b_ = X[pairs[:, 0]], X[pairs[:, 1]]
    mu_a, mu_b = a.mean(0), b_.mean(0)
    a, b_ = a - mu_a, b_ - mu_b
    # One scalar scale per component keeps the optimisation well-conditioned for any d.
    scale = torch.cat([a, b_]).norm(dim=-1).mean(0).clamp_min(1e-8) / X.shape[-1] ** 0.5  # [*c]
    a, b_ = a / scale[..., None], b_ / scale[..., None]
    comp, dim = X.shape[1:-1], X.shape[-1]
    best_w = torch.zeros(n_tries, *comp, dim)
    best_b = torch.zeros(n_tries, *comp)
    losses = torch.zeros(n_tries, *comp)
    with torch.enable_grad():
        for t in range(n_tries):
            w = (torch.randn(*comp, dim, generator=g) / dim**0.5).requires_grad_()
            bias = torch.zeros(comp).requires_grad_()
            opt = torch.optim.AdamW([w, bias], lr=lr, weight_decay=weight_decay)
            for _ in range(n_steps):
                pa = torch.sigmoid((a * w).sum(-1) + bias)
                pb = torch.sigmoid((b_ * w).sum(-1) + bias)
                loss = ((pa - (1 - pb)) ** 2 + torch.minimum(pa, pb) ** 2).mean(0)  # [*c]
                opt.zero_grad()
                loss.sum().backward()  # components are independent: the sum optimises each
                opt.step()
            best_w[t], best_b[t], losses[t] = w.detach(), bias.detach(), loss.detach()
    pick = losses.argmin(0)  # [*c]
    w = best_w.gather(0, pick[None, ..., None].expand(1, *comp, dim))[0] / scale[..., None]
    # Slots are centred separately when fitting; new data are centred on the pooled mean.
    centre = 0.5 * (mu_a + mu_b)
    bias = -(centre * w).sum(-1)
    d, b = _orient(X, y, w, bias)
    return Probe("ccs", d, b, {"ccs_loss": float(losses.min(0).values.mean())})


def probe_kinds() -> tuple[str, ...]:
    """Every probe kind :func:`fit_probe` accepts now: the registered fitters, then ``ensemble``."""
    return (*FITTERS, "ensemble")


PROBES: tuple[str, ...] = probe_kinds()
"""The built-in probe kinds (a probe registered later is in :func:`probe_kinds`, not here)."""


def fit_ensemble(
    X: Tensor, y: Tensor, pairs: Tensor | None = None, seed: int = 0, base: str = "diff_of_means", **hp
) -> EnsembleProbe:
    if X.ndim != 3:
        raise ProbeError(f"the ensemble probe combines layers: features must be [n, L, d], got {tuple(X.shape)}")
    if base not in FITTERS:
        raise ProbeError(f"unknown base probe {base!r}; known: {sorted(FITTERS)}")
    layers = FITTERS[base](X, y, pairs, seed, **hp)
    s = layers.score(X.float())
    return EnsembleProbe(layers, s.mean(0), s.std(0).clamp_min(1e-8))


def fit_probe(
    kind: str,
    X: Float[Tensor, "n *c d"],
    y: Float[Tensor, " n"],
    *,
    pairs: Int[Tensor, "m 2"] | None = None,
    seed: int = 0,
    **hyperparameters,
) -> AnyProbe:
    """Fit a probe of ``kind`` on ``X`` (rows) with labels ``y`` (1 = lying).

    Args:
        kind: one of :func:`probe_kinds` (the built-ins: :data:`PROBES`).
        X: features ``[n, *components, d]``; one probe per component.
        y: 0 (honest) / 1 (lying); needs at least 2 of each.
        pairs: ``[m, 2]`` row indices of contrast pairs (needed by ``lat`` and ``ccs``).
        hyperparameters: e.g. ``C`` (logistic), ``shrinkage`` (mass_mean), ``base`` (ensemble).

    Returns:
        A :class:`Probe` (or :class:`EnsembleProbe`) whose ``score(X)`` is ``[n, *components]``.

    Example:
        >>> X, y, pairs = pair_rows(honest_acts, lying_acts)  # [m, L, d] each
        >>> probe = fit_probe("logistic", X, y)
        >>> probe.score(X_new).shape  # [n_new, L]
    """
    if kind == "ensemble":
        return fit_ensemble(X, y, pairs, seed, **hyperparameters)
    if kind not in FITTERS:
        raise ProbeError(f"unknown probe kind {kind!r}; known: {probe_kinds()}")
    return FITTERS[kind](X, y, pairs, seed, **hyperparameters)


def pair_fit(kind: str, **hyperparameters) -> Callable[[Tensor, Tensor], Tensor]:
    """A ``(honest, lying) -> direction`` fit for :mod:`mechlie.read.directions` from a probe kind:
    the probe fitted on the stacked pairs (what ``get_fit(kind, **hyperparameters)`` gives)."""
    if kind not in FITTERS:
        raise ProbeError(f"unknown probe kind {kind!r}; pair fits exist for {sorted(FITTERS)}")
    return FitEntry(kind, probe=FITTERS[kind])(**hyperparameters)


# ---------------------------------------------------------------------------------------------
# gradient features


def grad_features(
    model: HookedTransformer,
    tokens: Int[Tensor, "n pos"],
    attention_mask: Int[Tensor, "n pos"],
    answer_ids: Int[Tensor, "n k"],
    *,
    kinds: Sequence[str] = ("z",),
    batch_size: int = 8,
) -> dict[str, Float[Tensor, "n L *h d"]]:
    """Activation x gradient of ``log P(answer)`` at the final prompt token, per component.

    ``answer_ids`` are the answer's spellings (``-1`` = padding); the log-probability is summed
    over them as in :mod:`mechlie.core.metrics`. ``kinds`` are activation kinds of
    :mod:`mechlie.core.activations` that are read from a hook (``z`` gives ``[n, L, H, d_head]``,
    ``resid_post``/``mlp_out`` give ``[n, L, d_model]``). Each row's gradient depends only on its
    own prompt (rows do not interact), so summing the batch's log-probs gives every row's own.
    """
    from mechlie.core.hooks import hook_name
    from mechlie.core.metrics import final_resid_hook, gather_logprob, logits_from_resid

    if len(tokens) != len(answer_ids) or tokens.shape != attention_mask.shape:
        raise ProbeError("tokens, attention_mask and answer_ids must have the same number of rows")
    out: dict[str, list[Tensor]] = {k: [] for k in kinds}
    for i in range(0, len(tokens), batch_size):
        store: dict[tuple[str, int], Tensor] = {}

        def saver(kind: str, layer: int):
            def hook(act: Tensor, hook) -> None:
                act.retain_grad()
                store[(kind, layer)] = act

            return hook

        kept: list[Tensor] = []
        hooks = [(hook_name(k, l), saver(k, l)) for k in kinds for l in range(model.cfg.n_layers)]
        with torch.enable_grad(), model.hooks(fwd_hooks=[*hooks, final_resid_hook(model, kept)]):
            model(tokens[i : i + batch_size], attention_mask=attention_mask[i : i + batch_size], return_type=None)
            logits = logits_from_resid(model, kept[-1])[:, -1]
            lp = gather_logprob(logits.float().log_softmax(-1), answer_ids[i : i + batch_size].to(logits.device))
            lp.sum().backward()
        for k in kinds:
            per_layer = [
                (store[(k, l)] * store[(k, l)].grad)[:, -1].detach().float().cpu() for l in range(model.cfg.n_layers)
            ]
            out[k].append(torch.stack(per_layer, 1))
        model.zero_grad(set_to_none=True)
    return {k: torch.cat(v) for k, v in out.items()}
