"""mechlie: where a language model represents lying, which components cause it, and control.

Subpackages by role, each importing only those before it: ``core`` (models, pairs, activations,
the KV runner, generation, metrics with the one final-logits path, stats, io, cli, and ``hooks``:
``steer``, ``Site`` and ``hook_name``) < ``read`` (one fit registry behind directions and probes,
labels, detector) < ``causal`` (patching family) < ``control`` (interventions, learned edits) <
``sae`` < ``report`` < ``studies``; ``analyses/`` scripts launch the studies.

The names below are imported lazily, on first use, so ``import mechlie`` is fast (a script's
``--help`` and its flag checks do not wait for torch and TransformerLens) and each submodule can
also be imported on its own::

    from mechlie import load_model, load_builtin, collect, score_directions, steer, AddVectors
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # models and data
    **dict.fromkeys(("load_model", "DEFAULT_MODEL", "EMBEDDED", "ModelLoadError"), "mechlie.core.models"),
    **dict.fromkeys(
        (
            "ContrastPair",
            "load_builtin",
            "tokenize",
            "PairError",
            "AnswerTokenError",
            "PromptTooLongError",
        ),
        "mechlie.core.pairs",
    ),
    # activations, directions (fit registry), probes and detection
    **dict.fromkeys(("Activations", "collect"), "mechlie.core.activations"),
    **dict.fromkeys(
        (
            "DirectionScores",
            "score_directions",
            "split_by_fact",
            "diff_of_means",
            "project",
            "register_fit",
            "get_fit",
            "FITS",
        ),
        "mechlie.read.directions",
    ),
    **dict.fromkeys(("Probe", "fit_probe", "probe_kinds"), "mechlie.read.probes"),
    **dict.fromkeys(("register_probe",), "mechlie.read.fits"),
    **dict.fromkeys(("Detector", "fit_detector"), "mechlie.read.detector"),
    # behaviour and statistics
    **dict.fromkeys(("Behaviour", "behaviour", "score_logits"), "mechlie.core.metrics"),
    **dict.fromkeys(("Estimate", "bootstrap", "bootstrap_tensor", "auroc"), "mechlie.core.stats"),
    # causal analysis
    **dict.fromkeys(("PatchResult", "patch_final_position", "patch_runs"), "mechlie.causal.patching"),
    **dict.fromkeys(("PositionPatchResult", "patch_positions"), "mechlie.causal.position_patching"),
    **dict.fromkeys(("Attribution", "attribution_patching", "attribute_pairs"), "mechlie.causal.attribution"),
    **dict.fromkeys(
        ("FunctionVector", "build_function_vector", "run_function_vector"), "mechlie.causal.function_vectors"
    ),
    **dict.fromkeys(("joint_patch", "topk_curve", "path_patch", "receiver_positions"), "mechlie.causal.circuits"),
    # on-policy labels, users' facts, SAEs and views
    **dict.fromkeys(("on_policy",), "mechlie.read.labels"),
    **dict.fromkeys(
        ("load_facts", "pairs_from_user_facts", "load_pairs_file", "pairs_from_dataset"), "mechlie.core.facts"
    ),
    **dict.fromkeys(("load_sae", "train_sae", "FeatureClamp"), "mechlie.sae"),
    **dict.fromkeys(("attention_html",), "mechlie.report.views"),
    # control
    **dict.fromkeys(
        ("AddVectors", "HeadShift", "DirectionalAblation"),
        "mechlie.control.steering",
    ),
    **dict.fromkeys(
        ("steer", "Intervention", "SteeringError", "Site", "hook_name"),
        "mechlie.core.hooks",
    ),
    **dict.fromkeys(("generate", "GenerationResult"), "mechlie.core.generation"),
    **dict.fromkeys(("train_vector", "train_lowrank"), "mechlie.control.edits"),
    # results and scripts
    **dict.fromkeys(("save_tensors", "load_tensors", "to_frame"), "mechlie.core.io"),
    **dict.fromkeys(("run_script", "RunDir"), "mechlie.core.cli"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mechlie' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
