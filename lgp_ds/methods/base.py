"""What a pre-training method adds to the shared trainer.

The trainer (:mod:`lgp_ds.engine.trainer`) owns what every method shares: the DeepSpeed engine,
stage-wise param groups and schedules, frozen stages, the data stream, checkpoints, resume and
metrics. A method owns only what differs:

- ``build_model()``: the module the engine trains (encoder plus heads or decoder);
- ``load_init(model, weights)``: how ``init=`` weights enter that model;
- ``views()``: the views one image gives (:class:`lgp_ds.data.transforms.View`), which
  ``transform()`` (PIL image -> the tuple of views, in the DataLoader workers) and
  ``device_views(views)`` (on the device, in the trainer's step) make between them: all on the
  CPU with ``augment_on: cpu``; crops on the CPU and the rest on the device with ``device``
  (with ``input_backend: dali``, DALI cuts the crops of ``views()`` instead of ``transform()``);
- ``param_groups(model, depth, stage_lrs)``: the optimizer's param groups (stage-wise LRs;
  fine-tuning: layer-wise LR decay and frozen lower blocks);
- ``loss(engine, views, momentum, labels)``: forward and loss over this rank's micro-batch
  (labels: the samples' ``cls``, which only fine-tuning reads);
- ``prepare_data()``: find and check the data the method reads besides the training stream
  (fine-tuning: its held-out shards), before training, so that bad paths fail at once;
- ``evaluate(trainer)``: metrics of the model during and after training (fine-tuning: top-1);
- switches for the shared components: ``momentum_encoder`` (MoCo's EMA encoder of
  ``model.base_encoder``), ``encoder_prefix`` (where the ViT's parameters live, for the stage
  rule, frozen stages and the MIM anchor) and ``reuses_blocks`` (the model runs a transformer
  block more than once per backward, which rules out ZeRO 3's gathering of a block at a time:
  :func:`lgp_ds.engine.construct.gather_blocks_whole`).
"""
import torch
import torch.nn as nn

from lgp_ds.convert import Weights
from lgp_ds.data.crops import CropViews
from lgp_ds.data.device_augment import augment
from lgp_ds.data.transforms import View, Views, torchvision_view
from lgp_ds.engine.param_groups import build_param_groups
from lgp_ds.models.vit import load_weights


class Method:
    name = ""
    encoder_prefix = "base_encoder."
    momentum_encoder = False
    reuses_blocks = False

    def __init__(self, cfg):
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def encoder(self, model: nn.Module) -> nn.Module:
        """The ViT inside ``model`` (``init=`` encoder weights load into it)."""
        return model.base_encoder

    def load_init(self, model: nn.Module, weights: Weights) -> None:
        """Start ``model`` from ``weights`` (read from ``init=``): the encoder without its head."""
        load_weights(self.encoder(model), weights.encoder(), self.cfg.init)

    def param_groups(self, model: nn.Module, depth: int, stage_lrs: list[float]) -> list[dict]:
        """Param groups of ``model``'s trainable parameters: ``stage_lrs`` (absolute, one per
        stage) by the stage rule, weight decay except on 1-D parameters."""
        return build_param_groups(model, depth, stage_lrs, self.cfg.weight_decay,
                                  self.encoder_prefix)

    def views(self) -> list[View]:
        """The views one image gives, in the order :meth:`loss` takes them."""
        raise NotImplementedError

    def transform(self):
        """PIL image -> the tuple of views one sample gives: float [3,H,W] each, or with
        ``augment_on: device`` their crops, uint8 [3,H,W], that :meth:`device_views` finishes."""
        size, views = self.cfg.img_size, self.views()
        if self.cfg.augment_on == "device":
            return CropViews(size, [v.crop for v in views])
        return Views(*(torchvision_view(size, v) for v in views))

    def device_views(self, views: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The batch of views [B,3,H,W] that :meth:`transform` made, on the device -> the views
        the model takes: with ``augment_on: device`` each view's photometric part, drawing from
        the global RNG (the trainer seeds it per micro-batch and rank); else as they are."""
        if self.cfg.augment_on == "cpu":
            return views
        return tuple(augment(x, v.photometric) for x, v in zip(views, self.views(), strict=True))

    def check_labels(self, labels: torch.Tensor) -> None:
        """``labels`` [B] of a micro-batch, on the host before the trainer moves them to the
        device (a check there would wait for the device every step): raise DataError for labels
        the method cannot train on. Default: the method reads none."""

    def loss(self, engine, views: tuple[torch.Tensor, ...], momentum,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(loss to backpropagate, {name: detached scalar tensor} of its terms) for one batch;
        ``labels`` [B] int64 (-1: none) where the data has them."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Collective, called by the trainer before the engine is built when it reads data:
        resolve and check the shards that :meth:`evaluate` reads (raise FileNotFoundError or
        ValueError naming them). Default: none."""

    def evaluate(self, trainer) -> dict:
        """Collective: {metric: number} of the model as trained so far, logged with the step's
        record every ``eval_every`` steps and at the end; {} (the default): nothing to measure."""
        return {}
