"""SAE features (sae-lens) at the sites where lying is decided, over several SAE training seeds.

For each site and each of ``sae_seeds`` SAE training seeds, an SAE is loaded from the cache or
trained with sae-lens on an offline corpus (built-in pair prompts, mechlie/data/neutral.txt, the
model's own samples; trained once per model/site/settings/seed, see mechlie.sae). The corpus holds
no prompt of any fact the study analyses (every fact sampled for the study, before the known
filter), so the features are read on facts the SAE never saw. Per seed, the honest→lying
difference at the final prompt token is decomposed into its features: effect sizes with bootstrap
CIs over held-out pairs, decoder cosines with the difference-of-means direction, top-activating
contexts, and a causal check (ablate / clamp the top features on lying prompts, beside matched
random features), whose p-values are Holm-corrected over every test run (all sites, modes and
seeds; :mod:`mechlie.studies.sae_seeds`). A k-sparse probe on the SAE's features is compared with a
raw-activation probe at the same site on held-out facts and held-out relations
(:mod:`mechlie.sae.sparse_probe`). On-policy lies vs truths (answers sampled under the same lying
prompt) are decomposed at the first answer token, and the chosen heads get attention views and
direct logit attribution.

Every number that depends on the split of the facts (the features chosen, the causal checks with
their Holm correction, the held-out probes) is then repeated on ``n_split_seeds`` splits with the
same SAEs (:mod:`mechlie.studies.sae_splits`): mean ± SD over every (split, SAE seed) run, with the
SD over splits beside the SD over SAE seeds.

Writes RUN/: summary.json, features.safetensors, lying_heads.html (+ .json) and figures/. Figures
of one SAE's features are drawn for the first seed; the per-seed figures show every seed.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mechlie.core.hooks import hook_name
from mechlie.studies.base import Study, StudyResult, register
from mechlie.studies.flags import model_flag

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from transformer_lens import HookedTransformer

    from mechlie.core.cli import RunDir

log = logging.getLogger("mechlie")


@dataclass(frozen=True)
class SAEFeaturesConfig:
    model: str = model_flag()
    sites: tuple[str, ...] = field(
        default=(hook_name("resid_pre", 20), f"{hook_name('z', 20)}:5"),
        metadata={"help": "SAE sites: a hook name, or blocks.L.attn.hook_z:H for one head"},
    )
    heads: tuple[str, ...] = field(
        default=("L20H5", "L29H1", "L23H5"),
        metadata={"help": "heads for the attention views and DLA (LxHy); the README's top patching heads"},
    )
    sae_path: str = field(default="", metadata={"help": "use this sae-lens SAE folder (one site) instead of training"})
    n_pairs: int = field(default=30, metadata={"help": "fewshot pairs per relation, before the known filter"})
    multi_token: str = field(
        default="keep",
        metadata={"help": "facts whose answer is several tokens: keep (scored by the first token) or drop"},
    )
    known_only: bool = field(default=True, metadata={"help": "keep facts the model answers correctly when honest"})
    test_frac: float = 0.3
    on_policy_k: int = field(
        default=5, metadata={"help": "sampled answers per lying prompt for on-policy lie-vs-truth features (0: skip)"}
    )
    k: int = field(default=10, metadata={"help": "features reported per site"})
    k_causal: int = field(default=5, metadata={"help": "features ablated / clamped in the causal check"})
    n_draws: int = field(
        default=400,
        metadata={
            "help": "random matched feature sets (control); Holm over m tests needs m / (1 + n_draws) < alpha "
            "(12 tests by default: at least 240)"
        },
    )
    sae_seeds: int = field(
        default=3, metadata={"help": "SAE training seeds (train_seed = seed, seed + 1, ...); one SAE per site each"}
    )
    alpha: float = field(default=0.05, metadata={"help": "family-wise error of the Holm-corrected causal tests"})
    n_split_seeds: int = field(
        default=5,
        metadata={
            "help": "splits of the facts by fact (seed, seed + 1, ...) the causal checks and held-out probes are "
            "repeated on, with the same SAEs (0: the main split only)"
        },
    )
    probe_null: int = field(default=200, metadata={"help": "label-permutation draws of each probe's null"})
    expansion: int = field(default=4, metadata={"help": "SAE width = expansion * d_in"})
    top_k: int = field(default=32, metadata={"help": "TopK SAE: active features per token"})
    n_steps: int = field(default=800, metadata={"help": "SAE training steps"})
    pairs_per_format: int = field(default=10, metadata={"help": "corpus: pairs per relation and format"})
    n_samples: int = field(default=32, metadata={"help": "corpus: model samples"})
    seed: int = 0
    device: str = field(default="", metadata={"help": "cpu, cuda, ... (default: cuda when available)", "run": False})
    batch_size: int = field(default=16, metadata={"run": False})
    out_dir: str = "results/sae_features"
    run_name: str = ""

    def __post_init__(self) -> None:
        from mechlie import sae as S

        if not self.sites:
            raise ValueError("--sites needs at least one site")
        for s in self.sites:
            S.Site.parse(s)
        if self.sae_path and len(self.sites) != 1:
            raise ValueError("--sae-path applies to one site: pass exactly one --sites")
        if self.multi_token not in ("keep", "drop"):
            raise ValueError(f"--multi-token must be keep or drop, got {self.multi_token!r}")
        if self.n_pairs < 0 or not 0 < self.test_frac < 1:
            raise ValueError("n_pairs must be >= 0 and test_frac in (0, 1)")
        if self.on_policy_k < 0:
            raise ValueError("--on-policy-k must be >= 0")
        if self.k < 1 or self.k_causal < 1 or self.n_draws < 20 or self.probe_null < 20:
            raise ValueError("k and k_causal must be >= 1, n_draws and probe_null >= 20 (a null needs many draws)")
        if self.n_split_seeds == 1 or self.n_split_seeds < 0:
            n = self.n_split_seeds
            raise ValueError(f"--n-split-seeds must be 0 (skip) or >= 2 for an SD over splits, got {n}")
        if self.sae_seeds < 1 or not 0 < self.alpha < 1:
            raise ValueError("--sae-seeds must be >= 1 and --alpha in (0, 1)")
        if self.sae_path and self.sae_seeds != 1:
            raise ValueError("--sae-path is one SAE: pass --sae-seeds 1")
        self.train_config(self.sites[0], self.seed, ())  # its own checks
        self.head_tuples()

    def head_tuples(self) -> list[tuple[int, int]]:
        out = []
        for h in self.heads:
            m = re.fullmatch(r"L(\d+)H(\d+)", h)
            if not m:
                raise ValueError(f"--heads: {h!r} is not of the form L20H5")
            out.append((int(m.group(1)), int(m.group(2))))
        return out

    def train_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.sae_seeds)]

    def train_config(self, site: str, train_seed: int, exclude_facts: tuple[str, ...]):
        from mechlie import sae as S

        return S.SAETrainConfig(
            site=site,
            expansion=self.expansion,
            k=self.top_k,
            n_steps=self.n_steps,
            pairs_per_format=self.pairs_per_format,
            n_samples=self.n_samples,
            seed=self.seed,
            train_seed=train_seed,
            exclude_facts=exclude_facts,
        )


# ---------------------------------------------------------------------------------------------
# the computation


def run(cfg: SAEFeaturesConfig, model: HookedTransformer | None, run_dir: RunDir) -> SAEFeaturesResult:
    """Known pairs; per SAE seed one SAE per site, each decomposed and probed; the raw probes; the
    Holm correction and the numbers over seeds; on-policy features; head views."""
    import torch

    from mechlie import sae as S
    from mechlie.core.io import save_tensors
    from mechlie.read.directions import split_by_fact
    from mechlie.report import figures as figlib
    from mechlie.studies import sae_seeds as SS

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    if model is None:
        from mechlie.core.models import load_model

        model = load_model(cfg.model, device=cfg.device or None)
    for s in cfg.sites:
        S.Site.parse(s).validate(model)
    t_load = time.time() - t0
    pairs, n_shared, analysed = known_pairs(model, cfg)
    split = split_by_fact([p.fact_id for p in pairs], cfg.test_frac, cfg.seed)
    summary: dict = {
        "kind": "sae_features",
        "model": cfg.model,
        "dataset": "all (fewshot)",
        "n_known_pairs": len(pairs),
        "n_dropped_shared_first_token": n_shared,
        "n_analysed_facts": len(analysed),
        "sae_seeds": cfg.train_seeds(),
        "seconds": {"load": round(t_load, 1), "pairs": round(time.time() - t0 - t_load, 1)},
        "sites": {},
    }
    t1 = time.time()
    saes = _saes(model, cfg, analysed)  # [(train seed, TrainedSAE)], seed-major
    summary["seconds"]["saes"] = round(time.time() - t1, 1)
    summary["corpus_excluded"] = dict(saes[0][1].corpus.excluded)
    summary["corpus_counts"] = saes[0][1].corpus.counts()
    t1 = time.time()
    finals = _activations(model, cfg, [t for _, t in saes], pairs)
    summary["seconds"]["activations"] = round(time.time() - t1, 1)
    t1 = time.time()
    raw = SS.raw_probes(pairs, finals, [S.Site.parse(x) for x in cfg.sites], split, cfg.probe_null, cfg.seed)
    summary["seconds"]["raw_probes"] = round(time.time() - t1, 1)
    tensors = _per_seed(model, cfg, saes, pairs, split, finals, raw, summary)
    summary["causal_correction"] = SS.correct_causal(summary["sites"], cfg.n_draws, cfg.alpha)
    for r in summary["sites"].values():
        r["over_seeds"] = SS.over_seeds(r)
    if cfg.n_split_seeds:
        from mechlie.studies.sae_splits import run_splits

        t3 = time.time()
        summary["split_seeds"] = run_splits(model, cfg, saes, pairs, finals, summary)
        summary["seconds"]["split_seeds"] = round(time.time() - t3, 1)
    if cfg.on_policy_k:
        t3 = time.time()
        on_policy_features(model, cfg, saes, pairs, split, summary)
        summary["seconds"]["on_policy"] = round(time.time() - t3, 1)
    if cfg.heads:
        t3 = time.time()
        summary["heads"] = lying_heads(model, pairs, cfg.head_tuples(), run_dir, cfg.seed, cfg.batch_size)
        summary["seconds"]["heads"] = round(time.time() - t3, 1)
    save_tensors(run_dir.file("features.safetensors"), tensors, {"sites": list(cfg.sites), "seeds": cfg.train_seeds()})
    summary["seconds"]["total"] = round(time.time() - t0, 1)
    run_dir.write_json("summary.json", summary)  # the figures are drawn from the saved files
    result = SAEFeaturesResult.load(run_dir.path)
    summary["figures"] = figlib.save_figures(result.figures(), run_dir.path)
    return SAEFeaturesResult(run_dir.path, summary)


def _per_seed(model, cfg: SAEFeaturesConfig, saes, pairs, split, finals, raw, summary: dict) -> dict:
    """Each seed's SAE at each site decomposed (:func:`mechlie.sae.lie_features`) and probed, into
    ``summary["sites"][site]["seeds"][seed]``; returns every seed's per-pair top-feature tensors."""
    from mechlie import sae as S
    from mechlie.studies import sae_seeds as SS

    tensors = {}
    prompts = S.lying_prompts(model, [pairs[i] for i in split.test], cfg.batch_size)  # shared by every check
    for seed, trained in saes:
        site = str(trained.site)
        t2 = time.time()
        res, ts = S.lie_features(
            model,
            trained,
            pairs,
            split.train,
            split.test,
            k=cfg.k,
            k_causal=cfg.k_causal,
            n_draws=cfg.n_draws,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            final=(finals["honest"][trained.site], finals["lying"][trained.site]),
            prompts=prompts,
        )
        res["train_seed"] = seed
        t3 = time.time()
        res["sparse_probe"] = SS.sparse_probe(
            trained, pairs, finals, split, raw[trained.site], cfg.probe_null, cfg.seed
        )
        res["seconds"] = {"analysis": round(t3 - t2, 1), "sparse_probe": round(time.time() - t3, 1)}
        base = {"site": site, "d_sae": res["d_sae"], "n_test": res["n_test"], "seeds": {}}
        summary["sites"].setdefault(site, base)["seeds"][str(seed)] = res
        tensors[site if seed == cfg.seed else f"{site}@seed{seed}"] = ts
    return tensors


def known_pairs(model, cfg: SAEFeaturesConfig) -> tuple[list, int, tuple[str, ...]]:
    """Fewshot pairs of every relation whose truth and lie differ in their first token, and (with
    ``known_only``) that the model answers correctly when honest; how many shared a first token; and
    every fact sampled (the analysed facts, before either filter: the SAE corpus excludes them all)."""
    from mechlie.core.metrics import final_logits, score_logits
    from mechlie.core.pairs import answer_set, load_builtin

    pairs = load_builtin(
        "all", "fewshot", tokenizer=model.tokenizer, n=cfg.n_pairs or None, seed=cfg.seed, multi_token=cfg.multi_token
    )
    analysed = tuple(sorted({p.fact_id for p in pairs}))
    pairs, n_shared = distinct_first_tokens(model.tokenizer, pairs)
    logits = final_logits(model, [p.honest for p in pairs], batch_size=cfg.batch_size)
    known = score_logits(logits, answer_set(model.tokenizer, pairs)).correct
    if cfg.known_only:
        pairs = [p for p, k in zip(pairs, known.tolist()) if k]
    if len(pairs) < 8:
        hint = "use more --n-pairs or --no-known-only" if cfg.known_only else "use more --n-pairs"
        raise ValueError(f"only {len(pairs)} usable pairs (8 needed); {hint}")
    return pairs, n_shared, analysed


def _saes(model, cfg: SAEFeaturesConfig, analysed: tuple[str, ...]) -> list[tuple[int, object]]:
    """``(train seed, SAE)`` for every seed and site, seed-major: the one at ``sae_path`` (its quality
    measured on the corpus), or each from the cache, trained there first when missing."""
    from mechlie import sae as S

    if not cfg.sae_path:
        cfgs = [cfg.train_config(s, seed, analysed) for seed in cfg.train_seeds() for s in cfg.sites]
        saes = S.load_or_train_saes(model, cfgs, batch_size=cfg.batch_size)
        return [(c.train_seed, t) for c, t in zip(cfgs, saes)]
    site = S.Site.parse(cfg.sites[0])
    sae = S.load_sae(cfg.sae_path, device=str(model.cfg.device))
    S.check_sae(sae, model, site)
    corpus = S.build_corpus(
        model, pairs_per_format=cfg.pairs_per_format, n_samples=cfg.n_samples, seed=cfg.seed, exclude_facts=analysed
    )
    _, eval_lines = corpus.split(0.15, cfg.seed)
    texts = [corpus.texts[i] for i in eval_lines]
    q = S.sae_quality(model, sae, site, texts, batch_size=cfg.batch_size, seed=cfg.seed)
    info = {"loaded": cfg.sae_path, "quality": asdict(q), "corpus_excluded": dict(corpus.excluded)}
    return [(cfg.seed, S.TrainedSAE(sae, site, Path(cfg.sae_path), info, corpus, eval_lines))]


def _activations(model, cfg: SAEFeaturesConfig, saes: list, pairs: list) -> dict:
    """The final-token activations of every pair at every site; SAEs from the cache also get their
    corpus activations back (for top contexts), all sites in one pass."""
    import torch

    from mechlie import sae as S

    sites = [S.Site.parse(s) for s in cfg.sites]
    cached = [t for t in saes if t.acts is None]  # several seeds share a site: one pass reads it once
    if cached:
        corpus = cached[0].corpus
        lines = sorted(set(range(len(corpus.texts))) - set(cached[0].eval_lines))
        same = [t for t in cached if t.corpus == corpus and t.eval_lines == cached[0].eval_lines]
        got = S.collect_sites(
            model, [corpus.texts[i] for i in lines], sorted({t.site for t in same}, key=str), batch_size=cfg.batch_size
        )
        for t in same:
            a = got[t.site]
            t.acts = S.SiteActs(a.acts, torch.as_tensor(lines)[a.line], a.pos)
    return {
        side: S.final_acts_at(model, [getattr(p, side) for p in pairs], sites, batch_size=cfg.batch_size)
        for side in ("honest", "lying")
    }


def on_policy_features(model, cfg: SAEFeaturesConfig, saes, pairs, split, summary: dict) -> None:
    """On-policy lies vs truths: answers sampled under the same lying prompt (mechlie.read.labels),
    sampled once; each seed's SAE features at the first answer token, into that seed's entry of
    summary["sites"][site]["seeds"] as "on_policy"."""
    from mechlie import sae as S
    from mechlie.read.labels import on_policy

    sites = sorted({t.site for _, t in saes}, key=str)
    op = on_policy(
        model,
        pairs,
        k=cfg.on_policy_k,
        kinds=sorted({S.site_kind(s) for s in sites}),
        layers=sorted({s.layer for s in sites}),
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    rows = {s: S.on_policy_site_acts(op, s) for s in sites}
    for seed, t in saes:
        res = summary["sites"][str(t.site)]["seeds"][str(seed)]
        framing = [r["feature"] for r in res["features"]]
        out = S.on_policy_effects(
            t.sae, rows[t.site], split.train, split.test, framing_features=framing, k=cfg.k, seed=cfg.seed
        )
        out["label_counts"] = op.counts()["all"]
        res["on_policy"] = out


def distinct_first_tokens(tokenizer, pairs):
    """The pairs whose truth and lie differ in their first token (first-token metrics cannot score the
    others), and how many were left out (logged)."""
    from mechlie.core.pairs import first_token_ids

    keep = [p for p in pairs if not set(first_token_ids(tokenizer, p.truth)) & set(first_token_ids(tokenizer, p.lie))]
    if len(keep) < len(pairs):
        log.info("left out %d of %d pairs whose truth and lie share a first token", len(pairs) - len(keep), len(pairs))
    return keep, len(pairs) - len(keep)


def lying_heads(model, pairs, heads, run_dir: RunDir, seed: int, batch_size: int = 16) -> dict:
    """Attention of the heads' final token on the demonstrations' answers, and their DLA, with the
    circuitsvis page (honest vs lying prompt side by side): lying_heads.html (+ .json)."""
    import json

    from mechlie.report import views

    path = views.write_head_views(model, pairs, heads, run_dir.path, batch_size=batch_size, seed=seed)
    rows = json.loads(path.with_suffix(".json").read_text())["rows"]
    return {"rows": rows, "html": path.name, "example_fact": pairs[0].fact_id}


# ---------------------------------------------------------------------------------------------
# the result


def site_tag(site: str) -> str:
    """A file-name stem for a site: ``blocks.2.hook_resid_pre`` -> ``b2_resid_pre``."""
    return site.replace("blocks.", "b").replace(".hook_", "_").replace(".attn", "").replace(":", "h")


class SAEFeaturesResult(StudyResult):
    """An SAE-features run: ``summary.json`` (per site and SAE seed: SAE quality, features, causal
    check with its Holm-corrected p-value, sparse probe, on-policy features; per site the numbers
    over seeds; the heads) and ``features.safetensors`` (every seed's top features, per pair)."""

    study = "sae_features"
    required = ("model", "sites", "n_known_pairs", "sae_seeds", "causal_correction")
    files = ("features.safetensors",)
    title_format = "SAE features: {model}, {dataset}, {n_known_pairs} known pairs, {n_seeds} SAE seeds"
    site_keys = ("d_sae", "n_test", "seeds", "over_seeds")
    seed_keys = ("features", "causal", "sae", "null_max_diff", "n_test", "sparse_probe")

    @classmethod
    def load(cls, run_dir: str | Path) -> SAEFeaturesResult:
        res = super().load(run_dir)
        for r in res.summary()["sites"].values():
            cls.check_keys(run_dir, r, cls.site_keys)
            for x in r["seeds"].values():
                cls.check_keys(run_dir, x, cls.seed_keys)
        return res

    def title(self) -> str:
        s = self._summary
        return self.title_format.format(**{**s, "n_seeds": len(s["sae_seeds"])})

    def figures(self) -> dict[str, go.Figure]:
        from mechlie.studies.sae_figures import head_figures, seed_figures, site_figures

        tensors, _ = self.tensors("features.safetensors")
        figs: dict[str, go.Figure] = {}
        for site, r in self._summary["sites"].items():
            first = next(iter(r["seeds"].values()))
            figs.update(site_figures(self._summary["model"], site, site_tag(site), first, tensors.get(site)))
            figs.update(seed_figures(self._summary["model"], site, site_tag(site), r))
        figs.update(head_figures(self._summary))
        if "split_seeds" in self._summary:
            from mechlie.studies.sae_splits import figures as split_figures

            figs.update(split_figures(self._summary["model"], self._summary["split_seeds"], site_tag))
        return figs

    def captions(self) -> dict[str, str]:
        from mechlie.studies.sae_figures import captions

        return captions(self._summary, site_tag)

    def headline(self) -> list[str]:
        from mechlie.studies.sae_figures import headline_lines

        return headline_lines(self._summary)

    def report(self) -> str:
        from mechlie.studies.sae_figures import report_text

        return report_text(self._summary, self.config(), self.run_dir)


STUDY = register(Study("sae_features", SAEFeaturesConfig, run, SAEFeaturesResult, load_model=False))
