"""Rank components by how much their output differs between honest and lying runs, then check the
ranking causally.

**Difference score** of a component (each head's ``head_out``, each layer's ``mlp_out`` and
``attn_out``) at the final position, over pairs:

    ``score = ||mean(lying) - mean(honest)|| / sqrt(tr(pooled covariance))``

with the pooled covariance the average of the two groups' covariances, so ``tr`` is the summed
per-dimension variance (the squared "pooled std norm"). It is a multivariate Cohen's d that
ignores correlations between dimensions: scale-free, so a head that writes large vectors is not
ranked high merely for its scale, and a difference counts only relative to the spread of that
component's own output across prompts.

**Causal effect**: the normalized logit-difference effect of patching that component from honest
into lying at the final position (:func:`mechlie.causal.patching.patch_final_position`; heads are
patched through their ``hook_z``). Components are compared on ``|effect|`` (either sign means the
component matters), within each family (heads; MLPs; attention layers), by Spearman correlation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from jaxtyping import Float
from torch import Tensor

from mechlie.causal.effects import top_k_components
from mechlie.causal.patching import PatchResult, patch_final_position
from mechlie.core.activations import collect
from mechlie.core.pairs import ContrastPair, PairError
from mechlie.core.stats import spearman

FAMILIES = {"head": ("head_out", "z"), "mlp": ("mlp_out", "mlp_out"), "attn": ("attn_out", "attn_out")}


def difference_scores(honest: Float[Tensor, "n *c d"], lying: Float[Tensor, "n *c d"]) -> Float[Tensor, "*c"]:
    """``||mean diff|| / sqrt(mean of the two groups' total variances)`` per component."""
    if honest.shape[1:] != lying.shape[1:] or len(honest) < 2 or len(lying) < 2:
        raise ValueError("need at least 2 prompts per group and matching component shapes")
    h, li = honest.double(), lying.double()
    diff = (li.mean(0) - h.mean(0)).norm(dim=-1)
    pooled = 0.5 * (h.var(0, unbiased=True).sum(-1) + li.var(0, unbiased=True).sum(-1))
    return (diff / pooled.sqrt().clamp_min(1e-12)).float()


@dataclass(frozen=True)
class FamilyRanking:
    family: str  # "head", "mlp" or "attn"
    score: Float[Tensor, "*c"]  # difference score, [L, H] for heads, [L] otherwise
    effect: Float[Tensor, "*c"]  # normalized patching effect (logit_diff)
    spearman: float  # score vs |effect|
    top_by_score: tuple[tuple[int, ...], ...]  # indices, best first
    top_by_effect: tuple[tuple[int, ...], ...]

    def overlap(self) -> int:
        return len(set(self.top_by_score) & set(self.top_by_effect))


def rank_family(family: str, score: Tensor, effect: Tensor, top_k: int = 10) -> FamilyRanking:
    k = min(top_k, score.numel())
    return FamilyRanking(
        family,
        score,
        effect,
        spearman(score, effect.abs()),
        top_k_components(score, k),
        top_k_components(effect.abs(), k),
    )


def rank_components(
    model,
    pairs: Sequence[ContrastPair],
    *,
    top_k: int = 10,
    batch_size: int = 16,
    progress: bool = True,
    patches: dict[str, PatchResult] | None = None,
) -> dict[str, FamilyRanking]:
    """Difference scores and patching effects for heads, MLPs and attention layers.

    ``patches`` may pass already computed :class:`PatchResult` s (keyed ``"z"``, ``"mlp_out"``,
    ``"attn_out"``) on the same pairs, to avoid patching twice.
    """
    if len(pairs) < 2:
        raise PairError("need at least 2 pairs to estimate variances")
    kinds = ["head_out"] + (["mlp_out"] if not model.cfg.attn_only else []) + ["attn_out"]
    kw = dict(kinds=tuple(kinds), batch_size=batch_size, progress=progress)
    honest = collect(model, [p.honest for p in pairs], desc="honest", **kw)
    lying = collect(model, [p.lying for p in pairs], desc="lying", **kw)
    patches = dict(patches or {})
    out = {}
    for family, (act_kind, patch_kind) in FAMILIES.items():
        if act_kind not in kinds:
            continue
        if patch_kind not in patches:
            patches[patch_kind] = patch_final_position(
                model, pairs, patch_kind, batch_size=batch_size, progress=progress
            )
        score = difference_scores(honest[act_kind], lying[act_kind])
        out[family] = rank_family(family, score, patches[patch_kind].effect("logit_diff"), top_k)
    return out
