"""Inside the lie direction: SAE features (sae-lens) at the sites where lying is decided.

    python analyses/sae_features.py                         # SmolLM2, resid_pre of block 20 + head L20H5
    python analyses/sae_features.py --sites blocks.19.hook_resid_pre --device cuda

For each site, an SAE is loaded from the cache or trained with sae-lens on an offline corpus
(built-in pair prompts, mechlie/data/neutral.txt, the model's own samples; trained once per
model/site/settings, see mechlie.sae.features), and the honest→lying difference at the final prompt token
is decomposed into its features: effect sizes with bootstrap CIs over held-out pairs, decoder
cosines with the difference-of-means direction, top-activating contexts, and a causal check
(ablate / clamp the top features on lying prompts, beside matched random features). Writes
results/sae_features/<run>/ (summary.json, features.safetensors, figures).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mechlie.core.cli import RunDir, run_script
from mechlie.core.models import DEFAULT_MODEL


@dataclass(frozen=True)
class SAEFeaturesConfig:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "embedded name, .gguf file, HF dir, or TL name"})
    sites: tuple[str, ...] = field(
        default=("blocks.20.hook_resid_pre", "blocks.20.attn.hook_z:5"),
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
        from mechlie.sae.features import Site

        if not self.sites:
            raise ValueError("--sites needs at least one site")
        for s in self.sites:
            Site.parse(s)
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
        import re

        out = []
        for h in self.heads:
            m = re.fullmatch(r"L(\d+)H(\d+)", h)
            if not m:
                raise ValueError(f"--heads: {h!r} is not of the form L20H5")
            out.append((int(m.group(1)), int(m.group(2))))
        return out

    def train_config(self, site: str):
        from mechlie.sae.features import SAETrainConfig

        return SAETrainConfig(
            site=site,
            expansion=self.expansion,
            k=self.top_k,
            n_steps=self.n_steps,
            pairs_per_format=self.pairs_per_format,
            n_samples=self.n_samples,
            seed=self.seed,
        )


def main(cfg: SAEFeaturesConfig, run: RunDir) -> dict:
    from mechlie.core.io import save_tensors
    from mechlie.core.metrics import score_logits
    from mechlie.core.models import load_model
    from mechlie.core.pairs import answer_set, load_builtin
    from mechlie.read.directions import split_by_fact
    from mechlie.report.kinds import write_figures
    from mechlie.sae import features as S
    from mechlie.studies.steering_eval import batches, last_logits

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, device=cfg.device or None)
    for s in cfg.sites:
        S.Site.parse(s).validate(model)
    t_load = time.time() - t0
    pairs = load_builtin(
        "all", "fewshot", tokenizer=model.tokenizer, n=cfg.n_pairs or None, seed=cfg.seed, multi_token=cfg.multi_token
    )
    pairs, n_shared = distinct_first_tokens(model.tokenizer, pairs)
    with torch.no_grad():
        known = score_logits(
            last_logits(model, batches(model, [p.honest for p in pairs], cfg.batch_size)),
            answer_set(model.tokenizer, pairs),
        ).correct
    if cfg.known_only:
        pairs = [p for p, k in zip(pairs, known.tolist()) if k]
    if len(pairs) < 8:
        raise ValueError(f"only {len(pairs)} usable pairs; use more --n-pairs or --no-known-only")
    split = split_by_fact([p.fact_id for p in pairs], cfg.test_frac, cfg.seed)
    summary: dict = {
        "model": cfg.model,
        "dataset": "all (fewshot)",
        "n_known_pairs": len(pairs),
        "n_dropped_shared_first_token": n_shared,
        "seconds": {"load": round(t_load, 1), "pairs": round(time.time() - t0 - t_load, 1)},
        "sites": {},
    }
    sites = [S.Site.parse(s) for s in cfg.sites]
    t1 = time.time()
    if cfg.sae_path:
        sae = S.load_sae(cfg.sae_path, device=str(model.cfg.device))
        S.check_sae(sae, model, sites[0])
        corpus = S.build_corpus(model, pairs_per_format=cfg.pairs_per_format, n_samples=cfg.n_samples, seed=cfg.seed)
        _, eval_lines = corpus.split(0.15, cfg.seed)
        q = S.sae_quality(
            model, sae, sites[0], [corpus.texts[i] for i in eval_lines], batch_size=cfg.batch_size, seed=cfg.seed
        )
        saes = [
            S.TrainedSAE(
                sae, sites[0], Path(cfg.sae_path), {"loaded": cfg.sae_path, "quality": asdict(q)}, corpus, eval_lines
            )
        ]
    else:
        saes = S.load_or_train_saes(model, [cfg.train_config(s) for s in cfg.sites], batch_size=cfg.batch_size)
    summary["seconds"]["saes"] = round(time.time() - t1, 1)
    summary["seconds"]["sae_stages"] = {str(t.site): t.info.get("seconds", {}) for t in saes}
    t1 = time.time()
    cached = [t for t in saes if t.acts is None]
    if cached:  # SAEs from the cache: their corpus activations (for top contexts), all sites in one pass
        corpus = cached[0].corpus
        lines = sorted(set(range(len(corpus.texts))) - set(cached[0].eval_lines))
        same = [t for t in cached if t.corpus == corpus and t.eval_lines == cached[0].eval_lines]
        got = S.collect_sites(
            model, [corpus.texts[i] for i in lines], [t.site for t in same], batch_size=cfg.batch_size
        )
        for t in same:
            a = got[t.site]
            t.acts = S.SiteActs(a.acts, torch.as_tensor(lines)[a.line], a.pos)
    finals = {
        side: S.final_acts_at(model, [getattr(p, side) for p in pairs], sites, batch_size=cfg.batch_size)
        for side in ("honest", "lying")
    }
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
        _print_site(site, res)
    if cfg.on_policy_k:
        t3 = time.time()
        on_policy_features(model, cfg, saes, pairs, split, summary)
        summary["seconds"]["on_policy"] = round(time.time() - t3, 1)
    if cfg.heads:
        t3 = time.time()
        summary["heads"] = lying_heads(model, pairs, cfg.head_tuples(), run, cfg.seed, cfg.batch_size)
        summary["seconds"]["heads"] = round(time.time() - t3, 1)
    save_tensors(run.file("features.safetensors"), tensors, {"sites": list(cfg.sites)})
    summary["seconds"]["total"] = round(time.time() - t0, 1)
    summary["kind"] = "sae_features"
    run.write_json("summary.json", summary)
    summary["figures"] = write_figures(run.path)
    print(f"\ntotal {summary['seconds']['total']} s; figures and report: python analyses/make_figures.py {run.path}")
    return summary


def on_policy_features(model, cfg: SAEFeaturesConfig, saes, pairs, split, summary: dict) -> None:
    """On-policy lies vs truths: answers sampled under the same lying prompt (mechlie.read.labels), each
    site's features at the first answer token, into summary["sites"][site]["on_policy"]."""
    from mechlie.read.labels import on_policy
    from mechlie.sae import features as S

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
    print(f"\nOn-policy answers, lying prompts ({cfg.on_policy_k} samples each): {op.counts()['all']}")
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
        print(
            f"== {site}: {res['n_lie']} sampled lies, {res['n_truth']} truths; {res['n_pairs_with_both']} pairs with "
            f"both ({res['n_train']} train / {res['n_test']} test)"
        )
        if "too_few" in res:
            print("  " + res["too_few"])
            continue
        print(f"  top features, lie − truth on held-out pairs (null of the max {res['null_max_diff']:.3f}):")
        for r in res["features"]:
            print(f"  f{r['feature']:<5} {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] d={r['effect_size']:+.2f}")
        print("  the framing (honest vs lying prompt) features on the same answers:")
        for r in res["framing_features"]:
            print(f"  f{r['feature']:<5} {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]")


def distinct_first_tokens(tokenizer, pairs):
    """The pairs whose truth and lie differ in their first token (first-token metrics cannot score the
    others), and how many were left out (logged)."""
    from mechlie.core.pairs import first_token_ids

    keep = [p for p in pairs if not set(first_token_ids(tokenizer, p.truth)) & set(first_token_ids(tokenizer, p.lie))]
    if len(keep) < len(pairs):
        print(f"left out {len(pairs) - len(keep)} of {len(pairs)} pairs whose truth and lie share a first token")
    return keep, len(pairs) - len(keep)


def lying_heads(model, pairs, heads, run: RunDir, seed: int, batch_size: int = 16) -> dict:
    """Attention of the heads' final token on the demonstrations' answers, and their DLA, with the
    circuitsvis page (honest vs lying prompt side by side): lying_heads.html (+ .json)."""
    import json

    from mechlie.report import views

    path = views.write_head_views(model, pairs, heads, run.path, batch_size=batch_size, seed=seed)
    rows = json.loads(path.with_suffix(".json").read_text())["rows"]
    print(
        "\nLying heads: final-token attention on the demonstrations' answers, and DLA (truth − lie), "
        f"mean [95% CI] over {len(pairs)} pairs:"
    )
    for row in rows:
        print("  " + row["verdict"])
    return {"rows": rows, "html": path.name, "example_fact": pairs[0].fact_id}


def _print_site(site: str, res: dict) -> None:
    q = res["sae"].get("quality")
    print(f"\n== {site}: SAE d_sae={res['d_sae']} ({res['sae_path']})")
    if q:
        print(
            f"L0 {q['l0']:.1f}, explained variance {q['explained_variance']:.3f}, CE recovered "
            f"{q['ce_recovered']:.3f} [{q['ce_recovered_lo']:.3f}, {q['ce_recovered_hi']:.3f}] "
            f"(CE clean {q['ce_clean']:.3f}, SAE {q['ce_sae']:.3f}, zero-abl. {q['ce_zero']:.3f}; "
            f"{q['n_lines']} held-out lines)"
        )
    print(
        f"top features, lying − honest on {res['n_test']} held-out pairs (null of the max: {res['null_max_diff']:.3f}):"
    )
    for r in res["features"]:
        ctx = r["corpus_contexts"][0]["context"] if r["corpus_contexts"] else ""
        print(
            f"  f{r['feature']:<5} {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] d={r['effect_size']:+.2f} "
            f"cos={r['cosine']:+.2f}  {ctx[-60:]!r}"
        )
    for m, c in res["causal"].items():
        print(
            f"causal ({m} {list(c['features'])}): ΔP(truth) {c['delta']:+.3f} "
            f"[{c['delta_lo']:+.3f}, {c['delta_hi']:+.3f}] "
            f"vs random matched features 95th pct {c['random_q95']:+.3f} "
            f"(p={c['p_value']:.3f}, {len(c['random_deltas'])} draws)"
        )


if __name__ == "__main__":
    sys.exit(run_script(SAEFeaturesConfig, main, doc=__doc__))
