"""The MoCo v3 model that the grafting step (and plain MoCo v3) trains.

Layout follows MoCo v3 and the official grafting code: ``base_encoder`` is the ViT whose
``head`` is the 3-layer projector, ``predictor`` the 2-layer MLP on top. The momentum encoder,
an EMA of ``base_encoder``, is kept outside the DeepSpeed engine (``lgp_ds.engine.momentum``).
"""

import torch
import torch.nn as nn

from .heads import apply_to_views, build_mlp
from .vit import vit_from_config


class GraftModel(nn.Module):
    """forward(x1 [N,3,H,W], x2 [N,3,H,W]) -> (q1 [N,dim], q2 [N,dim]), predictor outputs.

    Images of any float dtype are cast to the model's (DeepSpeed's bf16/fp16 has no autocast).
    Both views go through the encoder in one pass (:func:`apply_to_views`), which needs the
    heads' cross-rank BatchNorm (``cross_rank_bn=False`` builds a model for its weights, or for
    ``one_pass = False``).
    """

    def __init__(self, encoder: nn.Module, dim: int = 256, mlp_dim: int = 4096,
                 cross_rank_bn: bool = True):
        super().__init__()
        width = encoder.embed_dim
        encoder.head = build_mlp(3, width, mlp_dim, dim, cross_rank_bn)  # projector
        self.base_encoder = encoder
        self.predictor = build_mlp(2, dim, mlp_dim, dim, cross_rank_bn)

    one_pass = True  # both views through the encoder at once (False: the official pass each)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        dtype = self.base_encoder.patch_embed.proj.weight.dtype
        return apply_to_views(self, lambda x: self.predictor(self.base_encoder(x.to(dtype))),
                              (x1, x2), self.one_pass)


def build_graft_model(cfg, cross_rank_bn: bool = True) -> GraftModel:
    """GraftModel from the experiment config (see ``lgp_ds.config.Config``)."""
    return GraftModel(vit_from_config(cfg), cfg.proj_dim, cfg.mlp_dim, cross_rank_bn)
