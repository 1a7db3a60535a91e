"""SAE features (sae-lens) at the sites where lying is decided.

    python analyses/sae_features.py                       # SmolLM2, resid_pre of block 20 + head L20H5,
                                                          # 3 SAE seeds x 5 splits of the facts
    python analyses/sae_features.py --n-split-seeds 0     # the main split only
    python analyses/sae_features.py --sae-seeds 1 --n-draws 100 --n-split-seeds 0   # the pre-issue-22 run
    python analyses/sae_features.py --sites blocks.19.hook_resid_pre --device cuda

For each site and SAE training seed, an SAE is loaded from the cache or trained with sae-lens on an
offline corpus that holds no analysed fact (trained once per model/site/settings/seed), and the
honest→lying difference at the final prompt token is decomposed into its features: effect sizes with
bootstrap CIs over held-out pairs, decoder cosines with the difference-of-means direction,
top-activating contexts, a causal check beside matched random features (Holm-corrected over every
test run), a k-sparse SAE probe against a raw-activation probe on held-out facts and relations, and
on-policy lies vs truths; then the split-dependent numbers (features, causal checks, held-out
probes) again on 4 more splits of the facts, with the same SAEs. Writes results/sae_features/<run>/
(summary.json, features.safetensors, lying_heads.html, figures/). The study lives in
mechlie.studies.sae_features.
"""

from __future__ import annotations

import sys

from mechlie.studies.base import launch
from mechlie.studies.sae_features import STUDY

if __name__ == "__main__":
    sys.exit(launch(STUDY, doc=__doc__))
