"""Sparse-autoencoder (SAE) features of the lie direction, with sae-lens.

One module per step, lower first:

- :mod:`~mechlie.sae.loading`: where an SAE reads (:class:`Site`), :func:`load_sae` from a folder
  or the hub, :func:`check_sae`, and the cache key of a trained SAE;
- :mod:`~mechlie.sae.corpus`: the offline training corpus and a site's activations over text;
- :mod:`~mechlie.sae.quality`: L0, explained variance and CE loss recovered (:func:`sae_quality`);
- :mod:`~mechlie.sae.training`: :func:`train_sae` (sae-lens's trainer) and the cache that trains
  each SAE once (:func:`load_or_train_sae`);
- :mod:`~mechlie.sae.clamp`: :class:`FeatureClamp` (an intervention for ``steer``) and the
  :func:`causal_check` against matched random features (:func:`lying_prompts` runs the prompts once
  for many checks);
- :mod:`~mechlie.sae.features`: the lie direction decomposed (:func:`lie_features`);
- :mod:`~mechlie.sae.on_policy`: the same for the lies and truths the model samples;
- :mod:`~mechlie.sae.sparse_probe`: a k-sparse probe on SAE features against a raw-activation probe;
- :mod:`~mechlie.sae.seeds`: numbers over SAE training seeds, and Holm's correction over every test run.

Example:
    >>> from mechlie.sae import SAETrainConfig, load_or_train_sae, lie_features
    >>> trained = load_or_train_sae(model, SAETrainConfig(site="blocks.20.hook_resid_pre"))
    >>> summary, tensors = lie_features(model, trained, pairs, train, test)
"""

from mechlie.sae.clamp import (
    CausalCheck,
    FeatureClamp,
    LyingPrompts,
    causal_check,
    lying_prompts,
    matched_random_features,
)
from mechlie.sae.corpus import (
    Corpus,
    SiteActs,
    build_corpus,
    collect_site,
    collect_sites,
    final_acts,
    final_acts_at,
)
from mechlie.sae.features import (
    FeatureEffects,
    corpus_contexts,
    feature_effects,
    lie_features,
    pair_contexts,
    top_contexts,
)
from mechlie.sae.loading import (
    SAE_FORMAT_VERSION,
    SAEError,
    Site,
    cache_entry,
    cache_key,
    check_sae,
    decoder_rows,
    encode,
    feature_columns,
    load_sae,
    reconstruction_mse,
    sae_site,
)
from mechlie.sae.on_policy import OnPolicySiteActs, on_policy_effects, on_policy_site_acts, site_kind
from mechlie.sae.quality import SAEQuality, bootstrap_ci, sae_qualities, sae_quality
from mechlie.sae.seeds import holm, mean_sd, mean_sd_text, min_adjusted_p
from mechlie.sae.sparse_probe import PairData, top_features
from mechlie.sae.training import SAETrainConfig, TrainedSAE, load_or_train_sae, load_or_train_saes, train_sae

__all__ = [
    "SAE_FORMAT_VERSION",
    "CausalCheck",
    "Corpus",
    "FeatureClamp",
    "FeatureEffects",
    "LyingPrompts",
    "OnPolicySiteActs",
    "PairData",
    "SAEError",
    "SAEQuality",
    "SAETrainConfig",
    "Site",
    "SiteActs",
    "TrainedSAE",
    "bootstrap_ci",
    "build_corpus",
    "cache_entry",
    "cache_key",
    "causal_check",
    "check_sae",
    "collect_site",
    "collect_sites",
    "corpus_contexts",
    "decoder_rows",
    "encode",
    "feature_columns",
    "feature_effects",
    "lying_prompts",
    "final_acts",
    "final_acts_at",
    "holm",
    "lie_features",
    "load_or_train_sae",
    "load_or_train_saes",
    "load_sae",
    "matched_random_features",
    "mean_sd",
    "mean_sd_text",
    "min_adjusted_p",
    "on_policy_effects",
    "on_policy_site_acts",
    "pair_contexts",
    "reconstruction_mse",
    "sae_qualities",
    "sae_quality",
    "sae_site",
    "site_kind",
    "top_contexts",
    "top_features",
    "train_sae",
]
