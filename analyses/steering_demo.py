"""Steer a lying model back to the truth, and say whether it is about honesty: a residual direction
and learned minimal edits (a vector on two objectives, a representation-level ReFT-like edit, a gated
vector) beside a prompting baseline and an honest-only control, fitted on some relations and the
few-shot setup, chosen on another relation and reported on relations held out of both, in the
few-shot setup and in a held-out setup (instructed), against random controls, with a capability
check on unrelated corpus questions.

    python analyses/steering_demo.py      # default: 8 min 50 s on a quiet 2-core CPU (stage times logged)
    python analyses/steering_demo.py --split-seeds 1 2 3 4 --seeds-lean --n-controls 100   # the statistics
    python analyses/steering_demo.py --methods resid iti causal learned learned_kl reft lowrank gated honest_only \
        --n-per-relation 20 --n-controls 100 --split-seeds 1 2 3 4       # the wide sweep (resumable)
    python analyses/steering_demo.py --corpus --relations country_capital capital_country city_country \
        country_neighbour --val-relations country_language --heldout-relations element_symbol city_continent

Prints the comparison table on the fitted relations' test facts (with its `prompt baseline` row),
then the section `held-out relations` (one line per method: recovery with its 95% CI, split into real
lies and sharpening, honest accuracy, KL at the honest answer, the random draws and the honest-only
control, then `KL` on neutral text), the gates' shares open, and last the lies flipped back on
held-out relations. Per-stage times are logged as the run goes. The study is mechlie.studies.steering.
"""

from __future__ import annotations

import sys

from mechlie.studies.base import launch
from mechlie.studies.steering import METHODS, STUDY, Config  # noqa: F401  (Config, METHODS: for callers)

if __name__ == "__main__":
    sys.exit(launch(STUDY, doc=__doc__))
