"""How few heads carry the lie, and what feeds them: joint patching, top-k curves, path patching.

This module gathers the circuit tools under one name (``from mechlie.causal import circuits``):

- :mod:`mechlie.causal.joint_patching`: a *set* of heads patched together (:func:`joint_patch`),
  heads ranked on training pairs and the top-k curve with its minimal set (:func:`topk_curve`).
- :mod:`mechlie.causal.path_patching`: a sender's effect along the path into one receiver head's
  queries, keys or values (:func:`path_patch`, Wang et al. 2022), and which positions the receiver
  reads the lie from (:func:`receiver_positions`).

Effects are normalized over pair means (:mod:`mechlie.causal.effects`): 0 = the target run, 1 =
the source run; ``restore`` patches honest into lying, ``induce`` the reverse.
"""

from __future__ import annotations

from mechlie.causal import joint_patching, path_patching
from mechlie.causal.joint_patching import (  # noqa: F401  (re-exported)
    Direction,
    Head,
    JointResult,
    TopKCurve,
    check_heads,
    joint_patch,
    k_grid,
    minimal_k,
    patch_sides,
    rank_heads,
    source_z,
    topk_curve,
)
from mechlie.causal.path_patching import (  # noqa: F401  (re-exported)
    CHANNELS,
    PathResult,
    ReceiverPositions,
    Sender,
    path_patch,
    receiver_positions,
)

__all__ = sorted(joint_patching.__all__ + path_patching.__all__)
