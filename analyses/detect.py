"""Lie detection that generalises: every probe kind, trained on one dataset, tested on the others,
and Apollo's protocol end to end.

    python analyses/detect.py                                   # default: under 5 minutes on 2 CPU cores
    python analyses/detect.py --probes logistic lat --relations capitals opposites numbers
    python analyses/detect.py --fmt fewshot instruct --full-matrix   # relation x format x label kind
    python analyses/detect.py --model gemma-3-270m --fpr 0.05 --n-benign 96

Framing labels (honest vs lying prompt) and on-policy labels (the model's own sampled lies vs
truths), one split by fact; the layer chosen on validation facts by either rule; every probe kind
trained on every source and tested on every set (AUROC with CIs, label-permutation and
random-direction nulls), leave-one-relation-out transfer, and two detectors calibrated on control
text (held-out FPR and recall with CIs). Apollo's protocol: probes trained on framing labels or
on-policy rows, read at the answer (first token and mean over the answer), calibrated on in-format
controls (the model's own honest answers to other questions and its responses to benign requests in
the same format; neutral text as a second control), beside the surprisal baseline. It ends with

    recall at 1% FPR (in-format controls): X [lo, hi]
    recall at 1% FPR (in-format controls), surprisal baseline: X [lo, hi]

for the saved Apollo detector (95% CIs over facts and control units). Writes results/detect/<run>/:
summary.json, matrix.json, curves.json, detector.safetensors, detector_framing.safetensors,
detector_apollo.safetensors, token_scores_{lying,honest}.html (circuitsvis) and figures/. The study
lives in mechlie.studies.detection (its docstring gives the method step by step).
"""

from __future__ import annotations

import sys

from mechlie.studies.base import launch
from mechlie.studies.detection import STUDY

if __name__ == "__main__":
    sys.exit(launch(STUDY, doc=__doc__))
