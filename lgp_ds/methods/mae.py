"""mae (step i) and cl2mim: the MAE objective on a masked encoder and a decoder.

mae:     MAE from random weights; ``init=`` an official full MAE checkpoint (encoder + decoder,
         loaded strictly) continues it, an encoder-only file starts the encoder alone.
cl2mim:  CL->MIM grafting: the encoder from a MoCo v3 checkpoint (``init=``: lgp_ds's or an
         official one), its lower ``frozen_stages`` frozen; upper blocks and a fresh decoder
         train with the MAE loss.
"""
from lgp_ds.data.transforms import mae_views
from lgp_ds.models.mae import build_mae_model
from lgp_ds.models.vit import HEAD_PREFIXES, MAE_ONLY_PREFIXES, load_weights

from .base import Method


class MAE(Method):
    """view x [N,3,H,W] -> engine: mask, encode the visible patches, decode -> (loss, pred, mask);
    loss = norm-pix MSE on the masked patches."""
    encoder_prefix = ""  # official MAE keys: the encoder's are the model's top-level ones

    def build_model(self):
        return build_mae_model(self.cfg)

    def encoder(self, model):
        return model

    def load_init(self, model, weights):
        if weights.decoder and self.cfg.method == "mae":  # a whole MAE model: continue it
            load_weights(model, {**weights.encoder(), **weights.decoder}, self.cfg.init, skip=())
            return
        load_weights(model, weights.encoder(), self.cfg.init,
                     skip=MAE_ONLY_PREFIXES + HEAD_PREFIXES)

    def views(self):
        return mae_views(self.cfg.mae_crop_min)

    def loss(self, engine, views, momentum, labels=None):
        (x,) = views
        loss, _, _ = engine(x)
        return loss, {}
