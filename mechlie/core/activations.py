"""Collect per-head and residual activations at chosen positions, batched, without a full cache.

Shapes (``n`` prompts, ``L`` layers, ``H`` heads):

===============  ===============================  ===================================================
kind             shape                            meaning
===============  ===============================  ===================================================
``z``            ``[n, L, H, d_head]``            ``blocks.l.attn.hook_z``: the head's mixed values
``head_out``     ``[n, L, H, d_model]``           ``z @ W_O[l, h]``: the head's own write to the
                                                  residual stream (``b_O`` is shared, so excluded)
``resid_pre``    ``[n, L, d_model]``              ``blocks.l.hook_resid_pre`` (input of block l)
``resid_mid``    ``[n, L, d_model]``              ``blocks.l.hook_resid_mid``
``resid_post``   ``[n, L, d_model]``              ``blocks.l.hook_resid_post`` (output of block l)
``mlp_out``      ``[n, L, d_model]``              ``blocks.l.hook_mlp_out``
``attn_out``     ``[n, L, d_model]``              ``blocks.l.hook_attn_out``
===============  ===============================  ===================================================

"Layer l" always means block l. A position is an offset from the end of each prompt: ``-1`` is the
final prompt token, the one whose next-token prediction is the answer. Because batches are
left-padded, offsets from the end line up across prompts of different lengths.

``head_out`` is computed from ``z`` after the run, so ``use_attn_result`` (a full
``[batch, pos, head, d_model]`` tensor per layer) is never switched on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechlie.core.hooks import HEAD_KINDS, KINDS, LAYER_KINDS, hook_name  # noqa: E402,F401  (re-exported)
from mechlie.core.io import load_tensors, save_tensors
from mechlie.core.metrics import final_resid_hook, logits_from_resid
from mechlie.core.pairs import Batch, tokenize


@dataclass
class Activations:
    acts: dict[str, Tensor]  # kind -> [n, L, (H,) d]
    position: int
    meta: dict = field(default_factory=dict)
    logits: Float[Tensor, "n vocab"] | None = None  # next-token logits at the final position

    def __getitem__(self, kind: str) -> Tensor:
        return self.acts[kind]

    def save(self, path: str | Path) -> Path:
        """One safetensors file (activations and, when kept, the logits) with JSON metadata."""
        tensors: dict = {"acts": self.acts}
        if self.logits is not None:
            tensors["logits"] = self.logits
        return save_tensors(path, tensors, {"position": self.position, "meta": self.meta})

    @classmethod
    def load(cls, path: str | Path) -> "Activations":
        tensors, meta = load_tensors(path)
        return cls(dict(tensors["acts"]), meta["position"], meta["meta"], tensors.get("logits"))


def head_out_from_z(
    model: HookedTransformer, z: Float[Tensor, "n layer head d_head"]
) -> Float[Tensor, "n layer head d_model"]:
    return einops.einsum(z.to(model.W_O.dtype).to(model.W_O.device), model.W_O, "n l h dh, l h dh dm -> n l h dm").to(
        z.device
    )


@torch.no_grad()
def collect(
    model: HookedTransformer,
    prompts: Sequence[str] | Batch,
    *,
    kinds: Sequence[str] = ("z", "head_out", "resid_post"),
    position: int = -1,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "activations",
    return_logits: bool = False,
) -> Activations:
    """Run ``prompts`` in left-padded batches and keep only ``kinds`` at ``position``.

    Args:
        prompts: strings (tokenized with :func:`mechlie.core.pairs.tokenize`) or an already tokenized,
            left-padded :class:`mechlie.core.pairs.Batch` (tokenizer-free).
        kinds: activation kinds (see the module docstring); ``head_out`` is computed from ``z``.
        position: offset from the end; ``-1`` is the final prompt token.
        return_logits: also keep the final-position logits of the same forward passes (the same
            numbers as :func:`mechlie.core.metrics.final_logits`, soft-cap included).

    Returns:
        :class:`Activations` with ``acts[kind]`` of shape ``[n, L, (H,) d]``.

    Example:
        >>> acts = collect(model, [p.lying for p in pairs], kinds=("resid_post",))
        >>> acts["resid_post"].shape  # [n, n_layers, d_model]
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown activation kinds {sorted(unknown)}; known: {KINDS}")
    if position >= 0:
        raise ValueError("position is an offset from the end of the prompt: -1 is the final token")
    need = {"z" if k == "head_out" else k for k in kinds}
    n_layers = model.cfg.n_layers
    store: dict[str, list[list[Tensor]]] = {k: [[] for _ in range(n_layers)] for k in need}

    def saver(kind: str, layer: int):
        def hook(act: Tensor, hook) -> None:
            store[kind][layer].append(act[:, position].detach().float().cpu())

        return hook

    fwd_hooks = [(hook_name(k, l), saver(k, l)) for k in need for l in range(n_layers)]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = prompts.tokens.shape[0] if isinstance(prompts, Batch) else len(prompts)
    logits = []
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        if isinstance(prompts, Batch):
            b = Batch(prompts.tokens[i : i + batch_size], prompts.attention_mask[i : i + batch_size])
        else:
            b = tokenize(model, prompts[i : i + batch_size])
        if b.tokens.shape[1] < -position:
            raise ValueError(f"position {position} is before the start of a {b.tokens.shape[1]}-token prompt")
        kept: list[Tensor] = []
        final = [final_resid_hook(model, kept)] if return_logits else []
        with model.hooks(fwd_hooks=[*fwd_hooks, *final]):
            model(b.tokens, attention_mask=b.attention_mask, return_type=None)
        if return_logits:
            logits.append(logits_from_resid(model, kept[-1])[:, -1].float().cpu())
    acts = {k: torch.stack([torch.cat(v) for v in store[k]], dim=1) for k in need}
    if "head_out" in kinds:
        acts["head_out"] = head_out_from_z(model, acts["z"])
    acts = {k: acts[k] for k in kinds}
    meta = {"model": model.cfg.model_name, "n": n, "kinds": list(kinds), "position": position}
    return Activations(acts, position, meta, torch.cat(logits) if return_logits else None)
