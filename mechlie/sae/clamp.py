"""Setting SAE features, and whether the lie features cause the lie.

:class:`FeatureClamp`: an intervention for :func:`mechlie.core.hooks.steer` that ablates (sets to 0)
or clamps chosen features at the final position, keeping the SAE's reconstruction error, so only
those features' contributions change: ``x ← x + alpha · Σ_i (target_i − f_i(x)) W_dec[i]``.
:func:`causal_check` applies it to the top features on lying prompts and reports the change in
P(truth) beside many draws of random features of the same mean activation
(:func:`matched_random_features`, which :meth:`FeatureClamp.random_control` also draws from).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.core import hooks as core_hooks
from mechlie.core.hooks import SteeringState, check_alpha, check_policy
from mechlie.core.kv import Baseline, PrefixCache
from mechlie.core.pairs import AnswerSet, Batch, ContrastPair, answer_set, tokenize
from mechlie.sae.loading import SAEError, Site, check_sae, decoder_rows
from mechlie.sae.quality import bootstrap_ci

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureClamp:
    """Set SAE features to ``values`` (default 0: ablation) at the final position of each pass.

    The SAE's reconstruction error is kept: ``x ← x + alpha · Σ_i (values_i − f_i(x)) W_dec[i]``, so
    a feature that does not fire is not touched by ablation, and nothing else about ``x`` changes
    (``alpha = 1``, the default, sets the features exactly; :meth:`scaled` moves them part-way or
    beyond). Use with :func:`mechlie.core.hooks.steer`.
    """

    sae: SAE
    site: Site
    features: tuple[int, ...]
    values: Float[Tensor, " k"] | None = None
    policy: str = "all"
    alpha: float = 1.0

    def validate(self, model: HookedTransformer) -> None:
        check_sae(self.sae, model, self.site)
        check_policy(self.policy)
        check_alpha(self.alpha)
        if not self.features:
            raise SAEError("FeatureClamp needs at least one feature")
        bad = [f for f in self.features if not 0 <= f < self.sae.cfg.d_sae]
        if bad:
            raise SAEError(f"features {bad} out of range: the SAE has {self.sae.cfg.d_sae} features")
        if self.values is not None and self.values.shape != (len(self.features),):
            raise SAEError(f"values must have shape [{len(self.features)}], got {tuple(self.values.shape)}")

    def hooks(self, model: HookedTransformer, state: SteeringState) -> list[core_hooks.Hook]:
        dev = self.sae.W_dec.device
        feats = torch.tensor(self.features, device=dev)
        w = decoder_rows(self.sae)[feats]  # [k, d_in]
        target = (self.values if self.values is not None else torch.zeros(len(self.features))).float().to(dev)

        def hook(act: Tensor, hook) -> Tensor:
            if state.select(self.policy, act.shape[1]) is None:
                return act
            x = self.site.read(act)[:, -1:].float()  # the final position of this pass
            f = self.sae.encode(x.to(dev))[..., feats]
            new = x + (self.alpha * ((target - f) @ w)).to(x.device)
            full = self.site.read(act).clone().float()
            full[:, -1:] = new
            return self.site.write(act, full)

        return [(self.site.hook_name, hook)]

    @property
    def sites(self) -> tuple[core_hooks.Site, ...]:
        """Where it writes, as :class:`mechlie.core.hooks.Site` objects (final position). A site that
        reads every head of ``attn.hook_z`` depends on the model's head count: use :meth:`sites_in`."""
        return self.site.core_sites(positions="final")

    def sites_in(self, model: HookedTransformer) -> tuple[core_hooks.Site, ...]:
        """:attr:`sites`, every head named when the SAE reads all heads of ``attn.hook_z``."""
        return self.site.core_sites(n_heads=model.cfg.n_heads, positions="final")

    def scaled(self, alpha: float) -> "FeatureClamp":
        return replace(self, alpha=alpha)

    def random_control(
        self,
        seed: int = 0,
        model: HookedTransformer | None = None,
        *,
        mean_act: Float[Tensor, " d_sae"] | None = None,
        values_of: Float[Tensor, " d_sae"] | None = None,
        pool: int = 10,
    ) -> "FeatureClamp":
        """The same clamp on random features of the same count.

        With ``mean_act`` (each feature's mean activation), each feature is drawn among the ``pool``
        live features nearest in mean activation to the one it stands in for, exactly as one draw of
        :func:`causal_check`'s control (:func:`matched_random_features`); without it, uniformly among
        the features not chosen. ``values_of`` gives every feature's target (e.g. its honest mean), so
        a random feature is clamped to its own value; without it the targets stay as they are.
        """
        if mean_act is not None:
            feats = matched_random_features(mean_act, self.features, 1, pool=pool, seed=seed)[0]
        else:
            chosen = set(self.features)
            rest = [j for j in range(self.sae.cfg.d_sae) if j not in chosen]
            if len(rest) < len(self.features):
                raise SAEError(f"only {len(rest)} other features to draw {len(self.features)} random ones from")
            perm = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))
            feats = tuple(rest[int(i)] for i in perm[: len(self.features)])
        values = values_of[list(feats)].float() if values_of is not None else self.values
        return replace(self, features=tuple(int(f) for f in feats), values=values)


def matched_random_features(
    mean_act: Float[Tensor, " d_sae"],
    chosen: Sequence[int],
    n_draws: int,
    *,
    pool: int = 10,
    seed: int = 0,
) -> list[tuple[int, ...]]:
    """Random feature sets, each feature drawn among the ``pool`` live features whose mean
    activation is nearest that of the chosen feature it stands in for (never a chosen one)."""
    chosen_set = set(int(c) for c in chosen)
    live = [j for j in range(len(mean_act)) if mean_act[j] > 0 and j not in chosen_set]
    if len(live) < len(chosen) + 1:
        raise SAEError(f"only {len(live)} live features to draw random controls for {len(chosen)} features from")
    if len(live) < pool:
        log.info("random controls drawn from all %d live features (fewer than the pool of %d)", len(live), pool)
        pool = len(live)
    live_t = torch.tensor(live)
    cands = [live_t[(mean_act[live_t] - mean_act[c]).abs().argsort()[:pool]].tolist() for c in chosen]
    rng = random.Random(seed)
    draws = []
    for _ in range(n_draws):
        picked: list[int] = []
        for cs in cands:
            opts = [c for c in cs if c not in picked]
            picked.append(rng.choice(opts))
        draws.append(tuple(picked))
    return draws


@dataclass(frozen=True)
class PromptGroup:
    """Lying prompts run once: their prefix cache and the plain residual of their final token."""

    index: Int[Tensor, " m"]  # which pairs (positions in LyingPrompts.pairs)
    batch: Batch
    cache: PrefixCache
    baseline: Baseline


@dataclass(frozen=True)
class LyingPrompts:
    """What every :func:`causal_check` on the same pairs shares, whatever the SAE, site or mode:
    the lying prompts' prefix caches and plain final-token residuals (in groups of prompts, for
    memory), and P(truth) on the honest prompts (the scale of the gap). Made by :func:`lying_prompts`."""

    pairs: tuple[ContrastPair, ...]
    answers: AnswerSet
    groups: tuple[PromptGroup, ...]
    p_honest: Float[Tensor, " n"]


@torch.no_grad()
def lying_prompts(model: HookedTransformer, pairs: Sequence[ContrastPair], batch_size: int = 16) -> LyingPrompts:
    """Run ``pairs``' lying prompts once (prefix caches, baseline residuals) and their honest prompts
    (P(truth)), for any number of :func:`causal_check` calls on the same pairs."""
    from mechlie.core.kv import baseline_inputs, final_tokens, prefix_cache
    from mechlie.core.metrics import final_logits, score_logits

    answers = answer_set(model.tokenizer, pairs)
    groups = []
    for s0 in range(0, len(pairs), batch_size * 8):  # prompts per prefix cache (memory)
        index = torch.arange(s0, min(len(pairs), s0 + batch_size * 8))
        batch = tokenize(model, [pairs[i].lying for i in index.tolist()])
        cache = prefix_cache(model, batch)
        groups.append(PromptGroup(index, batch, cache, baseline_inputs(model, cache, final_tokens(batch))))
    p_honest = score_logits(final_logits(model, [p.honest for p in pairs], batch_size=batch_size), answers).p_truth
    return LyingPrompts(tuple(pairs), answers, tuple(groups), p_honest)


@dataclass(frozen=True)
class CausalCheck:
    mode: str  # "ablate" (features set to 0) or "clamp" (set to their mean on honest prompts)
    features: tuple[int, ...]
    p_truth_base: float  # mean P(truth) on the lying prompts, no intervention
    p_truth_honest: float  # the same facts' honest prompts, for scale
    delta: float  # mean change in P(truth) when the top features are set
    delta_lo: float  # 95% bootstrap CI over pairs
    delta_hi: float
    gap_recovered: float  # delta / (honest − lying): the share of the honest–lying gap in P(truth)
    gap_recovered_lo: float  # 95% bootstrap CI over pairs (the ratio recomputed on each resample)
    gap_recovered_hi: float
    random_deltas: list[float]  # mean change for each draw of matched random features
    random_q95: float  # 95th percentile of the random draws
    p_value: float  # share of random draws whose mean change is >= delta ((1 + count) / (1 + draws))
    n_pairs: int


def _row_clamp_hook(sae: SAE, site: Site, feats: Int[Tensor, "R k"], targets: Float[Tensor, "R k"], active: Tensor):
    """:class:`FeatureClamp` with its own feature set per row (one pass for many draws): row ``r``
    sets ``feats[r]`` to ``targets[r]`` at the final position when ``active[r]``, else is untouched."""
    dev = sae.W_dec.device
    w = decoder_rows(sae)
    feats, targets, active = feats.to(dev), targets.float().to(dev), active.to(dev)

    def hook(act: Tensor, hook) -> Tensor:
        x = site.read(act)[:, -1].float()  # [R, d_in]
        f = sae.encode(x.to(dev)).gather(1, feats)  # [R, k]
        delta = ((targets - f)[..., None] * w[feats]).sum(1) * active[:, None]
        full = site.read(act).clone().float()
        full[:, -1] += delta.to(full.device)
        return site.write(act, full)

    return hook


@torch.no_grad()
def causal_check(
    model: HookedTransformer,
    sae: SAE,
    site: Site,
    pairs: Sequence[ContrastPair],
    features: Sequence[int],
    *,
    mode: Literal["ablate", "clamp"] = "ablate",
    n_draws: int = 100,
    honest_mean: Float[Tensor, " d_sae"] | None = None,
    lying_mean: Float[Tensor, " d_sae"],
    batch_size: int = 16,
    max_rows: int = 512,
    n_boot: int = 1000,
    seed: int = 0,
    prompts: LyingPrompts | None = None,
) -> CausalCheck:
    """Change in P(truth) on the lying prompts of ``pairs`` when ``features`` are ablated or
    clamped at the final position, beside ``n_draws`` sets of random features whose mean
    activation on lying prompts (``lying_mean``, from other pairs) matches theirs.

    ``mode="clamp"`` sets each feature to ``honest_mean`` (its mean on honest prompts, from
    training pairs). Only the final position changes, so each lying prompt's prefix is run once
    (:func:`mechlie.core.kv.prefix_cache`), and every variant (no change, the top features, each random
    draw) is a row of a few short passes (:func:`mechlie.core.kv.run_rows`) that start at the site's
    block; the rows' hook is :class:`FeatureClamp`'s, with one feature set per row. ``prompts``
    (:func:`lying_prompts` of the same ``pairs``) shares that work between checks; the numbers are
    the same with or without it.
    """
    if mode not in ("ablate", "clamp"):
        raise SAEError(f"mode must be 'ablate' or 'clamp', got {mode!r}")
    if mode == "clamp" and honest_mean is None:
        raise SAEError("mode='clamp' needs honest_mean")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    check_sae(sae, model, site)
    if prompts is None:
        prompts = lying_prompts(model, pairs, batch_size)
    elif [p.lying for p in prompts.pairs] != [p.lying for p in pairs]:
        raise SAEError("prompts were made from other pairs than the ones checked: pass lying_prompts(model, pairs)")
    # variant 0: no change; 1: the top features; 2..: random draws
    sets = [tuple(int(f) for f in features), *matched_random_features(lying_mean, features, n_draws, seed=seed)]
    k = len(sets[0])
    n = len(pairs)
    feat_of = torch.tensor([sets[0], *sets], dtype=torch.long)  # [V, k]; row 0 is a placeholder
    value_of = honest_mean[feat_of].float() if mode == "clamp" else torch.zeros(len(feat_of), k)
    active_of = torch.arange(len(feat_of)) > 0
    p_truth = _variant_p_truth(
        model, sae, site, prompts, feat_of, value_of, active_of, max_rows=max_rows, desc=f"causal rows ({mode})"
    )
    base, top = p_truth[0], p_truth[1]
    p_honest = prompts.p_honest  # the honest prompts, no intervention: the scale of the gap
    est = bootstrap_ci(lambda i: (top[i] - base[i]).mean(), n, n_boot=n_boot, seed=seed)  # the share: same draws
    share = bootstrap_ci(lambda i: (top - base)[i].mean() / (p_honest - base)[i].mean(), n, n_boot=n_boot, seed=seed)
    r = (p_truth[2:] - base).mean(1)
    gap = float(p_honest.mean() - base.mean())
    return CausalCheck(
        mode=mode,
        features=tuple(int(f) for f in features),
        p_truth_base=float(base.mean()),
        p_truth_honest=float(p_honest.mean()),
        delta=est[0],
        delta_lo=est[1],
        delta_hi=est[2],
        gap_recovered=est[0] / gap if gap != 0 else float("nan"),
        gap_recovered_lo=share[1],
        gap_recovered_hi=share[2],
        random_deltas=r.tolist(),
        random_q95=float(torch.quantile(r, 0.95)),
        p_value=float((1 + (r >= est[0]).sum()) / (1 + len(r))),
        n_pairs=n,
    )


@torch.no_grad()
def _variant_p_truth(
    model: HookedTransformer,
    sae: SAE,
    site: Site,
    prompts: LyingPrompts,
    feat_of: Int[Tensor, "V k"],
    value_of: Float[Tensor, "V k"],
    active_of: Tensor,
    *,
    max_rows: int,
    desc: str,
) -> Float[Tensor, "V n"]:
    """P(truth) on each pair's lying prompt under each variant ``v`` (``feat_of[v]`` set to
    ``value_of[v]`` when ``active_of[v]``): rows of at most ``max_rows`` (variant-major, prompts
    inside) run from the site's block over each group's cached prefix."""
    from mechlie.core.kv import run_rows
    from mechlie.core.metrics import score_logits

    answers = prompts.answers
    p_truth = torch.empty(len(feat_of), len(prompts.pairs))
    for g in prompts.groups:
        m = len(g.index)
        per_chunk = max(1, max_rows // m)
        starts = range(0, len(feat_of), per_chunk)
        for v0 in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 3):
            vs = torch.arange(v0, min(len(feat_of), v0 + per_chunk))
            v_row = vs.repeat_interleave(m)  # rows: variant-major, prompts inside
            prompt = torch.arange(m).repeat(len(vs))
            hook = _row_clamp_hook(sae, site, feat_of[v_row], value_of[v_row], active_of[v_row])
            logits = run_rows(
                model,
                g.cache,
                prompt,
                g.batch.tokens[prompt, -1:],
                fwd_hooks=[(site.hook_name, hook)],
                start_layers=torch.full((len(prompt),), site.layer, dtype=torch.long),
                baseline=g.baseline,
            )[:, -1]
            idx = g.index[prompt]  # the pair of each row
            rows_ans = AnswerSet(*(t[idx] for t in (answers.truth, answers.lie, answers.choices)))
            p_truth[v_row, idx] = score_logits(logits.cpu(), rows_ans).p_truth.cpu()
    return p_truth
