"""The lie direction, feature by feature.

An SAE (Bricken et al. 2023, "Towards Monosemanticity"; Cunningham et al. 2023) rewrites an
activation ``x`` at one hook as a sparse sum of learned decoder rows,
``x ≈ b_dec + Σ_i f_i(x) W_dec[i]``.

:func:`feature_effects`: the lie direction decomposed. The features whose activation at the final
prompt token differs most between the lying and honest prompt of a pair (lying − honest, so a
positive difference is a "lying" feature), chosen on the training facts and reported on held-out
facts with bootstrap CIs over pairs, next to the null of the largest difference when the labels are
swapped within pairs; and the cosine of each decoder row with the difference-of-means direction
(honest → lying) of the site. :func:`lie_features` runs the whole decomposition at one site: the
effects, where each feature fires in the corpus and in the pairs, and the causal check
(:func:`mechlie.sae.clamp.causal_check`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.core.pairs import ContrastPair, tokenize
from mechlie.core.stats import bootstrap_tensor, max_null_threshold, paired_swap_masks
from mechlie.sae.clamp import CausalCheck, LyingPrompts, causal_check, lying_prompts
from mechlie.sae.corpus import SiteActs, collect_site, final_acts
from mechlie.sae.loading import SAEError, decoder_rows, encode, feature_columns
from mechlie.sae.training import TrainedSAE


@dataclass(frozen=True)
class FeatureEffects:
    """Top features by lying − honest activation, chosen on train pairs, reported on test pairs."""

    features: Int[Tensor, " k"]
    diff: Float[Tensor, " k"]  # mean over test pairs of f(lying) − f(honest)
    lo: Float[Tensor, " k"]  # 95% bootstrap CI over test pairs
    hi: Float[Tensor, " k"]
    honest_mean: Float[Tensor, " k"]
    lying_mean: Float[Tensor, " k"]
    effect_size: Float[Tensor, " k"]  # diff / std of the per-pair differences (paired Cohen's d)
    cosine: Float[Tensor, " k"]  # cos(W_dec[feature], diff-of-means direction of the site)
    train_diff: Float[Tensor, " k"]
    null_max: float  # 95th pct. of max_j |mean diff_j| with labels swapped within test pairs
    direction_cosine_max_null: float  # 95th pct. of max |cos| of a random direction with all rows
    n_test: int

    def rows(self) -> list[dict]:
        return [
            {
                "feature": int(f),
                "diff": float(d),
                "lo": float(a),
                "hi": float(b),
                "honest_mean": float(h),
                "lying_mean": float(l),
                "effect_size": float(e),
                "cosine": float(c),
                "train_diff": float(t),
            }
            for f, d, a, b, h, l, e, c, t in zip(
                self.features,
                self.diff,
                self.lo,
                self.hi,
                self.honest_mean,
                self.lying_mean,
                self.effect_size,
                self.cosine,
                self.train_diff,
            )
        ]


def feature_effects(
    honest_f: Float[Tensor, "n d_sae"],
    lying_f: Float[Tensor, "n d_sae"],
    direction: Float[Tensor, " d_in"],
    W_dec: Float[Tensor, "d_sae d_in"],
    train: Sequence[int],
    test: Sequence[int],
    *,
    k: int = 10,
    n_boot: int = 1000,
    n_null: int = 1000,
    seed: int = 0,
) -> FeatureEffects:
    """Decompose the lie direction into SAE features (see the module docstring).

    Features are ranked by |mean(lying − honest)| on the ``train`` pairs and reported on the
    ``test`` pairs (never used to choose them). ``direction`` is the difference-of-means direction
    (honest → lying) of the SAE's input at the same site.
    """
    tr, te = torch.as_tensor(list(train)), torch.as_tensor(list(test))
    if len(tr) < 2 or len(te) < 2:
        raise SAEError("feature_effects needs at least 2 train and 2 test pairs")
    if honest_f.shape != lying_f.shape or honest_f.shape[1] != W_dec.shape[0]:
        raise SAEError(
            f"feature shapes differ: honest {tuple(honest_f.shape)}, lying {tuple(lying_f.shape)}, "
            f"W_dec {tuple(W_dec.shape)}"
        )
    d = (lying_f - honest_f).float()
    train_mean = d[tr].mean(0)
    top = train_mean.abs().argsort(descending=True)[: min(k, d.shape[1])]
    dt = d[te][:, top]
    ci = bootstrap_tensor(lambda i: dt[i].mean(0), len(te), n_boot=n_boot, seed=seed)
    lo, hi = ci.lo, ci.hi
    # Null of the largest |mean difference| over all features when honest/lying are swapped
    # within test pairs (a sign flip of those pairs' differences).
    signs = 1 - 2 * paired_swap_masks(len(te), n_null, seed).float()
    null = (signs @ d[te]).abs() / len(te)  # [draws, d_sae]
    g = torch.Generator().manual_seed(seed)
    w = W_dec.float()
    u = direction.float() / direction.float().norm().clamp_min(1e-12)
    cos = (w @ u) / w.norm(dim=-1).clamp_min(1e-12)
    rand = torch.randn(200, w.shape[1], generator=g)
    rand_cos = (rand / rand.norm(dim=-1, keepdim=True)) @ (w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T
    return FeatureEffects(
        features=top,
        diff=dt.mean(0),
        lo=lo,
        hi=hi,
        honest_mean=honest_f[te][:, top].mean(0),
        lying_mean=lying_f[te][:, top].mean(0),
        effect_size=dt.mean(0) / dt.std(0).clamp_min(1e-8),
        cosine=cos[top],
        train_diff=train_mean[top],
        null_max=max_null_threshold(null),
        direction_cosine_max_null=float(torch.quantile(rand_cos.abs().max(-1).values, 0.95)),
        n_test=len(te),
    )


@torch.no_grad()
def top_contexts(
    model: HookedTransformer,
    feats: Float[Tensor, "tok k"],
    acts: SiteActs,
    texts: Sequence[str],
    *,
    n: int = 5,
    width: int = 10,
) -> list[list[dict]]:
    """For each column of ``feats`` (rows = ``acts``'s tokens), the ``n`` corpus tokens where it
    fires most, with the ``width`` tokens before it; the firing token is shown in ``[[ ]]``."""
    tok = model.tokenizer
    ids_of: dict[int, list[int]] = {}
    out = []
    for j in range(feats.shape[1]):
        vals, idx = feats[:, j].topk(min(n, len(feats)))
        rows = []
        for v, i in zip(vals.tolist(), idx.tolist()):
            if v <= 0:
                break
            line, pos = int(acts.line[i]), int(acts.pos[i])
            if line not in ids_of:  # the same tokens collect_site saw (BOS included when the model adds one)
                ids_of[line] = tokenize(model, [texts[line]]).tokens[0].tolist()
            ids = ids_of[line]
            word = tok.decode(ids[pos : pos + 1])
            rows.append(
                {
                    "act": v,
                    "line": line,
                    "pos": pos,
                    "token": word,
                    "context": f"{tok.decode(ids[max(0, pos - width) : pos])}[[{word}]]",
                }
            )
        out.append(rows)
    return out


def pair_contexts(
    honest_f: Float[Tensor, "n k"],
    lying_f: Float[Tensor, "n k"],
    pairs: Sequence[ContrastPair],
    *,
    n: int = 3,
) -> list[list[dict]]:
    """For each feature (column), the ``n`` pair prompts (either side) whose final token it fires on most."""
    both = torch.cat([honest_f, lying_f])  # rows: honest prompts, then lying prompts
    out = []
    for j in range(both.shape[1]):
        vals, idx = both[:, j].topk(min(n, len(both)))
        out.append(
            [
                {
                    "act": float(v),
                    "side": "honest" if i < len(pairs) else "lying",
                    "fact": pairs[i % len(pairs)].fact_id,
                    "question": pairs[i % len(pairs)].question,
                }
                for v, i in zip(vals.tolist(), idx.tolist())
                if v > 0
            ]
        )
    return out


def lie_features(
    model: HookedTransformer,
    trained: TrainedSAE,
    pairs: Sequence[ContrastPair],
    train: Sequence[int],
    test: Sequence[int],
    *,
    final: tuple[Tensor, Tensor] | None = None,
    k: int = 10,
    k_causal: int = 5,
    n_draws: int = 100,
    n_contexts: int = 5,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 16,
    prompts: LyingPrompts | None = None,
) -> tuple[dict, dict[str, Tensor]]:
    """The whole decomposition of the lie direction at one SAE's site (see the module docstring):
    ``(summary, tensors)``, JSON-able results and the per-pair activations of the top features.

    Args:
        trained: from :func:`load_or_train_sae` (or wrap a loaded SAE in a :class:`TrainedSAE`).
        pairs: (honest, lying) pairs; ``train`` / ``test`` index them (split by fact).
        final: the site's (honest, lying) final-token activations, if already collected.
        k: features reported; ``k_causal``: top "lying" features (positive train difference)
            ablated, and top features clamped to their honest mean, in the causal check.
        n_draws: random matched feature sets for the causal control; ``n_contexts``: top corpus
            and pair contexts per feature (0: none, as a replicate on another split needs).
        prompts: :func:`mechlie.sae.clamp.lying_prompts` of the ``test`` pairs, to share between calls.
    """
    sae, site = trained.sae, trained.site
    if final is None:
        final = (
            final_acts(model, [p.honest for p in pairs], site, batch_size=batch_size),
            final_acts(model, [p.lying for p in pairs], site, batch_size=batch_size),
        )
    x_h, x_l = final
    f_h, f_l = encode(sae, x_h), encode(sae, x_l)
    tr = torch.as_tensor(list(train))
    direction = x_l[tr].mean(0) - x_h[tr].mean(0)
    w_dec = decoder_rows(sae).float().cpu()
    fe = feature_effects(f_h, f_l, direction, w_dec, train, test, k=k, seed=seed)
    feats = fe.features.tolist()
    # How much of the diff-of-means direction the SAE's features carry: the direction's
    # reconstruction through the mean feature difference, on the training pairs.
    honest_mean, lying_mean = f_h[tr].mean(0), f_l[tr].mean(0)
    train_diff = lying_mean - honest_mean
    dir_cos_recon = float(torch.nn.functional.cosine_similarity(train_diff @ w_dec, direction, dim=0))
    args = (honest_mean, lying_mean, feats, k_causal, n_draws, batch_size, seed, prompts)
    checks = _causal_checks(model, trained, [pairs[i] for i in test], *args)
    rows = fe.rows()
    if n_contexts:
        found = corpus_contexts(model, trained, feats, n=n_contexts, batch_size=batch_size, progress=progress)
        for r, c, pc in zip(rows, found, pair_contexts(f_h[:, feats], f_l[:, feats], pairs)):
            r["corpus_contexts"], r["pair_contexts"] = c, pc
    summary = {
        "site": str(site),
        "d_sae": sae.cfg.d_sae,
        "sae_path": str(trained.path),
        "sae": trained.info,
        "n_pairs": len(pairs),
        "n_train": len(train),
        "n_test": len(test),
        "features": rows,
        "null_max_diff": fe.null_max,
        "cosine_max_null": fe.direction_cosine_max_null,
        "direction_norm": float(direction.norm()),
        "direction_recon_cosine": dir_cos_recon,
        "live_on_pairs": int(((f_h > 0) | (f_l > 0)).any(0).sum()),
        "causal": {m: asdict(c) for m, c in checks.items()},
    }
    tensors = {
        "honest": f_h[:, feats],
        "lying": f_l[:, feats],
        "features": fe.features,
        "cosine_all": (w_dec @ (direction / direction.norm())) / w_dec.norm(dim=-1).clamp_min(1e-12),
        "diff_train_all": train_diff,
    }
    return summary, tensors


def corpus_contexts(
    model: HookedTransformer,
    trained: TrainedSAE,
    features: Sequence[int],
    *,
    n: int = 5,
    batch_size: int = 16,
    progress: bool = True,
) -> list[list[dict]]:
    """:func:`top_contexts` of ``features`` over the corpus lines the SAE was trained on (their
    activations collected again if the SAE came from the cache)."""
    corpus_acts = trained.acts
    if corpus_acts is None:
        train_lines = sorted(set(range(len(trained.corpus.texts))) - set(trained.eval_lines))
        a = collect_site(
            model,
            [trained.corpus.texts[i] for i in train_lines],
            trained.site,
            batch_size=batch_size,
            progress=progress,
        )
        corpus_acts = SiteActs(a.acts, torch.as_tensor(train_lines)[a.line], a.pos)
    cols = feature_columns(trained.sae, corpus_acts.acts, features)
    return top_contexts(model, cols, corpus_acts, trained.corpus.texts, n=n)


def _causal_checks(
    model: HookedTransformer,
    trained: TrainedSAE,
    test_pairs: Sequence[ContrastPair],
    honest_mean: Float[Tensor, " d_sae"],
    lying_mean: Float[Tensor, " d_sae"],
    feats: list[int],
    k_causal: int,
    n_draws: int,
    batch_size: int,
    seed: int,
    prompts: LyingPrompts | None,
) -> dict[str, CausalCheck]:
    """:func:`causal_check` of ablating the ``k_causal`` features with the largest positive train
    difference (skipped when none is positive), and of clamping the first ``k_causal`` of ``feats``
    (the top features by |train difference|) to their honest mean."""
    train_diff = lying_mean - honest_mean
    lying_feats = [f for f in train_diff.argsort(descending=True)[:k_causal].tolist() if train_diff[f] > 0]
    both = dict(honest_mean=honest_mean, lying_mean=lying_mean, n_draws=n_draws, batch_size=batch_size, seed=seed)
    both["prompts"] = prompts or lying_prompts(model, test_pairs, batch_size)  # both modes share one run
    return {
        mode: causal_check(model, trained.sae, trained.site, test_pairs, chosen, mode=mode, **both)
        for mode, chosen in (("ablate", lying_feats), ("clamp", feats[:k_causal]))
        if chosen or mode == "clamp"
    }
