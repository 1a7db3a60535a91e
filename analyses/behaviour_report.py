"""Behaviour before any interpretability: every built-in relation x format, honest vs. lying.

    python analyses/behaviour_report.py [--model gemma-3-270m] [--n-pairs 0]

For every relation and format, prints P(truth) honest vs lying for ALL pairs and for the KNOWN
pairs (facts the model answers correctly when honest), each with a 95% bootstrap CI over facts,
plus acc, lie rate and choice coverage; writes results/behaviour/<run>/summary.json.
"""

from __future__ import annotations

import sys

from mechlie.studies.base import launch
from mechlie.studies.behaviour import STUDY

if __name__ == "__main__":
    sys.exit(launch(STUDY, doc=__doc__))
