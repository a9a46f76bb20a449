"""mtl: the paper's multi-task baseline, MoCo v3 and MAE losses summed on one shared encoder.

Views: the two MoCo views and a third, minimally augmented MAE view of the same image. The
encoder runs whole on the MoCo views and on the visible patches of the MAE view; the MoCo
projector/predictor (with a momentum encoder) and the MAE decoder all train.
loss = cl_weight * MoCo loss + mim_weight * MAE loss.
"""
from lgp_ds.data.transforms import mae_views, moco_views
from lgp_ds.models.mae import add_decoder, decode, decoder_checkpointed, encode_visible
from lgp_ds.models.moco import GraftModel
from lgp_ds.models.vit import vit_from_config
from lgp_ds.objectives import mae_loss, moco_loss

from .base import Method


class MTLModel(GraftModel):
    """forward(x1, x2, x3 [N,3,H,W], noise [N,L] | None) -> (q1, q2 [N,dim], pred [N,L,p*p*3],
    mask [N,L]): MoCo's predictor outputs on x1, x2 and MAE's prediction for x3."""

    def __init__(self, encoder, cfg, cross_rank_bn: bool = True):
        super().__init__(encoder, cfg.proj_dim, cfg.mlp_dim, cross_rank_bn)
        self.mask_ratio = cfg.mask_ratio
        pe = encoder.patch_embed
        add_decoder(self, pe.num_patches, pe.grid_size, pe.patch_size[0], encoder.embed_dim,
                    cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads,
                    fused_attn=cfg.fused_attn)

    def forward(self, x1, x2, x3, noise=None):
        q1, q2 = super().forward(x1, x2)
        x3 = x3.to(self.base_encoder.patch_embed.proj.weight.dtype)
        latent, mask, ids_restore = encode_visible(self.base_encoder, x3, self.mask_ratio, noise)
        pred = decode(self, latent, ids_restore, decoder_checkpointed(self.base_encoder))
        return q1, q2, pred, mask


class MTL(Method):
    momentum_encoder = True
    reuses_blocks = True  # the encoder runs on the MoCo views and on the MAE view apart

    def build_model(self):
        model = MTLModel(vit_from_config(self.cfg), self.cfg)
        self.patch_size = model.base_encoder.patch_embed.patch_size[0]
        return model

    def views(self):
        return moco_views(self.cfg.img_size, self.cfg.crop_min) + mae_views(self.cfg.mae_crop_min)

    def loss(self, engine, views, momentum, labels=None):
        cfg = self.cfg
        x1, x2, x3 = views
        q1, q2, pred, mask = engine(x1, x2, x3)
        cl = moco_loss(q1, q2, *momentum(x1, x2), cfg.tau)
        mim = mae_loss(pred, x3, mask, self.patch_size, cfg.norm_pix_loss)
        return cfg.cl_weight * cl + cfg.mim_weight * mim, {"loss_cl": cl.detach(),
                                                           "loss_mim": mim.detach()}
