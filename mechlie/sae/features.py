"""Sparse-autoencoder (SAE) features of the lie direction, with sae-lens.

An SAE (Bricken et al. 2023, "Towards Monosemanticity"; Cunningham et al. 2023) rewrites an
activation ``x`` at one hook as a sparse sum of learned decoder rows,
``x ≈ b_dec + Σ_i f_i(x) W_dec[i]``. mechlie never implements one: the SAE classes, their
training step and their trainer are sae-lens's (``TopKTrainingSAE`` trained by ``SAETrainer``;
TopK as in Gao et al. 2024, "Scaling and evaluating sparse autoencoders", so the L0 is set by
``k`` rather than tuned through an L1 coefficient).

What this module adds around sae-lens:

- :class:`Site`: where an SAE reads, a TransformerLens hook name plus, for ``attn.hook_z``, one
  head (``d_in = d_head``) or all heads flattened (``d_in = n_heads * d_head``).
  :func:`check_sae` refuses an SAE whose width or hook does not match the model.
- :func:`load_sae`: any sae-lens SAE from a local folder (``cfg.json`` +
  ``sae_weights.safetensors``), or by ``release`` / ``sae_id`` from the hub when there is access.
- :func:`load_or_train_sae`: for models without a published SAE (the embedded ones), train a
  small TopK SAE on an **offline corpus** (:func:`build_corpus`: the built-in pair prompts of
  every format, ``mechlie/data/neutral.txt``, and the model's own samples), and cache it under
  ``<cache_dir>/sae/<key>/``, the key hashing the model's weights, the site and every setting, so
  it is trained once. The entry is written to a temporary folder and renamed into place.
- :func:`sae_quality`: the numbers the field reports, on held-out corpus lines: L0, explained
  variance ``1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²`` (over tokens), and the cross-entropy loss recovered when
  ``x̂`` is spliced in, ``(CE_zero - CE_sae) / (CE_zero - CE_clean)`` with zero-ablation of the site
  as the baseline; the CI is a bootstrap over lines of text.
- :func:`feature_effects`: the lie direction decomposed. The features whose activation at the
  final prompt token differs most between the lying and honest prompt of a pair (lying − honest,
  so a positive difference is a "lying" feature), chosen on the training facts and reported on
  held-out facts with bootstrap CIs over pairs, next to the null of the largest difference when
  the labels are swapped within pairs; and the cosine of each decoder row with the
  difference-of-means direction (honest → lying) of the site.
- :class:`FeatureClamp`: an intervention for :func:`mechlie.control.steering.steer` that ablates (sets to
  0) or clamps chosen features at the final position, keeping the SAE's reconstruction error, so
  only those features' contributions change: ``x ← x + Σ_i (target_i − f_i(x)) W_dec[i]``.
  :func:`causal_check` applies it to the top features on lying prompts and reports the change in
  P(truth) beside many draws of random features of the same mean activation.

Positions: SAEs are trained on every position of the corpus except each line's first token
(position 0 is the attention sink, whose norm is far larger than any other, as Gao et al. also
exclude); the decomposition reads the final prompt token (offset ``-1``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.core.hooks import SteeringState, check_policy
from mechlie.core.models import default_cache_dir
from mechlie.core.pairs import FORMATS, AnswerSet, ContrastPair, answer_set, load_builtin, tokenize
from mechlie.core.stats import bootstrap, bootstrap_tensor, max_null_threshold, paired_swap_masks

log = logging.getLogger(__name__)

SAE_FORMAT_VERSION = 2  # 2: samples drawn in batches of 32 (another corpus than 1's)


class SAEError(ValueError):
    """An SAE that cannot be used with this model or site (width, hook, head), or cannot be found."""


# ---------------------------------------------------------------------------------------------
# sites


@dataclass(frozen=True)
class Site:
    """Where an SAE reads: a hook, and for ``attn.hook_z`` optionally one head."""

    hook_name: str  # e.g. "blocks.20.hook_resid_pre" or "blocks.20.attn.hook_z"
    head: int | None = None  # only with hook_z: that head's z (d_head); None = all heads flattened

    @classmethod
    def parse(cls, spec: str) -> "Site":
        """``"blocks.20.hook_resid_pre"`` or ``"blocks.20.attn.hook_z:5"`` (head 5)."""
        name, _, head = spec.partition(":")
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit() or not parts[-1].startswith("hook_"):
            raise SAEError(
                f"site {spec!r}: expected blocks.<layer>.<hook>, e.g. blocks.20.hook_resid_pre "
                "or blocks.20.attn.hook_z:5"
            )
        if head and not head.isdigit():
            raise SAEError(f"site {spec!r}: the head after ':' must be a number")
        return cls(name, int(head) if head else None)

    def __str__(self) -> str:
        return self.hook_name + (f":{self.head}" if self.head is not None else "")

    @property
    def is_z(self) -> bool:
        return self.hook_name.endswith("attn.hook_z")

    @property
    def layer(self) -> int:
        parts = self.hook_name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise SAEError(f"site {self}: only blocks.<layer>.* hooks are supported")
        return int(parts[1])

    def validate(self, model: HookedTransformer) -> None:
        if self.hook_name not in model.hook_dict:
            raise SAEError(f"site {self}: the model has no hook {self.hook_name!r}")
        _ = self.layer
        if self.head is not None:
            if not self.is_z:
                raise SAEError(f"site {self}: a head index is only meaningful for attn.hook_z")
            if not 0 <= self.head < model.cfg.n_heads:
                raise SAEError(f"site {self}: head {self.head} out of range ({model.cfg.n_heads} heads)")

    def d_in(self, model: HookedTransformer) -> int:
        if self.is_z:
            return model.cfg.d_head if self.head is not None else model.cfg.n_heads * model.cfg.d_head
        return model.cfg.d_model

    def read(self, act: Tensor) -> Float[Tensor, "batch pos d_in"]:
        """The SAE input from the hook's activation ``[batch, pos, ...]``."""
        if self.is_z:
            return act[:, :, self.head] if self.head is not None else act.flatten(2)
        return act

    def write(self, act: Tensor, new: Float[Tensor, "batch pos d_in"]) -> Tensor:
        """``act`` with the SAE input replaced by ``new`` (in place, returned)."""
        if self.is_z and self.head is not None:
            act[:, :, self.head] = new.to(act.dtype)
        elif self.is_z:
            act[:] = new.reshape(act.shape).to(act.dtype)
        else:
            act[:] = new.to(act.dtype)
        return act


def sae_site(sae: SAE) -> Site | None:
    """The site recorded in an SAE's metadata (sae-lens ``hook_name`` / ``hook_head_index``)."""
    name = sae.cfg.metadata.hook_name
    if not name:
        return None
    head = sae.cfg.metadata.hook_head_index
    return Site(name, int(head) if head is not None else None)


def check_sae(sae: SAE, model: HookedTransformer, site: Site) -> None:
    """Refuse an SAE whose width or recorded hook does not match ``site`` on ``model``."""
    site.validate(model)
    d = site.d_in(model)
    if sae.cfg.d_in != d:
        raise SAEError(
            f"SAE width mismatch: the SAE reads d_in={sae.cfg.d_in} but site {site} of "
            f"{model.cfg.model_name} has {d} dimensions"
        )
    recorded = sae_site(sae)
    if recorded is not None and recorded != site:
        raise SAEError(f"SAE site mismatch: the SAE was trained on {recorded}, not on {site}")


def load_sae(source: str | Path, sae_id: str | None = None, *, device: str = "cpu") -> SAE:
    """Load any sae-lens SAE: a local folder, or ``release`` + ``sae_id`` from the hub.

    Args:
        source: a folder with sae-lens's ``cfg.json`` and ``sae_weights.safetensors``, or a
            sae-lens release name (then ``sae_id`` is required, and so is hub access).
        sae_id: the SAE's id within the release.

    Example:
        >>> sae = load_sae("~/.cache/mechlie/sae/ab12.../")
        >>> sae = load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    """
    p = Path(source).expanduser()
    if p.is_dir():
        if not (p / "cfg.json").is_file():
            raise SAEError(f"{p} is a folder but has no cfg.json (not a sae-lens SAE folder)")
        return SAE.load_from_disk(p, device=device)
    if sae_id is None:
        raise SAEError(f"{source!r} is not a local SAE folder; to load from the hub pass a release and an sae_id")
    try:
        return SAE.from_pretrained(str(source), sae_id, device=device)
    except Exception as e:  # sae-lens raises ValueError/HTTP errors; say which SAE failed
        raise SAEError(f"could not load SAE {source}/{sae_id}: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# corpus and activations


@dataclass(frozen=True)
class Corpus:
    texts: tuple[str, ...]
    sources: tuple[str, ...]  # "pairs", "neutral" or "samples", one per text

    def counts(self) -> dict[str, int]:
        return {s: self.sources.count(s) for s in sorted(set(self.sources))}

    def split(self, eval_frac: float, seed: int) -> tuple[list[int], list[int]]:
        """(train, eval) line indices; eval lines are never trained on."""
        idx = list(range(len(self.texts)))
        random.Random(seed).shuffle(idx)
        n_eval = max(1, round(eval_frac * len(idx)))
        return sorted(idx[n_eval:]), sorted(idx[:n_eval])


def neutral_text() -> list[str]:
    from mechlie.studies.steering_eval import neutral_lines

    return neutral_lines()


def build_corpus(
    model: HookedTransformer,
    *,
    pairs_per_format: int = 10,
    n_samples: int = 32,
    sample_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 16,
) -> Corpus:
    """An offline corpus: built-in pair prompts, neutral text, and the model's own samples.

    The pair prompts are the honest and the lying prompt of ``pairs_per_format`` facts per format
    (all relations; 0 = every fact). The samples are sampled (temperature 1, seeded) from the
    first four words of each neutral line and of the pairs' questions. The SAE is unsupervised:
    it never sees which prompt is the lying one.
    """
    from mechlie.core.generation import generate

    texts: list[str] = []
    sources: list[str] = []
    questions: list[str] = []
    for fmt in FORMATS:
        pairs = load_builtin("all", fmt, tokenizer=model.tokenizer, n=pairs_per_format or None, seed=seed)
        for p in pairs:
            texts += [p.honest, p.lying]
            sources += ["pairs", "pairs"]
            if p.question:
                questions.append(f"Q: {p.question}\nA:")
    neutral = neutral_text()
    texts += neutral
    sources += ["neutral"] * len(neutral)
    if n_samples > 0:
        starts = [" ".join(line.split()[:4]) for line in neutral] + sorted(set(questions))
        rng = random.Random(seed)
        starts = [rng.choice(starts) for _ in range(n_samples)]
        # One batch of up to 32 rows: each cached step costs about the same for 16 or 32 rows on a CPU.
        gen_batch = max(batch_size, 32)
        for i in tqdm(range(0, n_samples, gen_batch), desc="model samples", leave=False):
            out = generate(
                model,
                starts[i : i + gen_batch],
                max_new_tokens=sample_tokens,
                do_sample=True,
                seed=seed + i,
                eos_token_id=None,
            )
            texts += [s + t for s, t in zip(starts[i : i + gen_batch], out.texts)]
            sources += ["samples"] * len(out.texts)
    # A line longer than the context cannot be run whole; it is left out (and said so).
    bos = int(bool(model.cfg.default_prepend_bos))  # tokenize() adds at most one BOS
    fits = [len(model.tokenizer.encode(t, add_special_tokens=False)) + bos <= model.cfg.n_ctx for t in texts]
    if not all(fits):
        log.info(
            "corpus: left out %d of %d lines longer than the %d-token context",
            fits.count(False),
            len(texts),
            model.cfg.n_ctx,
        )
    return Corpus(tuple(t for t, f in zip(texts, fits) if f), tuple(s for s, f in zip(sources, fits) if f))


@dataclass(frozen=True)
class SiteActs:
    acts: Float[Tensor, "tok d_in"]
    line: Int[Tensor, " tok"]  # corpus line of each token
    pos: Int[Tensor, " tok"]  # its position in the line (0 = first token)


def _stop_layer(site: Site) -> int:
    return site.layer + 1  # blocks 0..layer run; every blocks.<layer>.* hook has fired


@torch.no_grad()
def collect_sites(
    model: HookedTransformer,
    texts: Sequence[str],
    sites: Sequence[Site],
    *,
    batch_size: int = 16,
    skip_first: int = 1,
    progress: bool = True,
) -> dict[Site, SiteActs]:
    """Each site's activation at every real token of ``texts`` but the first ``skip_first``, all
    sites from one pass (run only up to the last block any site needs)."""
    for site in sites:
        site.validate(model)
    acts: dict[Site, list[Tensor]] = {s_: [] for s_ in sites}
    lines, poss = [], []
    for i in tqdm(range(0, len(texts), batch_size), desc="corpus activations", disable=not progress, leave=False):
        b = tokenize(model, list(texts[i : i + batch_size]))
        kept: dict[Site, Tensor] = {}
        hooks = [
            (s_.hook_name, lambda a, hook, s_=s_: kept.__setitem__(s_, s_.read(a).detach().float().cpu()))
            for s_ in sites
        ]
        with model.hooks(fwd_hooks=hooks):
            model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=max(_stop_layer(s_) for s_ in sites))
        mask = b.attention_mask.cpu().bool()
        pos = mask.long().cumsum(-1) - 1  # position within each (left-padded) line
        keep = mask & (pos >= skip_first)
        for s_ in sites:
            acts[s_].append(kept[s_][keep])
        poss.append(pos[keep])
        lines.append((torch.arange(len(mask))[:, None].expand_as(mask) + i)[keep])
    line, pos = torch.cat(lines), torch.cat(poss)
    return {s_: SiteActs(torch.cat(a), line, pos) for s_, a in acts.items()}


def collect_site(
    model: HookedTransformer,
    texts: Sequence[str],
    site: Site,
    *,
    batch_size: int = 16,
    skip_first: int = 1,
    progress: bool = True,
) -> SiteActs:
    """:func:`collect_sites` for one site."""
    return collect_sites(model, texts, [site], batch_size=batch_size, skip_first=skip_first, progress=progress)[site]


@torch.no_grad()
def final_acts_at(
    model: HookedTransformer, prompts: Sequence[str], sites: Sequence[Site], *, batch_size: int = 16
) -> dict[Site, Tensor]:
    """Each site's activation ``[n, d_in]`` at each prompt's final token, all sites in one pass."""
    for site in sites:
        site.validate(model)
    out: dict[Site, list[Tensor]] = {s_: [] for s_ in sites}
    for i in range(0, len(prompts), batch_size):
        b = tokenize(model, list(prompts[i : i + batch_size]))
        hooks = [(s_.hook_name, lambda a, hook, s_=s_: out[s_].append(s_.read(a)[:, -1].float().cpu())) for s_ in sites]
        with model.hooks(fwd_hooks=hooks):
            model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=max(_stop_layer(s_) for s_ in sites))
    return {s_: torch.cat(v) for s_, v in out.items()}


def final_acts(
    model: HookedTransformer, prompts: Sequence[str], site: Site, *, batch_size: int = 16
) -> Float[Tensor, "n d_in"]:
    """The site's activation at each prompt's final token."""
    return final_acts_at(model, prompts, [site], batch_size=batch_size)[site]


def decoder_rows(sae: SAE) -> Float[Tensor, "d_sae d_in"]:
    """The vectors the SAE's decoder actually adds per unit of feature activation.

    sae-lens TopK SAEs trained with ``rescale_acts_by_decoder_norm`` (the default) decode
    ``f_i / ‖W_dec[i]‖ · W_dec[i]``, so their rows are unit-normalized here; other SAEs decode
    ``f_i W_dec[i]``.
    """
    w = sae.W_dec.detach()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return w


@torch.no_grad()
def encode(sae: SAE, x: Float[Tensor, "*b d_in"], *, chunk: int = 4096) -> Float[Tensor, "*b d_sae"]:
    """Feature activations, in chunks (a full ``[tokens, d_sae]`` matrix can be large)."""
    flat = x.reshape(-1, x.shape[-1])
    dev = sae.W_dec.device
    out = torch.cat([sae.encode(flat[i : i + chunk].to(dev)).float().cpu() for i in range(0, len(flat), chunk)])
    return out.reshape(*x.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------
# training and the cache


@dataclass(frozen=True)
class SAETrainConfig:
    site: str = "blocks.20.hook_resid_pre"
    expansion: int = 4  # d_sae = expansion * d_in
    k: int = 32  # TopK: active features per token
    lr: float = 4e-4
    batch_size: int = 512
    n_steps: int = 800
    pairs_per_format: int = 10  # corpus: pairs per relation, per format (0 = every fact)
    n_samples: int = 32  # corpus: model samples
    sample_tokens: int = 48
    eval_frac: float = 0.15  # corpus lines held out for the quality numbers
    seed: int = 0

    def __post_init__(self) -> None:
        Site.parse(self.site)
        if self.expansion < 1 or self.k < 1 or self.batch_size < 1 or self.n_steps < 1:
            raise ValueError("expansion, k, batch_size and n_steps must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.eval_frac < 1:
            raise ValueError(f"eval_frac must be in (0, 1), got {self.eval_frac}")
        if self.pairs_per_format < 0 or self.n_samples < 0 or self.sample_tokens < 1:
            raise ValueError("pairs_per_format and n_samples must be >= 0, sample_tokens >= 1")


def _batches(acts: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """sae-lens's DataProvider: shuffled batches of the activations, epoch after epoch, seeded."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(acts), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield acts[perm[i : i + batch_size]]


def train_sae(
    acts: Float[Tensor, "tok d_in"],
    cfg: SAETrainConfig,
    *,
    d_sae: int | None = None,
    device: str = "cpu",
    metadata: dict | None = None,
) -> TopKTrainingSAE:
    """Train a TopK SAE on ``acts`` with sae-lens's ``SAETrainer`` (its training step and loop).

    ``b_dec`` starts at the activations' mean (so the first steps do not spend themselves
    learning an offset); everything else is sae-lens's initialization.
    """
    if len(acts) < cfg.batch_size:
        raise SAEError(f"{len(acts)} training tokens is fewer than one batch ({cfg.batch_size})")
    torch.manual_seed(cfg.seed)
    d_in = acts.shape[1]
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=d_sae or cfg.expansion * d_in,
        k=cfg.k,
        device=device,
        dtype="float32",
    )
    for key, v in (metadata or {}).items():
        sae_cfg.metadata[key] = v
    sae = TopKTrainingSAE(sae_cfg)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0).to(sae.b_dec.device))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.n_steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(50, cfg.n_steps // 10),
        lr_decay_steps=0,
        device=device,
        dead_feature_window=max(50, cfg.n_steps // 5),
        feature_sampling_window=max(100, cfg.n_steps // 2),
    )
    trainer = SAETrainer(trainer_cfg, sae, _batches(acts, cfg.batch_size, cfg.seed))
    return trainer.fit()


@torch.no_grad()
def reconstruction_mse(sae: SAE, x: Float[Tensor, "tok d_in"]) -> float:
    x = x.to(sae.W_dec.device)
    return float(((sae.decode(sae.encode(x)) - x) ** 2).sum(-1).mean())


def model_hash(model: HookedTransformer) -> str:
    """sha256 of the model's processed weights (name, shape, dtype, bytes), first 16 hex."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(model: HookedTransformer, cfg: SAETrainConfig) -> str:
    import sae_lens

    blob = json.dumps(
        {
            "model": model_hash(model),
            "cfg": asdict(cfg),
            "sae_lens": sae_lens.__version__,
            "format": SAE_FORMAT_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    """:func:`sae_quality` of several (SAE, site) pairs on the same ``texts``, the clean pass shared."""
    for sae, site in saes:
        check_sae(sae, model, site)
    ce: list[dict[str, list[Tensor]]] = [{m: [] for m in ("sae", "zero")} for _ in saes]
    ce_clean: list[Tensor] = []
    acc = [
        {
            "sq_err": 0.0,
            "xs_sq": 0.0,
            "xs_sum": None,
            "l0": 0.0,
            "n": 0,
            "fired": torch.zeros(sae.cfg.d_sae, dtype=torch.bool),
        }
        for sae, _ in saes
    ]
    # Lines run shortest first (less left padding); per-line CEs go back to the caller's order below.
    order = sorted(range(len(texts)), key=lambda j: len(model.tokenizer(texts[j])["input_ids"]))
    # The SAE and zero-ablation passes start from the clean pass's residual at the first site's block:
    # the blocks below it cannot see the splice.
    start = min(site.layer for _, site in saes)
    start_name = f"blocks.{start}.hook_resid_pre"
    for i in range(0, len(texts), batch_size):
        b = tokenize(model, [texts[j] for j in order[i : i + batch_size]])
        mask = b.attention_mask.bool()
        pos = mask.long().cumsum(-1) - 1
        keep = (mask & (pos >= 1)).cpu()
        tgt = b.tokens[:, 1:]
        both = (mask[:, 1:] & mask[:, :-1]).float()

        def ce_of(logits: Tensor) -> Tensor:  # mean CE per line
            lp = logits[:, :-1].float().log_softmax(-1).gather(-1, tgt[..., None])[..., 0]
            return (-(lp * both).sum(-1) / both.sum(-1).clamp_min(1)).cpu()

        stash: dict[str, Tensor] = {}
        with model.hooks(fwd_hooks=[(start_name, lambda a, hook: stash.__setitem__("resid", a.clone()))]):
            ce_clean.append(ce_of(model(b.tokens, attention_mask=b.attention_mask)))
        # site.write is in place, so each pass starts from its own copy of the stashed residual
        rerun = lambda: model(stash["resid"].clone(), start_at_layer=start, attention_mask=b.attention_mask)  # noqa: E731
        for (sae, site), c, a in zip(saes, ce, acc):
            dev = sae.W_dec.device

            def splice(act: Tensor, hook, sae=sae, site=site, a=a, dev=dev) -> Tensor:
                x = site.read(act).float()
                f = sae.encode(x.to(dev))
                x_hat = sae.decode(f).to(x.device)
                xk, fk = x.cpu()[keep], f.cpu()[keep]
                a["sq_err"] += float(((x_hat.cpu()[keep] - xk) ** 2).sum())
                a["xs_sum"] = xk.sum(0) if a["xs_sum"] is None else a["xs_sum"] + xk.sum(0)
                a["xs_sq"] += float((xk**2).sum())
                a["l0"] += float((fk > 0).sum())
                a["n"] += len(xk)
                a["fired"].logical_or_((fk > 0).any(0))
                return site.write(act, x_hat)

            def zero(act: Tensor, hook, site=site) -> Tensor:
                return site.write(act, torch.zeros_like(site.read(act)))

            with model.hooks(fwd_hooks=[(site.hook_name, splice)]):
                c["sae"].append(ce_of(rerun()))
            with model.hooks(fwd_hooks=[(site.hook_name, zero)]):
                c["zero"].append(ce_of(rerun()))
    back = torch.argsort(torch.as_tensor(order))  # row of each original line
    clean = torch.cat(ce_clean)[back]
    out = []
    for c, a in zip(ce, acc):
        cs, cz = torch.cat(c["sae"])[back], torch.cat(c["zero"])[back]
        # Total sum of squares about the mean: Σ‖x‖² − n‖x̄‖².
        sq_tot = a["xs_sq"] - float((a["xs_sum"] ** 2).sum()) / a["n"]
        rec = lambda i, cs=cs, cz=cz: (cz[i].mean() - cs[i].mean()) / (cz[i].mean() - clean[i].mean())  # noqa: E731
        est = _bootstrap(rec, len(clean), n_boot=n_boot, seed=seed)
        out.append(
            SAEQuality(
                l0=a["l0"] / a["n"],
                explained_variance=1 - a["sq_err"] / sq_tot,
                ce_clean=float(clean.mean()),
                ce_sae=float(cs.mean()),
                ce_zero=float(cz.mean()),
                ce_recovered=est[0],
                ce_recovered_lo=est[1],
                ce_recovered_hi=est[2],
                n_lines=len(clean),
                n_tokens=a["n"],
                dead_frac=float((~a["fired"]).float().mean()),
            )
        )
    return out


def _bootstrap(stat, n: int, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, lo, hi) of :func:`mechlie.core.stats.bootstrap` (95%, over the ``n`` units)."""
    e = bootstrap(stat, n, n_boot=n_boot, seed=seed)
    return float(e.mean), float(e.lo), float(e.hi)


@dataclass
class TrainedSAE:
    sae: SAE
    site: Site
    path: Path  # the cache entry (a sae-lens folder: load_sae(path) reloads it)
    info: dict  # settings, corpus counts, quality, timings
    corpus: Corpus
    eval_lines: list[int] = field(default_factory=list)
    acts: SiteActs | None = None  # the corpus activations it was trained on, when trained in this process


def _cache_entry(root: Path, key: str) -> Path:
    return root / "sae" / key


def _load_entry(out: Path, model: HookedTransformer, site: Site, device: str) -> TrainedSAE:
    info = json.loads((out / "mechlie.json").read_text())
    if info.get("format_version") != SAE_FORMAT_VERSION:
        raise SAEError(f"{out} was written by another version of mechlie.sae.features; delete it to retrain")
    corpus_d = json.loads((out / "corpus.json").read_text())
    sae = load_sae(out, device=device)
    check_sae(sae, model, site)
    log.info("SAE for %s loaded from the cache (%s)", site, out)
    return TrainedSAE(
        sae, site, out, info, Corpus(tuple(corpus_d["texts"]), tuple(corpus_d["sources"])), info["eval_lines"]
    )


def load_or_train_saes(
    model: HookedTransformer,
    cfgs: Sequence[SAETrainConfig],
    *,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> list[TrainedSAE]:
    """:func:`load_or_train_sae` for several sites: the SAEs not in the cache share one corpus
    (when their corpus settings agree) and one pass over it."""
    sites = [Site.parse(c.site) for c in cfgs]
    for site in sites:
        site.validate(model)
    device = device or str(model.cfg.device)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    keys = [cache_key(model, c) for c in cfgs]
    out: list[TrainedSAE | None] = [
        _load_entry(_cache_entry(root, k), model, s_, device)
        if (_cache_entry(root, k) / "mechlie.json").is_file()
        else None
        for k, s_ in zip(keys, sites)
    ]
    todo = [i for i, t in enumerate(out) if t is None]
    corpus_of = lambda c: (c.pairs_per_format, c.n_samples, c.sample_tokens, c.seed, c.eval_frac)  # noqa: E731
    groups: dict[tuple, list[int]] = {}
    for i in todo:
        groups.setdefault(corpus_of(cfgs[i]), []).append(i)
    for idx in groups.values():
        c0 = cfgs[idx[0]]
        t0 = time.time()
        corpus = build_corpus(
            model,
            pairs_per_format=c0.pairs_per_format,
            n_samples=c0.n_samples,
            sample_tokens=c0.sample_tokens,
            seed=c0.seed,
            batch_size=batch_size,
        )
        train_lines, eval_lines = corpus.split(c0.eval_frac, c0.seed)
        t_corpus = time.time() - t0
        acts = collect_sites(
            model,
            [corpus.texts[i] for i in train_lines],
            [sites[i] for i in idx],
            batch_size=batch_size,
            progress=progress,
        )
        t_acts = time.time() - t0 - t_corpus
        trained, seconds = {}, {}
        for i in idx:
            t1 = time.time()
            trained[i] = _train_one(model, cfgs[i], sites[i], acts[sites[i]], corpus, len(train_lines), device)
            seconds[i] = {
                "corpus": round(t_corpus, 1),
                "activations": round(t_acts, 1),
                "train": round(time.time() - t1, 1),
            }
        # Quality of the group's SAEs on the held-out lines, one clean pass for all of them.
        t1 = time.time()
        qs = sae_qualities(
            model,
            [(trained[i], sites[i]) for i in idx],
            [corpus.texts[j] for j in eval_lines],
            batch_size=batch_size,
            seed=c0.seed,
        )
        for i, q in zip(idx, qs):
            seconds[i]["quality (all sites of the pass)"] = round(time.time() - t1, 1)
            out[i] = _save_entry(
                model,
                trained[i],
                q,
                cfgs[i],
                sites[i],
                keys[i],
                _cache_entry(root, keys[i]),
                corpus,
                train_lines,
                eval_lines,
                acts[sites[i]],
                device,
                seconds[i],
            )
    return [t for t in out if t is not None]


def _train_one(
    model: HookedTransformer,
    cfg: SAETrainConfig,
    site: Site,
    acts: SiteActs,
    corpus: Corpus,
    n_lines: int,
    device: str,
) -> SAE:
    log.info("training an SAE at %s on %d tokens from %d lines %s", site, len(acts.acts), n_lines, corpus.counts())
    meta = {
        "model_name": model.cfg.model_name,
        "hook_name": site.hook_name,
        "hook_head_index": site.head,
        "prepend_bos": bool(model.cfg.default_prepend_bos),
    }
    sae = train_sae(acts.acts, cfg, device=device, metadata=meta)
    sae.eval()
    return sae


def _save_entry(
    model: HookedTransformer,
    sae: SAE,
    q: SAEQuality,
    cfg: SAETrainConfig,
    site: Site,
    key: str,
    out: Path,
    corpus: Corpus,
    train_lines: list[int],
    eval_lines: list[int],
    acts: SiteActs,
    device: str,
    seconds: dict,
) -> TrainedSAE:
    """Write the trained SAE (a sae-lens folder) with its corpus and quality, atomically, and reload it."""
    info = {
        "format_version": SAE_FORMAT_VERSION,
        "key": key,
        "model": model.cfg.model_name,
        "model_hash": model_hash(model),
        "site": str(site),
        "config": asdict(cfg),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "corpus": corpus.counts(),
        "n_train_lines": len(train_lines),
        "n_train_tokens": len(acts.acts),
        "eval_lines": eval_lines,
        "quality": asdict(q),
        "seconds": seconds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=out.parent))
    try:
        sae.save_inference_model(tmp)
        (tmp / "corpus.json").write_text(json.dumps({"texts": corpus.texts, "sources": corpus.sources}))
        (tmp / "mechlie.json").write_text(json.dumps(info, indent=2))
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "mechlie.json").is_file():  # another process may have won the race
            raise
    # Lines are indices into the whole corpus; acts were collected over the training lines only.
    line_ids = torch.as_tensor(train_lines)[acts.line]
    return TrainedSAE(
        load_sae(out, device=device), site, out, info, corpus, eval_lines, SiteActs(acts.acts, line_ids, acts.pos)
    )


def load_or_train_sae(
    model: HookedTransformer,
    cfg: SAETrainConfig,
    *,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> TrainedSAE:
    """The cached SAE for (model weights, site, settings), training it first if there is none.

    Args:
        model: the model whose activations the SAE reads.
        cfg: site and training settings; part of the cache key with the model's weight hash.
        cache_dir: default ``mechlie.core.models.default_cache_dir()`` (``$MECHLIE_CACHE``).
        device: where to train (default: the model's device).

    Returns:
        A :class:`TrainedSAE`; ``info["quality"]`` holds :class:`SAEQuality` on held-out lines.

    Example:
        >>> t = load_or_train_sae(model, SAETrainConfig(site="blocks.20.hook_resid_pre"))
        >>> t.info["quality"]["explained_variance"]
    """
    return load_or_train_saes(
        model, [cfg], cache_dir=cache_dir, device=device, batch_size=batch_size, progress=progress
    )[0]


# ---------------------------------------------------------------------------------------------
# the lie direction, feature by feature


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


# ---------------------------------------------------------------------------------------------
# causal check


@dataclass(frozen=True)
class FeatureClamp:
    """Set SAE features to ``values`` (default 0: ablation) at the final position of each pass.

    The SAE's reconstruction error is kept: ``x ← x + Σ_i (values_i − f_i(x)) W_dec[i]``, so a
    feature that does not fire is not touched by ablation, and nothing else about ``x`` changes.
    Use with :func:`mechlie.control.steering.steer`.
    """

    sae: SAE
    site: Site
    features: tuple[int, ...]
    values: Float[Tensor, " k"] | None = None
    policy: str = "all"

    def validate(self, model: HookedTransformer) -> None:
        check_sae(self.sae, model, self.site)
        check_policy(self.policy)
        if not self.features:
            raise SAEError("FeatureClamp needs at least one feature")
        bad = [f for f in self.features if not 0 <= f < self.sae.cfg.d_sae]
        if bad:
            raise SAEError(f"features {bad} out of range: the SAE has {self.sae.cfg.d_sae} features")
        if self.values is not None and self.values.shape != (len(self.features),):
            raise SAEError(f"values must have shape [{len(self.features)}], got {tuple(self.values.shape)}")

    def hooks(self, model: HookedTransformer, state: SteeringState) -> list:
        dev = self.sae.W_dec.device
        feats = torch.tensor(self.features, device=dev)
        w = decoder_rows(self.sae)[feats]  # [k, d_in]
        target = (self.values if self.values is not None else torch.zeros(len(self.features))).float().to(dev)

        def hook(act: Tensor, hook) -> Tensor:
            if state.select(self.policy, act.shape[1]) is None:
                return act
            x = self.site.read(act)[:, -1:].float()  # the final position of this pass
            f = self.sae.encode(x.to(dev))[..., feats]
            new = x + ((target - f) @ w).to(x.device)
            full = self.site.read(act).clone().float()
            full[:, -1:] = new
            return self.site.write(act, full)

        return [(self.site.hook_name, hook)]


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
class CausalCheck:
    mode: str  # "ablate" (features set to 0) or "clamp" (set to their mean on honest prompts)
    features: tuple[int, ...]
    p_truth_base: float  # mean P(truth) on the lying prompts, no intervention
    p_truth_honest: float  # the same facts' honest prompts, for scale
    delta: float  # mean change in P(truth) when the top features are set
    delta_lo: float  # 95% bootstrap CI over pairs
    delta_hi: float
    gap_recovered: float  # delta / (honest − lying)
    random_deltas: list[float]  # mean change for each draw of matched random features
    random_q95: float  # 95th percentile of the random draws
    p_value: float  # share of random draws whose mean change is >= delta ((1 + count) / (1 + draws))
    n_pairs: int


def _row_clamp_hook(
    sae: SAE,
    site: Site,
    feats: Int[Tensor, "R k"],
    targets: Float[Tensor, "R k"],
    active: Tensor,
):
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
    honest_mean: Float[Tensor, " d_sae"] | None = None,
    lying_mean: Float[Tensor, " d_sae"],
    n_draws: int = 100,
    batch_size: int = 16,
    max_rows: int = 512,
    n_boot: int = 1000,
    seed: int = 0,
) -> CausalCheck:
    """Change in P(truth) on the lying prompts of ``pairs`` when ``features`` are ablated or
    clamped at the final position, beside ``n_draws`` sets of random features whose mean
    activation on lying prompts (``lying_mean``, from other pairs) matches theirs.

    ``mode="clamp"`` sets each feature to ``honest_mean`` (its mean on honest prompts, from
    training pairs). Only the final position changes, so each lying prompt's prefix is run once
    (:func:`mechlie.core.kv.prefix_cache`), and every variant (no change, the top features, each random
    draw) is a row of a few short passes (:func:`mechlie.core.kv.run_rows`) that start at the site's
    block; the rows' hook is :class:`FeatureClamp`'s, with one feature set per row.
    """
    from mechlie.core.kv import prefix_cache, run_rows
    from mechlie.core.metrics import score_logits

    if mode not in ("ablate", "clamp"):
        raise SAEError(f"mode must be 'ablate' or 'clamp', got {mode!r}")
    if mode == "clamp" and honest_mean is None:
        raise SAEError("mode='clamp' needs honest_mean")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    check_sae(sae, model, site)
    answers = answer_set(model.tokenizer, pairs)
    draws = matched_random_features(lying_mean, features, n_draws, seed=seed)
    sets = [tuple(int(f) for f in features), *draws]  # variant 0: no change; 1: top; 2..: random
    k = len(sets[0])
    n = len(pairs)
    feat_of = torch.tensor([sets[0], *sets], dtype=torch.long)  # [V, k]; row 0 is a placeholder
    value_of = honest_mean[feat_of].float() if mode == "clamp" else torch.zeros(len(feat_of), k)
    active_of = torch.ones(len(feat_of), dtype=torch.bool)
    active_of[0] = False
    p_truth = torch.empty(len(feat_of), n)
    for s0 in range(0, n, batch_size * 8):  # prompts per prefix cache (memory)
        sub = range(s0, min(n, s0 + batch_size * 8))
        batch = tokenize(model, [pairs[i].lying for i in sub])
        cache = prefix_cache(model, batch)
        m = len(sub)
        per_chunk = max(1, max_rows // m)
        starts = range(0, len(feat_of), per_chunk)
        for v0 in tqdm(starts, desc=f"causal rows ({mode})", leave=False, disable=len(starts) < 3):
            vs = torch.arange(v0, min(len(feat_of), v0 + per_chunk))
            v_row = vs.repeat_interleave(m)  # rows: variant-major, prompts inside
            prompt = torch.arange(m).repeat(len(vs))
            hook = _row_clamp_hook(sae, site, feat_of[v_row], value_of[v_row], active_of[v_row])
            logits = run_rows(
                model,
                cache,
                prompt,
                batch.tokens[prompt, -1:],
                fwd_hooks=[(site.hook_name, hook)],
                start_layers=torch.full((len(prompt),), site.layer, dtype=torch.long),
            )[:, -1]
            idx = torch.as_tensor(list(sub))[prompt]  # the pair of each row
            rows_ans = AnswerSet(*(t[idx] for t in (answers.truth, answers.lie, answers.choices)))
            p_truth[v_row, idx] = score_logits(logits.cpu(), rows_ans).p_truth.cpu()
    base, top = p_truth[0], p_truth[1]

    honest_answers = []
    for i in range(0, n, batch_size):
        b = tokenize(model, [p.honest for p in pairs[i : i + batch_size]])
        honest_answers.append(model(b.tokens, attention_mask=b.attention_mask)[:, -1].float().cpu())
    p_honest = score_logits(torch.cat(honest_answers), answers).p_truth
    est = _bootstrap(lambda i: (top[i] - base[i]).mean(), n, n_boot=n_boot, seed=seed)
    r = (p_truth[2:] - base).mean(1)
    rand = r.tolist()
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
        random_deltas=rand,
        random_q95=float(torch.quantile(r, 0.95)),
        p_value=float((1 + (r >= est[0]).sum()) / (1 + len(r))),
        n_pairs=n,
    )


@torch.no_grad()
def feature_columns(
    sae: SAE, x: Float[Tensor, "tok d_in"], features: Sequence[int], *, chunk: int = 4096
) -> Float[Tensor, "tok k"]:
    """Activations of ``features`` only, without materializing all ``d_sae`` columns at once."""
    cols = torch.as_tensor(list(features), dtype=torch.long)
    return torch.cat([encode(sae, x[i : i + chunk])[:, cols] for i in range(0, len(x), chunk)])


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
    k: int = 10,
    k_causal: int = 5,
    n_draws: int = 100,
    n_contexts: int = 5,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    final: tuple[Tensor, Tensor] | None = None,
) -> tuple[dict, dict[str, Tensor]]:
    """The whole decomposition of the lie direction at one SAE's site (see the module docstring).

    Args:
        trained: from :func:`load_or_train_sae` (or wrap a loaded SAE in a :class:`TrainedSAE`).
        pairs: (honest, lying) pairs; ``train`` / ``test`` index them (split by fact).
        k: features reported; ``k_causal``: top "lying" features (positive train difference)
            ablated, and top features clamped to their honest mean, in the causal check.
        n_draws: random matched feature sets for the causal control.
        final: the site's (honest, lying) final-token activations, if already collected.

    Returns:
        ``(summary, tensors)``: JSON-able results, and the per-pair activations of the top features.
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
    recon = (f_l[tr].mean(0) - f_h[tr].mean(0)) @ w_dec
    dir_cos_recon = float(torch.nn.functional.cosine_similarity(recon, direction, dim=0))

    # Top contexts over the corpus lines the SAE was trained on (collected again if it came from the cache).
    corpus_acts = trained.acts
    if corpus_acts is None:
        train_lines = sorted(set(range(len(trained.corpus.texts))) - set(trained.eval_lines))
        a = collect_site(
            model, [trained.corpus.texts[i] for i in train_lines], site, batch_size=batch_size, progress=progress
        )
        corpus_acts = SiteActs(a.acts, torch.as_tensor(train_lines)[a.line], a.pos)
    cols = feature_columns(sae, corpus_acts.acts, feats)
    contexts = top_contexts(model, cols, corpus_acts, trained.corpus.texts, n=n_contexts)
    in_pairs = pair_contexts(f_h[:, feats], f_l[:, feats], pairs)

    test_pairs = [pairs[i] for i in test]
    lying_mean, honest_mean = f_l[tr].mean(0), f_h[tr].mean(0)
    train_diff = lying_mean - honest_mean
    lying_feats = [f for f in train_diff.argsort(descending=True)[:k_causal].tolist() if train_diff[f] > 0]
    checks = {}
    if lying_feats:
        checks["ablate"] = causal_check(
            model,
            sae,
            site,
            test_pairs,
            lying_feats,
            mode="ablate",
            lying_mean=lying_mean,
            n_draws=n_draws,
            batch_size=batch_size,
            seed=seed,
        )
    checks["clamp"] = causal_check(
        model,
        sae,
        site,
        test_pairs,
        feats[:k_causal],
        mode="clamp",
        honest_mean=honest_mean,
        lying_mean=lying_mean,
        n_draws=n_draws,
        batch_size=batch_size,
        seed=seed,
    )
    rows = fe.rows()
    for r, c, pc in zip(rows, contexts, in_pairs):
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


# ---------------------------------------------------------------------------------------------
# on-policy lies vs truths


def site_kind(site: Site) -> str:
    """The :mod:`mechlie.core.activations` kind whose hook is ``site``'s (for :mod:`mechlie.read.labels`)."""
    from mechlie.core.activations import LAYER_KINDS, hook_name

    for kind in ("z", *LAYER_KINDS):
        if hook_name(kind, site.layer) == site.hook_name:
            return kind
    raise SAEError(f"site {site}: no activation kind reads this hook (on-policy states need one)")


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
        e = bootstrap(lambda i, col=col: col[i].mean(), len(te), n_boot=n_boot, seed=seed)
        fr.append({"feature": int(feat), "diff": float(e.mean), "lo": float(e.lo), "hi": float(e.hi)})
    out["framing_features"] = fr
    return out
