"""Does lie detection generalise? The held-out matrix and the diversity curve, on both embedded models.

    python analyses/generalise.py                     # the full matrix and curve, both models (~45 min)
    python analyses/generalise.py --models smollm2-135m-instruct --facts-per-relation 2 --curve-draws 1
    python analyses/generalise.py --threads 2         # torch CPU threads (not part of the run's identity)

Per model: known facts of every corpus relation asked under every lie setup (few-shot, instructed,
role-play, sycophancy); greedy and sampled answers labelled on-policy (valid lie vs truth; junk and
paraphrases counted); one relation, setup and template held out at a time (AUROC with CIs over facts
and over held-out units, beside a permutation null, random directions, the surprisal baseline and
the mixed-facts cell); and held-out AUROC against the number of training relations and setups.
Progress: each stage's seconds are logged as it ends; rerun the same command to resume (generation
is saved per model and setup). Writes results/generalise/<run>/: summary.json, results.json, one
folder per model (facts, generation stages, analysis) and figures/. The study lives in
mechlie.studies.generalisation (its docstring gives the method step by step).
"""

from __future__ import annotations

import sys

from mechlie.studies.base import launch
from mechlie.studies.generalisation import STUDY

if __name__ == "__main__":
    sys.exit(launch(STUDY, doc=__doc__))
