"""SAE features (sae-lens) at the sites where lying is decided.

For each site, an SAE is loaded from the cache or trained with sae-lens on an offline corpus
(built-in pair prompts, mechlie/data/neutral.txt, the model's own samples; trained once per
model/site/settings, see mechlie.sae), and the honest→lying difference at the final prompt token
is decomposed into its features: effect sizes with bootstrap CIs over held-out pairs, decoder
cosines with the difference-of-means direction, top-activating contexts, and a causal check
(ablate / clamp the top features on lying prompts, beside matched random features). On-policy
lies vs truths (answers sampled under the same lying prompt) are decomposed at the first answer
token, and the chosen heads get attention views and direct logit attribution.

Writes RUN/: summary.json, features.safetensors, lying_heads.html (+ .json) and figures/.
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
    n_draws: int = field(default=100, metadata={"help": "random matched feature sets (control)"})
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
        if self.k < 1 or self.k_causal < 1 or self.n_draws < 20:
            raise ValueError("k and k_causal must be >= 1, n_draws >= 20 (a null needs many draws)")
        self.train_config(self.sites[0])  # its own checks
        self.head_tuples()

    def head_tuples(self) -> list[tuple[int, int]]:
        out = []
        for h in self.heads:
            m = re.fullmatch(r"L(\d+)H(\d+)", h)
            if not m:
                raise ValueError(f"--heads: {h!r} is not of the form L20H5")
            out.append((int(m.group(1)), int(m.group(2))))
        return out

    def train_config(self, site: str):
        from mechlie import sae as S

        return S.SAETrainConfig(
            site=site,
            expansion=self.expansion,
            k=self.top_k,
            n_steps=self.n_steps,
            pairs_per_format=self.pairs_per_format,
            n_samples=self.n_samples,
            seed=self.seed,
        )


# ---------------------------------------------------------------------------------------------
# the computation


def run(cfg: SAEFeaturesConfig, model: HookedTransformer | None, run_dir: RunDir) -> SAEFeaturesResult:
    """Known pairs, one SAE per site, the decomposition per site, on-policy features, head views."""
    import torch

    from mechlie import sae as S
    from mechlie.core.io import save_tensors
    from mechlie.read.directions import split_by_fact
    from mechlie.report import figures as figlib

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    if model is None:
        from mechlie.core.models import load_model

        model = load_model(cfg.model, device=cfg.device or None)
    for s in cfg.sites:
        S.Site.parse(s).validate(model)
    t_load = time.time() - t0
    pairs, n_shared = known_pairs(model, cfg)
    split = split_by_fact([p.fact_id for p in pairs], cfg.test_frac, cfg.seed)
    summary: dict = {
        "kind": "sae_features",
        "model": cfg.model,
        "dataset": "all (fewshot)",
        "n_known_pairs": len(pairs),
        "n_dropped_shared_first_token": n_shared,
        "seconds": {"load": round(t_load, 1), "pairs": round(time.time() - t0 - t_load, 1)},
        "sites": {},
    }
    t1 = time.time()
    saes = _saes(model, cfg)
    summary["seconds"]["saes"] = round(time.time() - t1, 1)
    summary["seconds"]["sae_stages"] = {str(t.site): t.info.get("seconds", {}) for t in saes}
    t1 = time.time()
    finals = _activations(model, cfg, saes, pairs)
    summary["seconds"]["activations"] = round(time.time() - t1, 1)
    tensors = {}
    for trained in saes:
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
        )
        res["seconds"] = {"analysis": round(time.time() - t2, 1)}
        summary["sites"][site] = res
        tensors[site] = ts
    if cfg.on_policy_k:
        t3 = time.time()
        on_policy_features(model, cfg, saes, pairs, split, summary)
        summary["seconds"]["on_policy"] = round(time.time() - t3, 1)
    if cfg.heads:
        t3 = time.time()
        summary["heads"] = lying_heads(model, pairs, cfg.head_tuples(), run_dir, cfg.seed, cfg.batch_size)
        summary["seconds"]["heads"] = round(time.time() - t3, 1)
    save_tensors(run_dir.file("features.safetensors"), tensors, {"sites": list(cfg.sites)})
    summary["seconds"]["total"] = round(time.time() - t0, 1)
    run_dir.write_json("summary.json", summary)  # the figures are drawn from the saved files
    result = SAEFeaturesResult.load(run_dir.path)
    summary["figures"] = figlib.save_figures(result.figures(), run_dir.path)
    return SAEFeaturesResult(run_dir.path, summary)


def known_pairs(model, cfg: SAEFeaturesConfig) -> tuple[list, int]:
    """Fewshot pairs of every relation whose truth and lie differ in their first token, and (with
    ``known_only``) that the model answers correctly when honest; and how many shared a first token."""
    from mechlie.core.metrics import final_logits, score_logits
    from mechlie.core.pairs import answer_set, load_builtin

    pairs = load_builtin(
        "all", "fewshot", tokenizer=model.tokenizer, n=cfg.n_pairs or None, seed=cfg.seed, multi_token=cfg.multi_token
    )
    pairs, n_shared = distinct_first_tokens(model.tokenizer, pairs)
    logits = final_logits(model, [p.honest for p in pairs], batch_size=cfg.batch_size)
    known = score_logits(logits, answer_set(model.tokenizer, pairs)).correct
    if cfg.known_only:
        pairs = [p for p, k in zip(pairs, known.tolist()) if k]
    if len(pairs) < 8:
        hint = "use more --n-pairs or --no-known-only" if cfg.known_only else "use more --n-pairs"
        raise ValueError(f"only {len(pairs)} usable pairs (8 needed); {hint}")
    return pairs, n_shared


def _saes(model, cfg: SAEFeaturesConfig) -> list:
    """The SAE of every site: the one at ``sae_path`` (its quality measured on the corpus), or each
    site's from the cache, trained there first when missing."""
    from mechlie import sae as S

    if not cfg.sae_path:
        return S.load_or_train_saes(model, [cfg.train_config(s) for s in cfg.sites], batch_size=cfg.batch_size)
    site = S.Site.parse(cfg.sites[0])
    sae = S.load_sae(cfg.sae_path, device=str(model.cfg.device))
    S.check_sae(sae, model, site)
    corpus = S.build_corpus(model, pairs_per_format=cfg.pairs_per_format, n_samples=cfg.n_samples, seed=cfg.seed)
    _, eval_lines = corpus.split(0.15, cfg.seed)
    texts = [corpus.texts[i] for i in eval_lines]
    q = S.sae_quality(model, sae, site, texts, batch_size=cfg.batch_size, seed=cfg.seed)
    info = {"loaded": cfg.sae_path, "quality": asdict(q)}
    return [S.TrainedSAE(sae, site, Path(cfg.sae_path), info, corpus, eval_lines)]


def _activations(model, cfg: SAEFeaturesConfig, saes: list, pairs: list) -> dict:
    """The final-token activations of every pair at every site; SAEs from the cache also get their
    corpus activations back (for top contexts), all sites in one pass."""
    import torch

    from mechlie import sae as S

    sites = [S.Site.parse(s) for s in cfg.sites]
    cached = [t for t in saes if t.acts is None]
    if cached:
        corpus = cached[0].corpus
        lines = sorted(set(range(len(corpus.texts))) - set(cached[0].eval_lines))
        same = [t for t in cached if t.corpus == corpus and t.eval_lines == cached[0].eval_lines]
        got = S.collect_sites(
            model, [corpus.texts[i] for i in lines], [t.site for t in same], batch_size=cfg.batch_size
        )
        for t in same:
            a = got[t.site]
            t.acts = S.SiteActs(a.acts, torch.as_tensor(lines)[a.line], a.pos)
    return {
        side: S.final_acts_at(model, [getattr(p, side) for p in pairs], sites, batch_size=cfg.batch_size)
        for side in ("honest", "lying")
    }


def on_policy_features(model, cfg: SAEFeaturesConfig, saes, pairs, split, summary: dict) -> None:
    """On-policy lies vs truths: answers sampled under the same lying prompt (mechlie.read.labels), each
    site's features at the first answer token, into summary["sites"][site]["on_policy"]."""
    from mechlie import sae as S
    from mechlie.read.labels import on_policy

    sites = [t.site for t in saes]
    op = on_policy(
        model,
        pairs,
        k=cfg.on_policy_k,
        kinds=sorted({S.site_kind(s) for s in sites}),
        layers=sorted({s.layer for s in sites}),
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    for t in saes:
        site = str(t.site)
        framing = [r["feature"] for r in summary["sites"][site]["features"]]
        res = S.on_policy_effects(
            t.sae,
            S.on_policy_site_acts(op, t.site),
            split.train,
            split.test,
            framing_features=framing,
            k=cfg.k,
            seed=cfg.seed,
        )
        res["label_counts"] = op.counts()["all"]
        summary["sites"][site]["on_policy"] = res


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


def _fmt(m: float, lo: float, hi: float, p: int = 2) -> str:
    return f"{m:.{p}f} [{lo:.{p}f}, {hi:.{p}f}]"


def _tri(d: dict) -> tuple[float, float, float]:
    return (d["mean"], d["lo"], d["hi"])


def site_tag(site: str) -> str:
    """A file-name stem for a site: ``blocks.2.hook_resid_pre`` -> ``b2_resid_pre``."""
    return site.replace("blocks.", "b").replace(".hook_", "_").replace(".attn", "").replace(":", "h")


class SAEFeaturesResult(StudyResult):
    """An SAE-features run: ``summary.json`` (per site: SAE quality, features, causal check,
    on-policy features; the heads) and ``features.safetensors`` (every feature's numbers)."""

    study = "sae_features"
    required = ("model", "sites", "n_known_pairs")
    files = ("features.safetensors",)
    title_format = "SAE features: {model}, {dataset}, {n_known_pairs} known pairs"
    site_keys = ("features", "causal", "sae", "null_max_diff", "n_test")

    @classmethod
    def load(cls, run_dir: str | Path) -> SAEFeaturesResult:
        res = super().load(run_dir)
        for r in res.summary()["sites"].values():
            cls.check_keys(run_dir, r, cls.site_keys)
        return res

    def figures(self) -> dict[str, go.Figure]:
        from mechlie.studies.sae_figures import head_figures, site_figures

        tensors, _ = self.tensors("features.safetensors")
        figs: dict[str, go.Figure] = {}
        for site, r in self._summary["sites"].items():
            figs.update(site_figures(self._summary["model"], site, site_tag(site), r, tensors.get(site)))
        figs.update(head_figures(self._summary))
        return figs

    def captions(self) -> dict[str, str]:
        from mechlie.studies.sae_figures import captions

        return captions(self._summary, site_tag)

    def headline(self) -> list[str]:
        s = self._summary
        lines: list[str] = []
        for site, r in s["sites"].items():
            q = r["sae"].get("quality")
            if q:
                lines.append(
                    f"- **{site}** (d_sae {r['d_sae']}): L0 {q['l0']:.1f}, "
                    f"explained variance {q['explained_variance']:.3f}, "
                    f"CE loss recovered {_fmt(q['ce_recovered'], q['ce_recovered_lo'], q['ce_recovered_hi'])} "
                    f"(zero-ablation baseline, {q['n_lines']} held-out lines)."
                )
            top = r["features"][0]
            lines.append(
                f"- Top feature f{top['feature']}: lying − honest {_fmt(top['diff'], top['lo'], top['hi'], 3)} "
                f"(null of the max {r['null_max_diff']:.3f}), effect size {top['effect_size']:.2f}, "
                f"decoder cosine {top['cosine']:.2f}."
            )
            op = r.get("on_policy")
            if op:
                counts = (
                    f"{op['n_lie']} sampled lies, {op['n_truth']} truths, {op['n_pairs_with_both']} pairs with both"
                )
                if op.get("features"):
                    t0 = op["features"][0]
                    lines.append(
                        f"- On-policy ({counts}): top feature f{t0['feature']} lie − truth "
                        f"{_fmt(t0['diff'], t0['lo'], t0['hi'], 3)} (null of the max {op['null_max_diff']:.3f}, "
                        f"{op['n_test']} held-out pairs)."
                    )
                else:
                    lines.append(f"- On-policy: {counts}; {op.get('too_few', 'no decomposition')}.")
            for mode, c in r["causal"].items():
                lines.append(
                    f"- {mode} {len(c['features'])} top features: ΔP(truth) "
                    f"{_fmt(c['delta'], c['delta_lo'], c['delta_hi'], 3)} vs. "
                    f"random matched features (95th pct. {c['random_q95']:+.3f}, p = {c['p_value']:.3f})."
                )
        heads = s.get("heads")
        if heads:
            for row in heads["rows"]:
                lines.append(
                    f"- {row['head']}: attention on demo answers honest {_fmt(*_tri(row['share_honest']))}, lying "
                    f"{_fmt(*_tri(row['share_lying']))}; DLA honest {_fmt(*_tri(row['dla_honest']))}, "
                    f"lying {_fmt(*_tri(row['dla_lying']))}."
                )
            if heads.get("html"):
                lines.append(f"- circuitsvis attention patterns (honest vs lying): `{heads['html']}` in the run folder")
        return lines

    def report(self) -> str:
        from mechlie.studies.sae_figures import report_text

        return report_text(self._summary, self.config(), self.run_dir)


STUDY = register(Study("sae_features", SAEFeaturesConfig, run, SAEFeaturesResult, load_model=False))
