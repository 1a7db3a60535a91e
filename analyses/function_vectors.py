"""Lie function vector (Todd et al. 2023) on few-shot lying prompts; see mechlie.causal.function_vectors.

    python analyses/function_vectors.py                    # every known fact of every relation
    python analyses/function_vectors.py --n-per-relation 8 --n-random 50 --device cuda

Uses every fact the model knows (answered correctly under the honest framing), split by fact
into training pairs (heads, AIE with leave-one-out means, FV, diff of means) and test pairs
(interventions). The FV is added at the layers its heads live in; many random directions of
the same norm give the null distribution. Effects carry 95% bootstrap CIs over test pairs.
Writes results/function_vectors/<run>/ (config, summary, safetensors, figures); the run name
comes from the settings, so a different configuration never overwrites an earlier run. The study
is mechlie.studies.function_vectors.
"""

from __future__ import annotations

import sys

from mechlie.studies.base import launch
from mechlie.studies.function_vectors import STUDY, Config  # noqa: F401  (Config: the script's settings)

if __name__ == "__main__":
    sys.exit(launch(STUDY, doc=__doc__))
