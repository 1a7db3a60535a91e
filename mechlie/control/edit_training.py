"""How the learned edits of :mod:`mechlie.control.learned` are trained (the objective is stated in
:mod:`mechlie.control.edits`): prompts tokenized and frozen blocks run once (:func:`_setup`), then
Adam with one scale per tensor on ``task + lam * KL_neutral`` (:func:`_optimise`), and with
a KL budget, dual ascent on ``lam`` and a final projection onto the budget.

``task`` is ``TrainConfig.objective`` (:data:`OBJECTIVES`): ``"truth"``, ``-log P(truth)`` on the lying
prompts (what the edit reports, and so what it can overfit: "answer with a place here"), or
``"honest_kl"``, the KL from the honest run of the same fact to the edited lying run at the final
position (it rewards behaving as the model does when honest, whatever the answer token), or
``"honest_resid"`` (ReFT-like), the distance of the edited lying run's residual at the deepest edited
block to the honest run's, run only that far (a low-rank edit of ``resid_post`` trained on it is
LoReFT's ``h + R^T(Wh + b - Rh)`` without R's orthonormality: ``A = (W - R)^T``, ``c = b``, ``B = R``). With
``TrainConfig.prompts = "honest"`` the edit is trained on the *honest* prompts instead: the
honest-only control, which can only sharpen answers the model already gives truthfully; a method is
about honesty only where it beats this control.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.control.learned import COMPONENTS, Edit, GatedVector, LearnedVector, LowRankEdit, soft_gate
from mechlie.core.hooks import Hook, Site, SteeringError, SteeringState, check_layer, hook_name
from mechlie.core.metrics import final_resid_hook, gather_logprob, logits_from_resid
from mechlie.core.models import model_id
from mechlie.core.pairs import ContrastPair, PairError, answer_set, tokenize

log = logging.getLogger("mechlie")


OBJECTIVES: dict[str, str] = {
    "truth": "-log P(truth) at the final prompt position (the training answers' own token)",
    "honest_kl": "KL(p_honest_run || p_edited) at the final prompt position: the edited lying run is pulled "
    "onto the honest run's whole next-token distribution of the same fact, not onto one answer token",
    "honest_resid": "ReFT-like: squared distance of the edited lying run's resid_post at the deepest edited block "
    "(final position) to the honest run's, over the unedited distance: it maps representations, not answers",
}


@dataclass(frozen=True)
class TrainConfig:
    """How a learned edit is trained. ``lam``: KL weight (the penalty); ``kl_budget``: if set, KL on
    the training neutral lines is held at or under it (dual ascent on ``lam``, then a projection).

    Cost (see ``benchmarks/bench_edits.py``): each step runs ``batch_size`` lying prompts and
    ``neutral_per_step`` neutral lines (minibatches drawn from seeded permutations; ``None`` = all
    lines every step), forward and backward. With ``skip_frozen`` the blocks below the first edited
    block run once, before training: their output cannot depend on the edit, so each step starts
    from that cached residual (``start_at_layer``) and gives the same numbers as a full forward.
    The final projection and the recorded ``train_kl`` always use *all* training neutral lines.
    """

    lam: float = 1.0
    kl_budget: float | None = None
    steps: int = 40
    lr: float = 0.05  # step (RMS per coordinate), as a fraction of the typical residual norm / sqrt(d_model)
    batch_size: int = 8  # lying prompts per step
    neutral_per_step: int | None = 8  # neutral lines per step (None = every line, every step)
    skip_frozen: bool = True  # start each step's forward at the first edited block (cached input)
    max_pairs: int | None = None  # training pairs used (None = all)
    seed: int = 0
    progress: bool = True
    objective: str = "truth"  # one of OBJECTIVES: what the edit is trained to raise (see OBJECTIVES)
    prompts: str = "lying"  # "lying"; "honest" trains the honest-only control (see train_vector)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {self.objective!r}")
        if self.prompts not in ("lying", "honest"):
            raise ValueError(f"prompts must be 'lying' or 'honest', got {self.prompts!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam (the KL penalty) must be a finite number >= 0, got {self.lam!r}")
        if self.kl_budget is not None and not (math.isfinite(self.kl_budget) and self.kl_budget > 0):
            raise ValueError(f"kl_budget must be > 0 (nats per token), got {self.kl_budget!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.neutral_per_step is not None and self.neutral_per_step < 1:
            raise ValueError(f"neutral_per_step must be >= 1 or None (all lines), got {self.neutral_per_step}")


@dataclass
class _Rows:
    """Prompts tokenized once (left-padded), with their residual input to block ``start`` when the
    frozen blocks below it are skipped."""

    tokens: Tensor
    mask: Tensor
    start: int
    resid: Tensor | None  # [n, pos, d_model] input to block ``start`` (None: run from the embeddings)

    def __len__(self) -> int:
        return len(self.tokens)

    def cols(self, idx: Tensor) -> slice:
        """The columns of rows ``idx`` that hold a real token in some row (left padding trimmed)."""
        return slice(int(self.mask[idx].bool().any(0).nonzero()[0]), None)

    def forward(self, model: HookedTransformer, idx: Tensor, **kw) -> Tensor | None:
        sl = self.cols(idx)
        mask = self.mask[idx][:, sl]
        if self.resid is None:
            return model(self.tokens[idx][:, sl], attention_mask=mask, **kw)
        # Positions come from the attention mask, so trimmed left padding changes nothing.
        return model(self.resid[idx][:, sl], start_at_layer=self.start, attention_mask=mask, **kw)


def _final_logprobs(model: HookedTransformer, rows: _Rows, idx: Tensor, hooks: list[Hook]) -> Tensor:
    """Next-token log-probs at the final position of rows ``idx`` (differentiable; soft-capped like
    the model's output)."""
    kept: list[Tensor] = []
    with model.hooks(fwd_hooks=hooks + [final_resid_hook(model, kept, every_position=False)]):
        rows.forward(model, idx, return_type=None)
    return logits_from_resid(model, kept[0])[:, 0].float().log_softmax(-1)


def _truth_logprob(model: HookedTransformer, rows: _Rows, idx: Tensor, truth: Tensor, hooks: list[Hook]) -> Tensor:
    """log P(truth) at the final position (differentiable)."""
    lp = _final_logprobs(model, rows, idx, hooks)
    return gather_logprob(lp, truth[idx].to(lp.device))


def _task_loss(model: HookedTransformer, s: "_Setup", idx: Tensor, hooks: list[Hook]) -> Tensor:
    """The training objective on rows ``idx`` (:data:`OBJECTIVES`)."""
    if s.target_resid is not None:  # "honest_resid": run only up to the deepest edited block
        layer, kept = s.target_layer, []
        keep = (hook_name("resid_post", layer), lambda a, hook: kept.append(a[:, -1]))  # after the edit's hooks
        with model.hooks(fwd_hooks=hooks + [keep]):
            s.lying.forward(model, idx, stop_at_layer=layer + 1)
        tgt, lie = s.target_resid[idx].to(kept[0].device), s.lying_final[keep[0]][idx].to(kept[0].device)
        return (kept[0].float() - tgt).pow(2).sum(-1).mean() / (lie - tgt).pow(2).sum(-1).mean().clamp_min(1e-12)
    if s.target is None:
        return -_truth_logprob(model, s.lying, idx, s.truth, hooks).mean()
    lp = _final_logprobs(model, s.lying, idx, hooks)
    tgt = s.target[idx].to(lp.device)
    return (tgt.exp() * (tgt - lp)).sum(-1).mean()


def _neutral_kl(model: HookedTransformer, rows: _Rows, clean: Tensor, idx: Tensor, hooks: list[Hook]) -> Tensor:
    """Token-weighted mean KL(clean || edited) over the real tokens of neutral lines ``idx``."""
    tot, n = 0.0, 0
    with model.hooks(fwd_hooks=hooks):
        for chunk in idx.split(32):
            lp_s = rows.forward(model, chunk).float().log_softmax(-1)
            sl = rows.cols(chunk)
            real = rows.mask[chunk][:, sl].bool().to(lp_s.device)
            lp_c = clean[chunk][:, sl].to(lp_s.device)
            tot = tot + ((lp_c.exp() * (lp_c - lp_s)).sum(-1) * real).sum()
            n += int(real.sum())
    return tot / max(n, 1)


@dataclass
class _Setup:
    lying: _Rows
    truth: Tensor  # [n, k] truth ids of each lying prompt
    neutral: _Rows
    clean: Tensor  # [lines, pos, vocab] unedited log-probs of the neutral lines
    ref_norm: float  # typical residual norm at the edited layers (sets the step size)
    seconds: float  # setup time (tokenizing, the cached frozen blocks, the clean log-probs)
    pairs: list[ContrastPair]  # the training pairs used (after max_pairs)
    lying_final: dict[str, Tensor]  # clean resid_post of each edited block at the lying prompts' final position
    target: Tensor | None = None  # [n, vocab] the honest runs' final log-probs (objective "honest_kl")
    target_resid: Tensor | None = None  # [n, d_model] honest runs' final resid_post (objective "honest_resid")
    target_layer: int = -1  # the block whose resid_post "honest_resid" compares (the deepest edited one)


def _rows(
    model: HookedTransformer, prompts: Sequence[str], start: int, skip: bool, sites: Sequence[Site] = ()
) -> tuple[_Rows, dict[str, Tensor]]:
    """Tokenize, and run the frozen blocks ``0 .. start-1`` once; also return the activations at
    ``sites`` (keyed by hook name)."""
    b = tokenize(model, list(prompts))
    skip = skip and start > 0
    pre = hook_name("resid_pre", start)
    keep = ({pre} if skip else set()) | {site.hook for site in sites}
    acts: dict[str, list[Tensor]] = {n: [] for n in keep}
    if keep:
        stop = max([start] + [site.layer for site in sites]) + 1
        for chunk in torch.arange(len(b.tokens)).split(32):
            _, cache = model.run_with_cache(
                b.tokens[chunk],
                attention_mask=b.attention_mask[chunk],
                names_filter=lambda n: n in keep,
                stop_at_layer=stop,
            )
            for n in keep:
                acts[n].append(cache[n].detach())
    out = {n: torch.cat(v) for n, v in acts.items()}
    return _Rows(b.tokens, b.attention_mask, start, out.get(pre) if skip else None), out


def _setup(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    neutral: Sequence[str],
    layers: Sequence[int],
    cfg: TrainConfig,
) -> _Setup:
    t0 = time.time()
    if len(pairs) == 0:
        raise PairError("no training pairs for the learned edit")
    if len(neutral) == 0:
        raise ValueError("no neutral lines for the KL penalty")
    pairs = list(pairs)[: cfg.max_pairs] if cfg.max_pairs else list(pairs)
    truth = answer_set(model.tokenizer, pairs).truth
    start = min(layers)
    trained = [p.honest if cfg.prompts == "honest" else p.lying for p in pairs]
    with torch.no_grad():
        sites = [Site("resid_post", l) for l in layers]
        names = [site.hook for site in sites]
        lying, cache = _rows(model, trained, start, cfg.skip_frozen, sites)
        target = target_resid = None
        if cfg.objective == "honest_kl":
            honest, _ = _rows(model, [p.honest for p in pairs], start, False)
            target = torch.cat([_final_logprobs(model, honest, c, []) for c in torch.arange(len(pairs)).split(32)])
        if cfg.objective == "honest_resid":
            deepest = Site("resid_post", max(layers))
            _, h_cache = _rows(model, [p.honest for p in pairs], start, False, [deepest])
            target_resid = h_cache[deepest.hook][:, -1].float()
        neutral_rows, _ = _rows(model, neutral, start, cfg.skip_frozen)
        every = torch.arange(len(neutral_rows))
        clean = torch.cat([neutral_rows.forward(model, c).float().log_softmax(-1) for c in every.split(32)])
        lying_final = {n: cache[n][:, -1].float() for n in names}
        final = torch.stack([a.norm(dim=-1).mean() for a in lying_final.values()]).mean()
    t = time.time() - t0
    return _Setup(
        lying, truth, neutral_rows, clean, float(final), t, pairs, lying_final, target, target_resid, max(layers)
    )


class _Minibatches:
    """Row indices, ``size`` at a time, from seeded permutations (each row once per epoch)."""

    def __init__(self, n: int, size: int | None, seed: int):
        self.n, self.size = n, min(size or n, n)
        self.g = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> Tensor:
        if self.size == self.n:
            return torch.arange(self.n)
        while len(self.order) < self.size:
            self.order += torch.randperm(self.n, generator=self.g).tolist()
        out, self.order = self.order[: self.size], self.order[self.size :]
        return torch.tensor(sorted(out))


class _TensorAdam:
    """Adam with one second-moment scalar per tensor instead of one per coordinate.

    Coordinate-wise Adam moves every coordinate by about ``lr`` in the sign of its gradient at
    first, which tilts a learned vector toward the sign pattern of the gradient (cosine ~0.8 with a
    Gaussian target), and so would make the edit's "alignment" with other directions partly an
    optimizer artifact. A per-tensor scale keeps the update along the gradient (rotation-equivariant).
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-12,
        lr_scales: Sequence[float] | None = None,
    ):
        self.params, self.lr, (self.b1, self.b2), self.eps, self.t = params, lr, betas, eps, 0
        self.lr_scales = list(lr_scales) if lr_scales is not None else [1.0] * len(params)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [0.0 for _ in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            self.m[i].mul_(self.b1).add_(g, alpha=1 - self.b1)
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * float(g.pow(2).mean())
            m_hat = self.m[i] / (1 - self.b1**self.t)
            v_hat = self.v[i] / (1 - self.b2**self.t)
            p.sub_(self.lr * self.lr_scales[i] * m_hat / (math.sqrt(v_hat) + self.eps))


def _optimise(
    model: HookedTransformer,
    params: list[Tensor],
    make_hooks,
    make_edit,
    s: _Setup,
    cfg: TrainConfig,
    lr_scales: Sequence[float] | None = None,
) -> tuple[Edit, dict]:
    """Adam on ``params``; ``make_hooks()`` gives differentiable hooks, ``make_edit()`` the frozen edit.
    ``lr_scales``: per-parameter multipliers of the step (for parameters not in residual units)."""
    t0 = time.time()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # gradients flow only into the edit
    lam, hist = float(cfg.lam), []
    task_key = "nll_truth" if cfg.objective == "truth" else cfg.objective  # the history's name of the task loss
    lying_mb = _Minibatches(len(s.lying), cfg.batch_size, cfg.seed)
    neutral_mb = _Minibatches(len(s.neutral), cfg.neutral_per_step, cfg.seed + 1)
    try:
        with torch.enable_grad():
            opt = _TensorAdam(params, lr=cfg.lr * s.ref_norm / math.sqrt(model.cfg.d_model), lr_scales=lr_scales)
            for step in tqdm(range(cfg.steps), desc="train edit", disable=not cfg.progress):
                hooks = make_hooks()
                task = _task_loss(model, s, lying_mb.next(), hooks)
                kl = _neutral_kl(model, s.neutral, s.clean, neutral_mb.next(), hooks)
                loss = task + lam * kl
                opt.zero_grad()
                loss.backward()
                opt.step()
                hist.append({"step": step, task_key: task.item(), "kl": kl.item(), "lam": lam})
                if cfg.kl_budget is not None:  # dual ascent: raise lam while KL is over budget
                    ratio = kl.item() / cfg.kl_budget - 1.0
                    lam = max(lam, 1e-3) * math.exp(max(-1.0, min(1.0, ratio)))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    t_train = time.time() - t0
    edit, scale, kl_final = _project(model, make_edit(), s, cfg.kl_budget)
    info = {
        "lam": cfg.lam,
        "lam_final": lam,
        "kl_budget": cfg.kl_budget,
        "kl_budget_met": cfg.kl_budget is None or kl_final <= cfg.kl_budget,
        "objective": cfg.objective,
        "trained_prompts": cfg.prompts,
        "steps": cfg.steps,
        "projection_scale": scale,
        "train_kl": kl_final,
        "n_train_pairs": len(s.lying),
        "n_neutral_lines": len(s.neutral),
        "pairs_per_step": min(cfg.batch_size, len(s.lying)),
        "neutral_per_step": min(cfg.neutral_per_step or len(s.neutral), len(s.neutral)),
        "start_block": s.lying.start if s.lying.resid is not None else 0,
        "threads": torch.get_num_threads(),
        "seconds_setup": s.seconds,
        "seconds_steps": t_train,
        "seconds_projection": time.time() - t0 - t_train,
        "seconds": s.seconds + time.time() - t0,
        "history": hist,
    }
    return edit, info


@torch.no_grad()
def _project(model: HookedTransformer, edit: Edit, s: _Setup, kl_budget: float | None) -> tuple[Edit, float, float]:
    """``(edit, scale, KL)``: with a budget the edit's KL on *all* training neutral lines exceeds,
    the edit scaled down (bisection on its scale, to 1/1024 of it) until KL is within the budget.

    A budget that no scale down to 1/1024 meets is reported, not clipped to a zero edit: the edit
    keeps the smallest scale tried, and the caller records ``kl_budget_met = False`` with its KL."""
    every = torch.arange(len(s.neutral))
    train_kl = lambda e: float(_neutral_kl(model, s.neutral, s.clean, every, _plain_hooks(model, e)))  # noqa: E731
    kl_final = train_kl(edit)
    scale = 1.0
    if kl_budget is not None and kl_final > kl_budget:
        lo, hi = 0.0, 1.0  # KL(0) = 0 <= budget
        for _ in range(10):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if train_kl(edit.scaled(-mid)) <= kl_budget else (lo, mid)
        scale = lo if lo > 0 else hi  # lo == 0: no scale tried met the budget (kept, and reported)
        edit = _bake(edit, scale)
        kl_final = train_kl(edit)
        if kl_final > kl_budget:
            log.warning(
                "KL budget %g not met by any scale down to %g (KL %.4g): reported, not clipped",
                kl_budget,
                scale,
                kl_final,
            )
    return edit, scale, kl_final


def _plain_hooks(model: HookedTransformer, edit: Edit) -> list[Hook]:
    edit.validate(model)
    return edit.hooks(model, SteeringState())


def _bake(edit: Edit, scale: float) -> Edit:
    """The same edit with ``scale`` folded into its parameters (so alpha = -1 stays "as trained")."""
    if isinstance(edit, LearnedVector):
        return replace(edit, vectors={l: v * scale for l, v in edit.vectors.items()})
    if isinstance(edit, GatedVector):
        return replace(edit, v=edit.v * scale)
    return replace(edit, B=edit.B * scale)


def train_vector(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    neutral: Sequence[str],
    layers: Sequence[int],
    cfg: TrainConfig = TrainConfig(),
    *,
    init: dict[int, Tensor] | None = None,
) -> LearnedVector:
    """Train steering vectors at ``layers`` (``x += delta_l`` at ``blocks.l.hook_resid_post``).

    Args:
        model: the model (its weights are not changed).
        pairs: *training* pairs; the lying prompts are pushed toward the truth.
        neutral: training neutral lines for the KL penalty.
        layers: blocks to edit.
        cfg: penalty / budget / steps.
        init: optional starting shifts per layer, toward honesty (e.g. ``-diff_of_means``).

    Returns:
        :class:`LearnedVector` (honest -> lying vectors = the negated trained shifts; apply with
        ``steer(model, edit)``; ``edit.info`` holds the training record).

    Example:
        >>> cfg = TrainConfig(kl_budget=0.1)
        >>> edit = train_vector(model, data.train, data.neutral_train, [8], cfg)  # doctest: +SKIP
        >>> with steer(model, edit): ...  # doctest: +SKIP
    """
    layers = sorted(set(layers))
    if not layers or not all(isinstance(l, int) and 0 <= l < model.cfg.n_layers for l in layers):
        raise SteeringError(f"layers must be in 0..{model.cfg.n_layers - 1}, got {list(layers)}")
    s = _setup(model, pairs, neutral, layers, cfg)
    torch.manual_seed(cfg.seed)
    deltas = {
        l: (init[l].detach().float().clone() if init and l in init else torch.zeros(model.cfg.d_model))
        .to(model.cfg.device)
        .requires_grad_(True)
        for l in layers
    }

    def make_hooks() -> list[Hook]:
        return [(hook_name("resid_post", l), lambda a, hook, d=d: a + d.to(a.dtype)) for l, d in deltas.items()]

    def make_edit() -> LearnedVector:
        vectors = {l: -d.detach().cpu().clone() for l, d in deltas.items()}
        return LearnedVector(vectors, model.cfg.model_name, model.cfg.d_model, model_id=model_id(model))

    edit, info = _optimise(model, list(deltas.values()), make_hooks, make_edit, s, cfg)
    return replace(edit, info=info | {"kind": "learned", "layers": layers})


def train_lowrank(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    neutral: Sequence[str],
    layer: int,
    cfg: TrainConfig = TrainConfig(),
    *,
    component: str = "attn_out",
    rank: int = 2,
) -> LowRankEdit:
    """Train a rank-``rank`` affine edit of ``blocks.{layer}.hook_{component}`` (LoRA-style init:
    ``B = 0``, so training starts from the unedited model). Args as in :func:`train_vector`.

    Returns:
        :class:`LowRankEdit`; ``info["mean_write"]`` is its mean write (toward honesty) at the final
        position of the training lying prompts, used by :func:`alignment`.
    """
    if not 1 <= rank <= 16:
        raise SteeringError(f"rank must be in 1..16, got {rank}")
    if component not in COMPONENTS:
        raise SteeringError(f"component must be one of {COMPONENTS}, got {component!r}")
    check_layer(model, layer)
    s = _setup(model, pairs, neutral, [layer], cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    d = model.cfg.d_model
    dev = model.cfg.device
    # A reads the component's output in units of the typical residual norm, so (y A) is O(1).
    A = (torch.randn(d, rank, generator=g) / s.ref_norm).to(dev).requires_grad_(True)
    c = torch.zeros(rank, device=dev, requires_grad=True)
    B = torch.zeros(rank, d, device=dev, requires_grad=True)
    site = Site(component, layer)
    name = site.hook

    def make_hooks() -> list[Hook]:
        return [(name, lambda y, hook: y + ((y.float() @ A + c) @ B).to(y.dtype))]

    def make_edit() -> LowRankEdit:
        return LowRankEdit(
            layer,
            component,
            A.detach().cpu().clone(),
            c.detach().cpu().clone(),
            B.detach().cpu().clone(),
            model.cfg.model_name,
            d,
            model_id=model_id(model),
        )

    # Steps per parameter in its own units: A's entries are ~1/ref_norm and c's ~1, so the default
    # step (residual units, lr * ref_norm / sqrt(d)) would move A by many times its size per step
    # (on SmolLM2 that diverged: NLL 1.7 -> 11, KL 3.4). These scales move each by ~lr of its size.
    scales = [math.sqrt(d) / s.ref_norm**2, math.sqrt(d) / s.ref_norm, 1.0]
    edit, info = _optimise(model, [A, c, B], make_hooks, make_edit, s, cfg, lr_scales=scales)
    # Its mean write at the final position of the training lying prompts (for alignment).
    y = _acts_at(model, [p.lying for p in s.pairs], site)
    info["mean_write"] = ((y @ edit.A + edit.c) @ edit.B).mean(0)
    return replace(edit, info=info | {"kind": "lowrank", "layer": layer, "component": component, "rank": rank})


def train_gated(
    model: HookedTransformer,
    pairs: Sequence[ContrastPair],
    neutral: Sequence[str],
    layer: int,
    cfg: TrainConfig = TrainConfig(),
    *,
    gate_c: float = 0.1,
    gate_lr: float = 0.1,
) -> GatedVector:
    """Train a gated vector at ``blocks.{layer}.hook_resid_post`` (:class:`GatedVector`). Args as in
    :func:`train_vector`.

    The gate starts as a probe: an L2-regularised logistic regression (strength ``1 / gate_c``,
    balanced classes) of the training lying prompts' final position (1) against their honest
    prompts' final position and every training neutral token (0). Trained from a closed or half-open
    gate instead, the KL penalty shuts the gate on every token before the write has learned
    anything (measured on SmolLM2: the gate ended at 0.06 on lying prompts). Then ``v`` (from 0)
    and the gate (step scaled by ``gate_lr``) are trained together on the usual loss. ``info``
    records the gate's mean opening on the training lying prompts' final position and on the
    training neutral tokens, before and after training.
    """
    from sklearn.linear_model import LogisticRegression

    check_layer(model, layer)
    if not gate_c > 0 or not gate_lr >= 0:
        raise ValueError(f"gate_c must be > 0 and gate_lr >= 0, got {gate_c}, {gate_lr}")
    t0 = time.time()
    s = _setup(model, pairs, neutral, [layer], cfg)
    d, dev = model.cfg.d_model, model.cfg.device
    site = Site("resid_post", layer)
    name = site.hook
    x_lie = s.lying_final[name].cpu()
    x_hon = _acts_at(model, [p.honest for p in s.pairs], site)
    x_neu = _acts_at(model, neutral, site, final_only=False)
    unit = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    X = torch.cat([unit(x_lie), unit(x_hon), unit(x_neu)]).numpy()
    y = [1] * len(x_lie) + [0] * (len(x_hon) + len(x_neu))
    probe = LogisticRegression(C=gate_c, class_weight="balanced", max_iter=2000).fit(X, y)
    v = torch.zeros(d, device=dev, requires_grad=True)
    w = torch.tensor(probe.coef_[0], dtype=torch.float32, device=dev).requires_grad_(True)
    b = torch.tensor(float(probe.intercept_[0]), device=dev).requires_grad_(True)
    opening = lambda x: float(soft_gate(x.to(dev), w.detach(), b.detach()).mean())  # noqa: E731
    start = {"gate_lying_final_init": opening(x_lie), "gate_neutral_tokens_init": opening(x_neu)}
    t_probe = time.time() - t0 - s.seconds

    def make_hooks() -> list[Hook]:
        return [(name, lambda x, hook: x + (soft_gate(x.float(), w, b)[..., None] * v).to(x.dtype))]

    def make_edit() -> GatedVector:
        v_, w_ = -v.detach().cpu().clone(), w.detach().cpu().clone()
        return GatedVector(layer, v_, w_, float(b.detach()), model.cfg.model_name, d, model_id=model_id(model))

    # v is in residual units (the default step); w reads an RMS-normalised input whose entries are
    # O(1), so its per-coordinate step is lr / sqrt(d) (|w| ~ 1 already gives logits ~ sqrt(d));
    # the bias moves a few units over a run. gate_lr slows both: the probe is a good start.
    scales = [1.0, gate_lr / s.ref_norm, gate_lr * 4.0 * math.sqrt(d) / s.ref_norm]
    edit, info = _optimise(model, [v, w, b], make_hooks, make_edit, s, cfg, lr_scales=scales)
    info |= start | {"gate_c": gate_c, "gate_lr": gate_lr, "seconds_gate_probe": t_probe, "seconds": time.time() - t0}
    info["gate_lying_final"] = float(edit.gate(x_lie).mean())
    info["gate_neutral_tokens"] = float(edit.gate(x_neu).mean())
    return replace(edit, info=info | {"kind": "gated", "layer": layer})


def gate_opening(
    model: HookedTransformer, edit: GatedVector, texts: Sequence[str], *, final_only: bool = True
) -> Float[Tensor, " n"]:
    """The gate's opening (0..1) on ``texts``, unedited: at each text's final position, or at every
    real token (``final_only=False``). Where does the edit write?"""
    edit.validate(model)
    return edit.gate(_acts_at(model, texts, edit.sites[0], final_only=final_only))


def _acts_at(model: HookedTransformer, texts: Sequence[str], site: Site, final_only: bool = True) -> Tensor:
    """Clean activations at ``site`` (on the CPU): each text's final position, or every real token."""
    with torch.no_grad():
        rows, acts = _rows(model, list(texts), site.layer, False, [site])
    a = acts[site.hook].float().cpu()
    return a[:, -1] if final_only else a[rows.mask.bool().cpu()]


__all__ = ["TrainConfig", "gate_opening", "train_gated", "train_lowrank", "train_vector"]
