"""Exact vs. attribution patching, residual patching by position x layer, and component ranking.

    python analyses/patching_sweep.py [--n-per-relation 1] [--layer-stride 5] [--positions differing]
    python analyses/patching_sweep.py --positions last --n-positions 12 --device cuda

Honest prompts are clean, lying prompts corrupt (few-shot format). The position sweep covers,
by default, every position where the honest and lying prompts differ (the demonstrations'
answers), the last ``--n-final`` positions, and each demonstration's answer as a group. Every
effect is printed with a 95% bootstrap CI over pairs. Writes results/patching_sweep/<run>/
(config, summary, safetensors, figures); the run name comes from the settings, so a rerun with
other settings never overwrites it. The study is mechlie.studies.patching_sweep.
"""

from __future__ import annotations

import sys

from mechlie.studies.base import launch
from mechlie.studies.patching_sweep import STUDY, Config  # noqa: F401  (Config: the script's settings)

if __name__ == "__main__":
    sys.exit(launch(STUDY, doc=__doc__))
