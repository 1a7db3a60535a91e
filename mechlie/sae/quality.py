"""How good an SAE is, in the numbers the field reports, on held-out corpus lines.

:func:`sae_quality`: L0, explained variance ``1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²`` (over tokens), and the
cross-entropy loss recovered when ``x̂`` is spliced in, ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``
with zero-ablation of the site as the baseline; the CI is a bootstrap over lines of text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.core.hooks import hook_name
from mechlie.core.pairs import Batch, tokenize
from mechlie.core.stats import bootstrap
from mechlie.sae.loading import Site, check_sae


@dataclass(frozen=True)
class SAEQuality:
    l0: float  # mean active features per token
    explained_variance: float
    ce_clean: float  # nats per token, no intervention
    ce_sae: float  # with the SAE's reconstruction spliced in
    ce_zero: float  # with the site zero-ablated
    ce_recovered: float  # (ce_zero - ce_sae) / (ce_zero - ce_clean)
    ce_recovered_lo: float  # 95% bootstrap CI over lines of text
    ce_recovered_hi: float
    n_lines: int
    n_tokens: int
    dead_frac: float  # features that never fire on the evaluation tokens


def sae_quality(
    model: HookedTransformer,
    sae: SAE,
    site: Site,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    seed: int = 0,
    n_boot: int = 1000,
) -> SAEQuality:
    """L0, explained variance and CE loss recovered of ``sae`` at ``site``, on ``texts``.

    The reconstruction replaces the site at every position (the first token included, so the
    CE numbers describe the SAE as a drop-in replacement); L0 and explained variance are over the
    positions the SAE was trained on (all but the first token of each line).
    """
    return sae_qualities(model, [(sae, site)], texts, batch_size=batch_size, seed=seed, n_boot=n_boot)[0]


def bootstrap_ci(
    stat: Callable[[Tensor], Tensor], n: int, *, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """(estimate, lo, hi) of :func:`mechlie.core.stats.bootstrap` (95%, over the ``n`` units)."""
    e = bootstrap(stat, n, n_boot=n_boot, seed=seed)
    return float(e.mean), float(e.lo), float(e.hi)


@dataclass
class _Tally:
    """Running sums of one SAE's reconstruction over the kept tokens of every batch."""

    fired: Tensor  # [d_sae] bool: the feature fired on some token
    sq_err: float = 0.0
    xs_sq: float = 0.0
    xs_sum: Tensor | None = None
    l0: float = 0.0
    n: int = 0

    def add(self, x: Float[Tensor, "b p d_in"], x_hat: Tensor, f: Float[Tensor, "b p d_sae"], keep: Tensor) -> None:
        xk, fk = x.cpu()[keep], f.cpu()[keep]
        self.sq_err += float(((x_hat.cpu()[keep] - xk) ** 2).sum())
        self.xs_sum = xk.sum(0) if self.xs_sum is None else self.xs_sum + xk.sum(0)
        self.xs_sq += float((xk**2).sum())
        self.l0 += float((fk > 0).sum())
        self.n += len(xk)
        self.fired.logical_or_((fk > 0).any(0))

    def quality(self, clean: Tensor, cs: Tensor, cz: Tensor, *, n_boot: int, seed: int) -> SAEQuality:
        """The tallies and the per-line CEs (clean, SAE spliced, zero-ablated) as an :class:`SAEQuality`."""
        # Total sum of squares about the mean: Σ‖x‖² − n‖x̄‖².
        sq_tot = self.xs_sq - float((self.xs_sum**2).sum()) / self.n
        rec = lambda i: (cz[i].mean() - cs[i].mean()) / (cz[i].mean() - clean[i].mean())  # noqa: E731
        est = bootstrap_ci(rec, len(clean), n_boot=n_boot, seed=seed)
        return SAEQuality(
            l0=self.l0 / self.n,
            explained_variance=1 - self.sq_err / sq_tot,
            ce_clean=float(clean.mean()),
            ce_sae=float(cs.mean()),
            ce_zero=float(cz.mean()),
            ce_recovered=est[0],
            ce_recovered_lo=est[1],
            ce_recovered_hi=est[2],
            n_lines=len(clean),
            n_tokens=self.n,
            dead_frac=float((~self.fired).float().mean()),
        )


def _line_ce(logits: Tensor, b: Batch) -> Tensor:
    """Mean next-token CE of each line of ``b`` over its real tokens."""
    mask = b.attention_mask.bool()
    tgt = b.tokens[:, 1:]
    both = (mask[:, 1:] & mask[:, :-1]).float()
    lp = logits[:, :-1].float().log_softmax(-1).gather(-1, tgt[..., None])[..., 0]
    return (-(lp * both).sum(-1) / both.sum(-1).clamp_min(1)).cpu()


@torch.no_grad()
def _quality_batch(
    model: HookedTransformer, b: Batch, saes: Sequence[tuple[SAE, Site]], tallies: Sequence[_Tally], start: int
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """One batch: the clean per-line CE, and each SAE's (spliced, zero-ablated) per-line CEs; the
    SAE's reconstruction of the kept tokens (all but each line's first) goes into its tally."""
    mask = b.attention_mask.bool()
    pos = mask.long().cumsum(-1) - 1
    keep = (mask & (pos >= 1)).cpu()
    stash: dict[str, Tensor] = {}
    with model.hooks(
        fwd_hooks=[(hook_name("resid_pre", start), lambda a, hook: stash.__setitem__("resid", a.clone()))]
    ):
        clean = _line_ce(model(b.tokens, attention_mask=b.attention_mask), b)
    # site.write is in place, so each pass starts from its own copy of the stashed residual
    rerun = lambda: model(stash["resid"].clone(), start_at_layer=start, attention_mask=b.attention_mask)  # noqa: E731
    out = []
    zeroed: dict[Site, Tensor] = {}  # SAEs of several seeds share a site: its zero-ablation runs once
    for (sae, site), tally in zip(saes, tallies):
        dev = sae.W_dec.device

        def splice(act: Tensor, hook, sae=sae, site=site, tally=tally, dev=dev) -> Tensor:
            x = site.read(act).float()
            f = sae.encode(x.to(dev))
            x_hat = sae.decode(f).to(x.device)
            tally.add(x, x_hat, f, keep)
            return site.write(act, x_hat)

        def zero(act: Tensor, hook, site=site) -> Tensor:
            return site.write(act, torch.zeros_like(site.read(act)))

        with model.hooks(fwd_hooks=[(site.hook_name, splice)]):
            ce_sae = _line_ce(rerun(), b)
        if site not in zeroed:
            with model.hooks(fwd_hooks=[(site.hook_name, zero)]):
                zeroed[site] = _line_ce(rerun(), b)
        out.append((ce_sae, zeroed[site]))
    return clean, out


@torch.no_grad()
def sae_qualities(
    model: HookedTransformer,
    saes: Sequence[tuple[SAE, Site]],
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    seed: int = 0,
    n_boot: int = 1000,
) -> list[SAEQuality]:
    """:func:`sae_quality` of several (SAE, site) pairs on the same ``texts``, the clean pass shared.

    Lines run shortest first (less left padding), and the SAE and zero-ablation passes start from
    the clean pass's residual at the first site's block (the blocks below it cannot see the splice).
    """
    for sae, site in saes:
        check_sae(sae, model, site)
    tallies = [_Tally(torch.zeros(sae.cfg.d_sae, dtype=torch.bool)) for sae, _ in saes]
    ce_clean: list[Tensor] = []
    ce: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in saes]
    order = sorted(range(len(texts)), key=lambda j: len(model.tokenizer(texts[j])["input_ids"]))
    start = min(site.layer for _, site in saes)
    for i in range(0, len(texts), batch_size):
        b = tokenize(model, [texts[j] for j in order[i : i + batch_size]])
        clean, spliced = _quality_batch(model, b, saes, tallies, start)
        ce_clean.append(clean)
        for (cs, cz), (s_, z_) in zip(ce, spliced):
            cs.append(s_)
            cz.append(z_)
    back = torch.argsort(torch.as_tensor(order))  # per-line CEs go back to the caller's order
    clean = torch.cat(ce_clean)[back]
    return [
        t.quality(clean, torch.cat(cs)[back], torch.cat(cz)[back], n_boot=n_boot, seed=seed)
        for t, (cs, cz) in zip(tallies, ce)
    ]
