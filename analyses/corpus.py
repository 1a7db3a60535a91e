"""The built-in fact corpus: its size per relation and the share each model knows.

    python analyses/corpus.py                      # both embedded models
    python analyses/corpus.py --no-known           # counts only, no model loaded
    python analyses/corpus.py --models gemma-3-270m --rebuild

Builds (once, then loads from the cache) the corpus of mechlie.core.corpus, prints
``corpus: N relations, M facts`` and one line per relation: its number of facts and, per model, the
share of them the model knows (greedy honest few-shot answer is the truth, mechlie.read.known) with a
Wilson 95% interval over facts. Writes results/corpus/<run>/summary.json and known.json; the corpus
and the known filters stay cached under ~/.cache/mechlie for every later study. The study lives in
mechlie.studies.corpus_study.
"""

from __future__ import annotations

import sys

from mechlie.studies.base import launch
from mechlie.studies.corpus_study import STUDY

if __name__ == "__main__":
    sys.exit(launch(STUDY, doc=__doc__))
