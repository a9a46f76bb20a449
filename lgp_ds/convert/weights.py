"""The canonical form every checkpoint is read into and every output is built from."""
from dataclasses import dataclass, field

import torch


@dataclass
class Weights:
    """A MoCo/grafting model or a bare encoder, with timm ViT keys.

    ``base``: encoder (``head.*`` = MoCo projector when present); ``momentum`` and ``predictor``
    where the source has them; ``decoder``: an MAE model's decoder and mask token (official MAE
    keys: ``decoder_*``, ``mask_token``) where the source has them; ``arch``: the architecture name the source records (timm, MoCo v3
    or MAE name); ``num_heads``: the head count where the source records it; ``notes``: what the
    user should know about how the weights were read.
    """
    base: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None = None
    predictor: dict[str, torch.Tensor] | None = None
    arch: str | None = None
    num_heads: int | None = None
    notes: list[str] = field(default_factory=list)
    decoder: dict[str, torch.Tensor] | None = None
    config: dict | None = None  # an lgp_ds checkpoint's experiment config (heads, masking, tau)

    def encoder(self, which: str = "base") -> dict[str, torch.Tensor]:
        """The ViT without its projector: ``which`` is ``base`` or ``momentum``."""
        sd = self.base if which == "base" else self.momentum
        if sd is None:
            raise ValueError(f"--encoder {which}: the source has no {which} encoder")
        return {k: v for k, v in sd.items() if not k.startswith("head.")}


def strip_prefix(sd: dict, prefix: str) -> dict:
    """The entries of ``sd`` whose keys start with ``prefix``, the prefix taken off."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
