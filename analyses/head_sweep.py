"""Head sweep: where does the model represent "I am lying now", and which heads cause it?

    python analyses/head_sweep.py                      # default model and pairs
    python analyses/head_sweep.py --model gemma-3-270m --dataset capitals --n-pairs 20
    python analyses/head_sweep.py --dataset my_pairs.jsonl   # every row of a pairs file
    python analyses/head_sweep.py --n-split-seeds 0    # skip the headline over 5 split seeds

Writes results/head_sweep/<run>/ (config, behaviour, summary, safetensors results, figures). The
run name comes from the settings and the dataset file's content, so a rerun resumes an
interrupted run and an edited file starts a new one. Every effect is reported with its 95% CI;
held-out AUROCs are compared with the 95th percentile of the maximum over components of a
within-pair label-swap null. By default the headline is repeated on 5 splits of the facts (each
picks its top head on its training facts and reports it on its held-out facts; mean ± SD over the
splits), which patches every analysed pair. The study is mechlie.studies.head_sweep.
"""

from __future__ import annotations

import sys

from mechlie.studies.base import launch
from mechlie.studies.head_sweep import STUDY

if __name__ == "__main__":
    sys.exit(launch(STUDY, doc=__doc__))
