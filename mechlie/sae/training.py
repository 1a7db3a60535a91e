"""Training small TopK SAEs with sae-lens, and the cache that trains each one once.

mechlie never implements an SAE: the SAE classes, their training step and their trainer are
sae-lens's (``TopKTrainingSAE`` trained by ``SAETrainer``; TopK as in Gao et al. 2024, "Scaling and
evaluating sparse autoencoders", so the L0 is set by ``k`` rather than tuned through an L1
coefficient).

:func:`load_or_train_sae`: for models without a published SAE (the embedded ones), train one on
the offline corpus (:func:`mechlie.sae.corpus.build_corpus`) and cache it under
``<cache_dir>/sae/<key>/`` (:func:`mechlie.sae.loading.cache_key`: the model's weights, the site and
every setting), so it is trained once. The entry is written to a temporary folder and renamed into
place, with the corpus and the quality on held-out lines (:func:`mechlie.sae.quality.sae_qualities`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from jaxtyping import Float
from sae_lens import SAE, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.core.models import default_cache_dir, model_id
from mechlie.sae.corpus import Corpus, SiteActs, build_corpus, collect_sites
from mechlie.sae.loading import SAE_FORMAT_VERSION, SAEError, Site, cache_entry, cache_key, check_sae, load_sae
from mechlie.sae.quality import SAEQuality, sae_qualities

log = logging.getLogger(__name__)


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
    seed: int = 0  # the corpus: its pair draw, samples and held-out lines
    # The SAE's own randomness (initialisation, batch order); several train seeds on one corpus
    # measure how much a result depends on the SAE that happened to be trained.
    train_seed: int = 0
    exclude_facts: tuple[str, ...] = ()  # facts the corpus must not hold (the analysed ones)

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
    torch.manual_seed(cfg.train_seed)
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
    trainer = SAETrainer(trainer_cfg, sae, _batches(acts, cfg.batch_size, cfg.train_seed))
    return trainer.fit()


@dataclass
class TrainedSAE:
    sae: SAE
    site: Site
    path: Path  # the cache entry (a sae-lens folder: load_sae(path) reloads it)
    info: dict  # settings, corpus counts, quality, timings
    corpus: Corpus
    eval_lines: list[int] = field(default_factory=list)
    acts: SiteActs | None = None  # the corpus activations it was trained on, when trained in this process


def _load_entry(out: Path, model: HookedTransformer, site: Site, device: str) -> TrainedSAE:
    info = json.loads((out / "mechlie.json").read_text())
    if info.get("format_version") != SAE_FORMAT_VERSION:
        raise SAEError(f"{out} was written by another version of mechlie.sae; delete it to retrain")
    corpus_d = json.loads((out / "corpus.json").read_text())
    sae = load_sae(out, device=device)
    check_sae(sae, model, site)
    log.info("SAE for %s loaded from the cache (%s)", site, out)
    excluded = tuple((str(why), int(n)) for why, n in corpus_d.get("excluded", []))
    corpus = Corpus(tuple(corpus_d["texts"]), tuple(corpus_d["sources"]), excluded)
    return TrainedSAE(sae, site, out, info, corpus, info["eval_lines"])


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
        _load_entry(cache_entry(root, k), model, s_, device)
        if (cache_entry(root, k) / "mechlie.json").is_file()
        else None
        for k, s_ in zip(keys, sites)
    ]
    todo = [i for i, t in enumerate(out) if t is None]
    corpus_of = lambda c: (c.pairs_per_format, c.n_samples, c.sample_tokens, c.seed, c.eval_frac, c.exclude_facts)  # noqa: E731
    groups: dict[tuple, list[int]] = {}
    for i in todo:
        groups.setdefault(corpus_of(cfgs[i]), []).append(i)
    for idx in groups.values():
        trained = _train_group(
            model,
            [cfgs[i] for i in idx],
            [sites[i] for i in idx],
            [keys[i] for i in idx],
            root,
            device=device,
            batch_size=batch_size,
            progress=progress,
        )
        for i, t in zip(idx, trained):
            out[i] = t
    return [t for t in out if t is not None]


def _train_group(
    model: HookedTransformer,
    cfgs: Sequence[SAETrainConfig],
    sites: Sequence[Site],
    keys: Sequence[str],
    root: Path,
    *,
    device: str,
    batch_size: int,
    progress: bool,
) -> list[TrainedSAE]:
    """Train and cache SAEs whose corpus settings agree (those of ``cfgs[0]``): one corpus, one
    pass over it for every site, and one clean pass for every SAE's quality."""
    c0 = cfgs[0]
    t0 = time.time()
    corpus = build_corpus(
        model,
        pairs_per_format=c0.pairs_per_format,
        n_samples=c0.n_samples,
        sample_tokens=c0.sample_tokens,
        seed=c0.seed,
        batch_size=batch_size,
        exclude_facts=c0.exclude_facts,
    )
    train_lines, eval_lines = corpus.split(c0.eval_frac, c0.seed)
    t_corpus = time.time() - t0
    acts = collect_sites(
        model, [corpus.texts[i] for i in train_lines], list(sites), batch_size=batch_size, progress=progress
    )
    t_acts = time.time() - t0 - t_corpus
    trained, seconds = [], []
    for cfg, site in zip(cfgs, sites):
        t1 = time.time()
        trained.append(_train_one(model, cfg, site, acts[site], corpus, len(train_lines), device))
        seconds.append(
            {"corpus": round(t_corpus, 1), "activations": round(t_acts, 1), "train": round(time.time() - t1, 1)}
        )
    t1 = time.time()
    qs = sae_qualities(
        model, list(zip(trained, sites)), [corpus.texts[j] for j in eval_lines], batch_size=batch_size, seed=c0.seed
    )
    out = []
    for sae, q, cfg, site, key, sec in zip(trained, qs, cfgs, sites, keys, seconds):
        sec["quality (all sites of the pass)"] = round(time.time() - t1, 1)
        out.append(
            _save_entry(
                model,
                sae,
                q,
                cfg,
                site,
                key,
                cache_entry(root, key),
                corpus,
                train_lines,
                eval_lines,
                acts[site],
                device,
                sec,
            )
        )
    return out


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
        "model_hash": model_id(model),
        "site": str(site),
        "config": asdict(cfg),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "corpus": corpus.counts(),
        "corpus_excluded": dict(corpus.excluded),
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
        corpus_d = {"texts": corpus.texts, "sources": corpus.sources, "excluded": corpus.excluded}
        (tmp / "corpus.json").write_text(json.dumps(corpus_d))
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
