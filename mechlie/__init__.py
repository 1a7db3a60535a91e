"""mechlie: where a language model represents lying, which components cause it, and control.

The pipeline, one module per step: ``models`` -> ``pairs`` -> ``activations`` -> ``directions``
-> ``patching`` / ``steering`` -> ``metrics`` -> ``plotting``; ``head_sweep`` composes them.
"""

from mechlie.activations import Activations, collect
from mechlie.directions import Direction, DirectionScores, diff_of_means, score_directions, split_by_fact
from mechlie.metrics import Behaviour, behaviour, score_logits
from mechlie.models import DEFAULT_MODEL, EMBEDDED, ModelLoadError, load_model
from mechlie.pairs import (
    AnswerTokenError, ContrastPair, PairError, PromptTooLongError, load_builtin, load_pairs_file,
    pairs_from_dataset, tokenize,
)
from mechlie.patching import PatchResult, patch_final_position, patch_runs

__all__ = [
    "Activations", "collect", "Direction", "DirectionScores", "diff_of_means", "score_directions",
    "split_by_fact", "Behaviour", "behaviour", "score_logits", "DEFAULT_MODEL", "EMBEDDED",
    "ModelLoadError", "load_model", "AnswerTokenError", "ContrastPair", "PairError",
    "PromptTooLongError", "load_builtin", "load_pairs_file", "pairs_from_dataset", "tokenize",
    "PatchResult", "patch_final_position", "patch_runs",
]
