"""MoCo v3 and the grafting step: graft, moco and mim2cl_frozen differ only in their recipe.

graft:          init= MAE weights; small LRs on the lower stages, a large one on the top stage
                (optionally the MIM anchor on the lower network).
moco:           MoCo v3 from random weights (one stage, one LR).
mim2cl_frozen:  init= MAE weights with the lower ``frozen_stages`` frozen (in the momentum
                encoder too, as it only follows trained parameters).
"""
from lgp_ds.data.transforms import moco_views
from lgp_ds.models.moco import build_graft_model
from lgp_ds.objectives import moco_loss

from .base import Method


class MoCo(Method):
    """views (x1, x2) [N,3,H,W] -> engine -> q1, q2; momentum encoder -> k1, k2;
    loss = ctr(q1, k2) + ctr(q2, k1) with keys all-gathered across ranks."""
    momentum_encoder = True

    def build_model(self):
        return build_graft_model(self.cfg)

    def views(self):
        return moco_views(self.cfg.img_size, self.cfg.crop_min)

    def loss(self, engine, views, momentum, labels=None):
        x1, x2 = views
        q1, q2 = engine(x1, x2)
        k1, k2 = momentum(x1, x2)
        return moco_loss(q1, q2, k1, k2, self.cfg.tau), {}
