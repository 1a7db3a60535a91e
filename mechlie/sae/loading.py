"""Where an SAE reads, loading one with sae-lens, and the cache key of a trained one.

- :class:`Site`: where an SAE reads, a TransformerLens hook name plus, for ``attn.hook_z``, one
  head (``d_in = d_head``) or all heads flattened (``d_in = n_heads * d_head``);
  :meth:`Site.core_sites` names the same place as :class:`mechlie.core.hooks.Site` objects.
  :func:`check_sae` refuses an SAE whose width or hook does not match the model.
- :func:`load_sae`: any sae-lens SAE from a local folder (``cfg.json`` +
  ``sae_weights.safetensors``), or by ``release`` / ``sae_id`` from the hub when there is access.
- :func:`cache_key`: the folder name of a trained SAE under ``<cache_dir>/sae/``, hashing the
  model's weights (:func:`mechlie.core.models.model_id`), the site and every training setting.
- :func:`decoder_rows` and :func:`encode`: what the decoder adds per unit of feature activation,
  and feature activations computed in chunks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.core import hooks as core_hooks
from mechlie.core.hooks import LAYER_KINDS, hook_name
from mechlie.core.models import model_id

if TYPE_CHECKING:
    from mechlie.sae.training import SAETrainConfig

SAE_FORMAT_VERSION = 3  # 2: samples drawn in batches of 32 (another corpus than 1's); 3: train_seed, exclusions


class SAEError(ValueError):
    """An SAE that cannot be used with this model or site (width, hook, head), or cannot be found."""


@dataclass(frozen=True)
class Site:
    """Where an SAE reads: a hook, and for ``attn.hook_z`` optionally one head."""

    hook_name: str  # e.g. "blocks.20.hook_resid_pre" or "blocks.20.attn.hook_z"
    head: int | None = None  # only with hook_z: that head's z (d_head); None = all heads flattened

    @classmethod
    def parse(cls, spec: str) -> "Site":
        """``"blocks.20.hook_resid_pre"`` or ``"blocks.20.attn.hook_z:5"`` (head 5)."""
        name, _, head = spec.partition(":")
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit() or not parts[-1].startswith("hook_"):
            raise SAEError(
                f"site {spec!r}: expected blocks.<layer>.<hook>, e.g. blocks.20.hook_resid_pre "
                "or blocks.20.attn.hook_z:5"
            )
        if head and not head.isdigit():
            raise SAEError(f"site {spec!r}: the head after ':' must be a number")
        return cls(name, int(head) if head else None)

    def __str__(self) -> str:
        return self.hook_name + (f":{self.head}" if self.head is not None else "")

    @property
    def is_z(self) -> bool:
        return self.hook_name.endswith("attn.hook_z")

    @property
    def layer(self) -> int:
        parts = self.hook_name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise SAEError(f"site {self}: only blocks.<layer>.* hooks are supported")
        return int(parts[1])

    @property
    def kind(self) -> str:
        """The :mod:`mechlie.core.hooks` activation kind whose hook this is (``"z"`` for ``attn.hook_z``)."""
        for kind in ("z", *LAYER_KINDS):
            if hook_name(kind, self.layer) == self.hook_name:
                return kind
        raise SAEError(f"site {self}: no activation kind reads this hook")

    def core_sites(
        self, *, n_heads: int | None = None, positions: str | tuple[int, ...] = "all"
    ) -> tuple[core_hooks.Site, ...]:
        """This place as :class:`mechlie.core.hooks.Site` objects: one, or for a site that reads all
        heads of ``attn.hook_z`` one per head (``n_heads`` is then required: a core Site names one head)."""
        kind = self.kind
        if kind != "z":
            return (core_hooks.Site(kind, self.layer, positions=positions),)
        if self.head is not None:
            return (core_hooks.Site(kind, self.layer, self.head, positions),)
        if n_heads is None:
            raise SAEError(f"site {self} reads every head: pass n_heads to name them as core Sites")
        return tuple(core_hooks.Site(kind, self.layer, h, positions) for h in range(n_heads))

    def validate(self, model: HookedTransformer) -> None:
        if self.hook_name not in model.hook_dict:
            raise SAEError(f"site {self}: the model has no hook {self.hook_name!r}")
        _ = self.layer
        if self.head is not None:
            if not self.is_z:
                raise SAEError(f"site {self}: a head index is only meaningful for attn.hook_z")
            if not 0 <= self.head < model.cfg.n_heads:
                raise SAEError(f"site {self}: head {self.head} out of range ({model.cfg.n_heads} heads)")

    def d_in(self, model: HookedTransformer) -> int:
        if self.is_z:
            return model.cfg.d_head if self.head is not None else model.cfg.n_heads * model.cfg.d_head
        return model.cfg.d_model

    def read(self, act: Tensor) -> Float[Tensor, "batch pos d_in"]:
        """The SAE input from the hook's activation ``[batch, pos, ...]``."""
        if self.is_z:
            return act[:, :, self.head] if self.head is not None else act.flatten(2)
        return act

    def write(self, act: Tensor, new: Float[Tensor, "batch pos d_in"]) -> Tensor:
        """``act`` with the SAE input replaced by ``new`` (in place, returned)."""
        if self.is_z and self.head is not None:
            act[:, :, self.head] = new.to(act.dtype)
        elif self.is_z:
            act[:] = new.reshape(act.shape).to(act.dtype)
        else:
            act[:] = new.to(act.dtype)
        return act


def sae_site(sae: SAE) -> Site | None:
    """The site recorded in an SAE's metadata (sae-lens ``hook_name`` / ``hook_head_index``)."""
    name = sae.cfg.metadata.hook_name
    if not name:
        return None
    head = sae.cfg.metadata.hook_head_index
    return Site(name, int(head) if head is not None else None)


def check_sae(sae: SAE, model: HookedTransformer, site: Site) -> None:
    """Refuse an SAE whose width or recorded hook does not match ``site`` on ``model``."""
    site.validate(model)
    d = site.d_in(model)
    if sae.cfg.d_in != d:
        raise SAEError(
            f"SAE width mismatch: the SAE reads d_in={sae.cfg.d_in} but site {site} of "
            f"{model.cfg.model_name} has {d} dimensions"
        )
    recorded = sae_site(sae)
    if recorded is not None and recorded != site:
        raise SAEError(f"SAE site mismatch: the SAE was trained on {recorded}, not on {site}")


def load_sae(source: str | Path, sae_id: str | None = None, *, device: str = "cpu") -> SAE:
    """Load any sae-lens SAE: a local folder, or ``release`` + ``sae_id`` from the hub.

    Args:
        source: a folder with sae-lens's ``cfg.json`` and ``sae_weights.safetensors``, or a
            sae-lens release name (then ``sae_id`` is required, and so is hub access).
        sae_id: the SAE's id within the release.

    Example:
        >>> sae = load_sae("~/.cache/mechlie/sae/ab12.../")
        >>> sae = load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    """
    p = Path(source).expanduser()
    if p.is_dir():
        if not (p / "cfg.json").is_file():
            raise SAEError(f"{p} is a folder but has no cfg.json (not a sae-lens SAE folder)")
        return SAE.load_from_disk(p, device=device)
    if sae_id is None:
        raise SAEError(f"{source!r} is not a local SAE folder; to load from the hub pass a release and an sae_id")
    try:
        return SAE.from_pretrained(str(source), sae_id, device=device)
    except Exception as e:  # sae-lens raises ValueError/HTTP errors; say which SAE failed
        raise SAEError(f"could not load SAE {source}/{sae_id}: {type(e).__name__}: {e}") from e


def decoder_rows(sae: SAE) -> Float[Tensor, "d_sae d_in"]:
    """The vectors the SAE's decoder actually adds per unit of feature activation.

    sae-lens TopK SAEs trained with ``rescale_acts_by_decoder_norm`` (the default) decode
    ``f_i / ‖W_dec[i]‖ · W_dec[i]``, so their rows are unit-normalized here; other SAEs decode
    ``f_i W_dec[i]``.
    """
    w = sae.W_dec.detach()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return w


@torch.no_grad()
def encode(sae: SAE, x: Float[Tensor, "*b d_in"], *, chunk: int = 4096) -> Float[Tensor, "*b d_sae"]:
    """Feature activations, in chunks (a full ``[tokens, d_sae]`` matrix can be large)."""
    flat = x.reshape(-1, x.shape[-1])
    dev = sae.W_dec.device
    out = torch.cat([sae.encode(flat[i : i + chunk].to(dev)).float().cpu() for i in range(0, len(flat), chunk)])
    return out.reshape(*x.shape[:-1], -1)


@torch.no_grad()
def feature_columns(
    sae: SAE, x: Float[Tensor, "tok d_in"], features: Sequence[int], *, chunk: int = 4096
) -> Float[Tensor, "tok k"]:
    """Activations of ``features`` only, without materializing all ``d_sae`` columns at once."""
    cols = torch.as_tensor(list(features), dtype=torch.long)
    return torch.cat([encode(sae, x[i : i + chunk])[:, cols] for i in range(0, len(x), chunk)])


@torch.no_grad()
def reconstruction_mse(sae: SAE, x: Float[Tensor, "tok d_in"]) -> float:
    x = x.to(sae.W_dec.device)
    return float(((sae.decode(sae.encode(x)) - x) ** 2).sum(-1).mean())


# ---------------------------------------------------------------------------------------------
# the on-disk cache


def cache_key(model: HookedTransformer, cfg: "SAETrainConfig") -> str:
    """The cache folder name of the SAE trained with ``cfg`` on ``model``: a hash of the model's
    weights, every setting, the sae-lens version and :data:`SAE_FORMAT_VERSION`."""
    import sae_lens

    blob = json.dumps(
        {
            "model": model_id(model),
            "cfg": asdict(cfg),
            "sae_lens": sae_lens.__version__,
            "format": SAE_FORMAT_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_entry(root: Path, key: str) -> Path:
    """The folder of cache entry ``key`` (a sae-lens SAE folder plus mechlie's files) under ``root``."""
    return root / "sae" / key
