"""Steer a lying model back to the truth: training-free directions, causally chosen heads and learned
minimal edits (vectors, low-rank adapters, gated vectors), each chosen on validation facts and
reported on test facts, against random controls.

    python analyses/steering_demo.py                 # default: over 20 minutes on 2 cores (at 89c4f3d)
    python analyses/steering_demo.py --layers 8 14 --resid-alphas -1 -2 --methods resid iti learned
    python analyses/steering_demo.py --transfer-relation opposites --n-controls 32

Pairs are split by fact into train / validation / test. Directions and learned edits are fitted on
train; each method's hyperparameters (layer, alpha, K heads, the edit's KL budget and scale) are
chosen on validation (most recovery with KL <= --kl-budget); the table reports test. Alpha is signed:
directions point honest -> lying, so alpha < 0 steers toward honesty. The study is
mechlie.studies.steering. Writes results/steering_demo/<run>/: summary.json, sweep.json,
evaluation.json, the learned edits (*.safetensors) and figures/.
"""

from __future__ import annotations

import sys

from mechlie.studies.base import launch
from mechlie.studies.steering import METHODS, STUDY, Config  # noqa: F401  (Config, METHODS: for callers)

if __name__ == "__main__":
    sys.exit(launch(STUDY, doc=__doc__))
