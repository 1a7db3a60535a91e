"""SAE features of the lies the model actually tells: sampled lies vs truths under one lying prompt.

The states come from :func:`mechlie.read.labels.on_policy` (the first answer token of each sampled
answer); :func:`on_policy_effects` applies :func:`mechlie.sae.features.feature_effects` to them with
the pair (fact) as the unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from mechlie.sae.features import feature_effects
from mechlie.sae.loading import SAEError, Site, decoder_rows, encode
from mechlie.sae.quality import bootstrap_ci


def site_kind(site: Site) -> str:
    """The :mod:`mechlie.core.hooks` activation kind whose hook is ``site``'s (for :mod:`mechlie.read.labels`)."""
    try:
        return site.kind
    except SAEError:
        raise SAEError(f"site {site}: no activation kind reads this hook (on-policy states need one)") from None


@dataclass(frozen=True)
class OnPolicySiteActs:
    """The site at the first answer token of each sampled answer to a lying prompt that is a lie or
    the truth (answers of facts the model does not know, or cut short, are left out)."""

    acts: Float[Tensor, "m d_in"]
    lie: Tensor  # [m] bool: the sampled answer is a lie (else the truth, under the lying framing)
    pair: Int[Tensor, " m"]  # the pair (index into OnPolicy.pairs) of each row


def on_policy_site_acts(op, site: Site) -> OnPolicySiteActs:
    """Rows of :class:`OnPolicySiteActs` from a :class:`mechlie.read.labels.OnPolicy` with sampled answers
    whose states include ``site`` (``on_policy(..., kinds=[site_kind(site)], layers=[site.layer])``)."""
    if op.samples is None or op.k < 1:
        raise SAEError("on-policy features need sampled answers (on_policy(..., k >= 1))")
    kind = site_kind(site)
    if kind not in op.samples.states or site.layer not in op.samples.layers:
        raise SAEError(f"the on-policy states hold no {kind} at layer {site.layer} (site {site})")
    st = op.samples.states[kind]
    labs = op.sample_labels
    if st.shape[1] < 2:  # every answer stopped after one token: no answer-token state
        idx: list[int] = []
    else:
        ok = op.samples.new_mask[:, 1].bool().tolist()
        idx = [i for i, lab in enumerate(labs) if lab in ("lie", "truth_under_lie_framing") and ok[i]]
    a = st[idx, 1, op.samples.layers.index(site.layer)] if idx else st.new_zeros((0, *st.shape[3:]))
    if site.is_z:
        a = a[:, site.head] if site.head is not None else a.flatten(1)
    return OnPolicySiteActs(
        a.float(),
        torch.tensor([labs[i] == "lie" for i in idx], dtype=torch.bool),
        torch.tensor(idx, dtype=torch.long) // op.k,
    )


def on_policy_effects(
    sae: SAE,
    rows: OnPolicySiteActs,
    train: Sequence[int],
    test: Sequence[int],
    *,
    framing_features: Sequence[int] = (),
    k: int = 10,
    min_pairs: int = 4,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Features of on-policy lies vs truths sampled under the same lying prompt.

    The unit is the pair (fact): a pair counts when its samples hold at least one lie and one
    truth; its lie and truth are the means of its lie and truth samples' features, so
    :func:`feature_effects` applies unchanged (lie − truth, features ranked on ``train`` pairs,
    reported on ``test`` pairs, bootstrap CIs over test pairs, the null of the max over label swaps).
    ``framing_features`` (the honest-vs-lying prompt features) are also reported on the test pairs:
    do the lie direction's features separate the answers the model actually gives?

    The state is the first answer token's: the sampled lie and truth are different tokens there,
    so a feature can separate them by the token alone (a confound this contrast cannot remove).

    Returns:
        A JSON-able dict: counts always; ``features`` and ``framing_features`` when there are at
        least ``min_pairs`` such pairs on each side of the split, else ``too_few`` says so.
    """
    pairs_all = sorted(set(rows.pair.tolist()))
    mixed = [p for p in pairs_all if rows.lie[rows.pair == p].any() and (~rows.lie[rows.pair == p]).any()]
    train_set, test_set = set(int(i) for i in train), set(int(i) for i in test)
    tr = [j for j, p in enumerate(mixed) if p in train_set]
    te = [j for j, p in enumerate(mixed) if p in test_set]
    out: dict = {
        "n_samples": int(len(rows.lie)),
        "n_lie": int(rows.lie.sum()),
        "n_truth": int((~rows.lie).sum()),
        "n_pairs_sampled": len(pairs_all),
        "n_pairs_with_both": len(mixed),
        "n_train": len(tr),
        "n_test": len(te),
    }
    if len(tr) < min_pairs or len(te) < min_pairs:
        out["too_few"] = (
            f"only {len(tr)} train / {len(te)} test pairs have both a sampled lie and a sampled truth "
            f"(need {min_pairs} each): no on-policy decomposition"
        )
        return out
    f = encode(sae, rows.acts)
    lie_f = torch.stack([f[(rows.pair == p) & rows.lie].mean(0) for p in mixed])
    truth_f = torch.stack([f[(rows.pair == p) & ~rows.lie].mean(0) for p in mixed])
    x_l = torch.stack([rows.acts[(rows.pair == p) & rows.lie].mean(0) for p in mixed])
    x_t = torch.stack([rows.acts[(rows.pair == p) & ~rows.lie].mean(0) for p in mixed])
    direction = x_l[tr].mean(0) - x_t[tr].mean(0)
    w_dec = decoder_rows(sae).float().cpu()
    fe = feature_effects(truth_f, lie_f, direction, w_dec, tr, te, k=k, n_boot=n_boot, seed=seed)
    out["features"] = fe.rows()
    out["null_max_diff"] = fe.null_max
    out["cosine_max_null"] = fe.direction_cosine_max_null
    d_te = (lie_f - truth_f)[te]
    fr = []
    for feat in framing_features:
        col = d_te[:, int(feat)]
        est = bootstrap_ci(lambda i, col=col: col[i].mean(), len(te), n_boot=n_boot, seed=seed)
        fr.append({"feature": int(feat), "diff": est[0], "lo": est[1], "hi": est[2]})
    out["framing_features"] = fr
    return out
