"""Localise the lie: how few heads carry it, and what feeds the top head.

    python analyses/localise.py                            # default model, built-in pairs
    python analyses/localise.py --n-pairs 6 --n-random 20  # quicker
    python analyses/localise.py --receiver 20.5 --device cuda --dtype bfloat16

Top-k head curves (restore and induce, beside random k-sets, the minimal set for 80% with its CI),
path patching into the receiver (default: the top restore head) and position patching of its
key/value inputs, and the edge circuit (EAP-IG ranking, faithfulness curve, attribution vs exact edge
patching; --no-circuit skips it). Writes results/localise/<run>/: summary.json, scores.safetensors and figures/.
The study lives in mechlie.studies.localise (see mechlie.causal.circuits for definitions and signs).
"""

from __future__ import annotations

import sys

from mechlie.studies.base import launch
from mechlie.studies.localise import STUDY

if __name__ == "__main__":
    sys.exit(launch(STUDY, doc=__doc__))
