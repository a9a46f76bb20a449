"""graft_vicreg: the grafting step with VICReg's loss instead of MoCo's (the paper's Table 4).

Same init, stage LRs and anchor as graft; an expander head on the encoder, no predictor and no
momentum encoder.
"""
import torch
import torch.nn as nn

from lgp_ds.data.transforms import moco_views
from lgp_ds.models.heads import apply_to_views, build_expander
from lgp_ds.models.vit import vit_from_config
from lgp_ds.objectives import vicreg_loss

from .base import Method


class VICRegModel(nn.Module):
    """forward(x1 [N,3,H,W], x2 [N,3,H,W]) -> (z1, z2) [N, dim]: encoder + expander (its head),
    both views in one pass as in :class:`lgp_ds.models.moco.GraftModel`."""

    def __init__(self, encoder: nn.Module, dim: int, mlp_dim: int):
        super().__init__()
        encoder.head = build_expander(encoder.embed_dim, mlp_dim, dim)
        self.base_encoder = encoder

    one_pass = True  # as GraftModel's

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        dtype = self.base_encoder.patch_embed.proj.weight.dtype  # as GraftModel
        return apply_to_views(self, lambda x: self.base_encoder(x.to(dtype)), (x1, x2),
                              self.one_pass)


class GraftVICReg(Method):
    def build_model(self):
        return VICRegModel(vit_from_config(self.cfg), self.cfg.proj_dim, self.cfg.mlp_dim)

    def views(self):
        return moco_views(self.cfg.img_size, self.cfg.crop_min)

    def loss(self, engine, views, momentum, labels=None):
        z1, z2 = engine(*views)
        cfg = self.cfg
        return vicreg_loss(z1, z2, cfg.vicreg_sim, cfg.vicreg_var, cfg.vicreg_cov)
