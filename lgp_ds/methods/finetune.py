"""finetune: supervised fine-tuning of a pre-trained ViT on labelled images (MAE's protocol),
10% semi-supervised fine-tuning from the first projector layer (SimCLR v2) and partial
fine-tuning, as one more objective on the one trainer.

Model: the ViT of the recipe (``drop_path``) with a classifier as its ``head``: a Linear on the
CLS token after the final norm (``pooling: cls``) or, as MAE fine-tunes, on the mean of the
patch tokens after a fresh ``fc_norm`` (``pooling: avg``; the checkpoint's final norm is
dropped). ``from_projector_layer: k`` keeps the first k units (Linear -> BN -> ReLU) of the
init checkpoint's MoCo v3 projector between the encoder and the classifier. The classifier
starts as MAE's: weights trunc-normal with std 2e-5, bias 0.

Optimisation: the trainer's stage LRs (one stage in the recipes) times MAE's layer-wise decay
``layer_decay ** (depth + 1 - layer)``; weight decay except on 1-D parameters and the encoder's
``no_weight_decay()`` names (cls token, position embedding), as MAE's fine-tuning.
``freeze_blocks: k`` freezes the embeddings and the first k blocks (no param group, exact in
checkpoints).

Data: timm's training transform (RandomResizedCrop down to ``crop_min``, flip, ``auto_augment``,
``re_prob`` random erasing, bicubic); timm's Mixup/CutMix per rank (``mixup``, ``cutmix``,
``mixup_prob``, ``mixup_switch_prob``, label smoothing ``smoothing``) with a soft-target cross
entropy, else label-smoothing cross entropy. Mixup draws from the trainer's per-micro-batch
forward RNG, so a resumed run mixes as an uninterrupted one would.

Evaluation (:meth:`Finetune.evaluate`): top-1 on the held-out set (``val_data``, or the embedded
set's val split), every image once over all ranks.
"""
import contextlib

import numpy as np
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from lgp_ds import dist
from lgp_ds.convert import resample_pos_embed
from lgp_ds.data.ordered import ordered_batches
from lgp_ds.data.pipeline import shards_or_embedded
from lgp_ds.data.shards import DataError
from lgp_ds.data.transforms import Views, eval_transform
from lgp_ds.engine.param_groups import build_param_groups, freeze_lower_blocks
from lgp_ds.models.heads import hidden_layers
from lgp_ds.models.partitioned import writable
from lgp_ds.models.vit import HEAD_PREFIXES, load_weights, vit_from_config

from .base import Method


class FinetuneModel(nn.Module):
    """forward(x [N,3,H,W]) -> logits [N, num_classes] (fp32).

    ``base_encoder`` is the timm ViT; its ``head`` is [projector units..., classifier], so the
    parameter names follow the encoder's layer rule (head = the last layer) and a checkpoint's
    projector keys (``head.0.*``, ``head.1.*``) fit as they are.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str = "avg",
                 projector_layers: int = 0, mlp_dim: int = 4096):
        super().__init__()
        if pooling == "avg":  # MAE's global pool: mean of the patch tokens, then fc_norm
            encoder.global_pool = "avg"
            encoder.fc_norm, encoder.norm = encoder.norm, nn.Identity()
        layers, _ = hidden_layers(projector_layers, encoder.embed_dim, mlp_dim)  # head.0, .1, ...
        classifier = nn.Linear(mlp_dim if projector_layers else encoder.embed_dim, num_classes)
        with writable(classifier.parameters()):  # partitioned already under zero.Init
            trunc_normal_(classifier.weight, std=2e-5)  # as MAE's main_finetune.py
            nn.init.zeros_(classifier.bias)
        encoder.head = nn.Sequential(*layers, classifier)
        self.base_encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.base_encoder.patch_embed.proj.weight.dtype  # bf16/fp16: no input autocast
        return self.base_encoder(x.to(dtype)).float()


class Finetune(Method):
    """view x [N,3,H,W], labels [N] -> (Mixup/CutMix) -> engine -> logits; loss = cross entropy
    against the (mixed, smoothed) labels."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                               prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                               mode="batch", label_smoothing=cfg.smoothing,
                               num_classes=cfg.num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.val_urls = None  # the held-out shards, found by prepare_data()

    # -- model ---------------------------------------------------------------------------------
    def build_model(self):
        cfg = self.cfg
        model = FinetuneModel(vit_from_config(cfg), cfg.num_classes, cfg.pooling,
                              cfg.from_projector_layer, cfg.mlp_dim)
        freeze_lower_blocks(model, len(model.base_encoder.blocks), cfg.freeze_blocks,
                            self.encoder_prefix)
        return model

    def load_init(self, model, weights):
        """The encoder from ``weights`` (position embedding resampled to ``img_size`` where the
        checkpoint has another grid; with ``pooling: avg`` its final norm is dropped, as MAE
        does); with ``from_projector_layer`` the checkpoint's first projector units too. The
        classifier stays as built."""
        cfg, encoder = self.cfg, model.base_encoder
        state = weights.encoder()
        if "pos_embed" in state and "patch_embed.proj.weight" in state:
            state = resample_pos_embed(state, cfg.img_size)
        skip = HEAD_PREFIXES + (("norm.",) if cfg.pooling == "avg" else ())
        load_weights(encoder, state, cfg.init, skip=skip)
        units = cfg.from_projector_layer
        if not units:
            return
        kept = tuple(f"head.{3 * i + j}." for i in range(units) for j in (0, 1))
        projector = {k.removeprefix("head."): v for k, v in weights.base.items()
                     if k.startswith(kept)}
        if not projector:
            raise ValueError(f"config key from_projector_layer={units}: init={cfg.init} holds no "
                             f"projector (no head.0.* / head.1.* in its encoder); start from a "
                             f"MoCo v3 or grafted checkpoint, or set from_projector_layer=0")
        try:
            load_weights(nn.Sequential(*encoder.head[:3 * units]), projector, cfg.init, skip=())
        except ValueError as e:
            raise ValueError(f"config key from_projector_layer={units}: the projector of init= "
                             f"does not fit {units} x (Linear(bias=False) -> BatchNorm) of width "
                             f"mlp_dim={cfg.mlp_dim}: {e}") from None

    def param_groups(self, model, depth, stage_lrs):
        return build_param_groups(model, depth, stage_lrs, self.cfg.weight_decay,
                                  self.encoder_prefix, layer_decay=self.cfg.layer_decay,
                                  no_weight_decay=model.base_encoder.no_weight_decay())

    # -- training ------------------------------------------------------------------------------
    def transform(self):
        cfg = self.cfg
        try:
            train = create_transform(cfg.img_size, is_training=True, scale=(cfg.crop_min, 1.0),
                                     color_jitter=None, auto_augment=cfg.auto_augment,
                                     interpolation="bicubic", re_prob=cfg.re_prob,
                                     re_mode="pixel", re_count=1, mean=IMAGENET_DEFAULT_MEAN,
                                     std=IMAGENET_DEFAULT_STD)
        except (AssertionError, ValueError, KeyError) as e:
            raise ValueError(f"config key auto_augment={cfg.auto_augment!r}: timm cannot build "
                             f"it ({type(e).__name__}: {e})") from None
        return Views(train)

    def check_labels(self, labels):
        bad = (labels < 0) | (labels >= self.cfg.num_classes)
        if bool(bad.any()):
            raise DataError(f"method=finetune: label {int(labels[bad][0])} is outside 0.."
                            f"{self.cfg.num_classes - 1} (num_classes={self.cfg.num_classes}; "
                            f"-1: a sample without an integer cls)")

    def loss(self, engine, views, momentum, labels=None):
        (x,) = views
        if labels is None:
            raise ValueError("method=finetune trains on labels: pass them (train_step(..., "
                             "labels=))")
        target = labels
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise ValueError(f"mixup/cutmix needs an even batch per rank, got {x.shape[0]}")
            with _numpy_rng_from_torch():  # timm's Mixup draws from numpy's global RNG
                x, target = self.mixup(x.clone(), labels)  # in place: not the caller's tensor
        return self.criterion(engine(x), target), {}

    # -- evaluation ----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Collective: find the held-out shards (``val_data``, else the embedded val split)."""
        cfg = self.cfg
        self.val_urls = shards_or_embedded(cfg.val_data, cfg.img_size, "val", cfg.num_workers)

    def evaluate(self, trainer) -> dict:
        """Collective: {"val_top1": %} of the model on the held-out set."""
        cfg = self.cfg
        batches = ordered_batches(self.val_urls, eval_transform(cfg.img_size),
                                  trainer.engine.train_micro_batch_size_per_gpu(),
                                  dist.get_rank(), dist.get_world_size(), cfg.num_workers)
        correct, count = top1(trainer.engine, batches, trainer.device)
        return {"val_top1": 100.0 * correct / max(count, 1), "val_images": count}


@contextlib.contextmanager
def _numpy_rng_from_torch():
    """numpy's global RNG seeded from torch's (the trainer's forward RNG), restored after."""
    state = np.random.get_state()
    np.random.seed(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    try:
        yield
    finally:
        np.random.set_state(state)


@torch.no_grad()
def top1(engine, batches, device) -> tuple[int, int]:
    """Collective: (correct, count) of ``engine``'s argmax over ``batches`` (this rank's
    (index, images, labels)), summed over ranks; every image is counted once.

    Every rank runs as many forward passes (:func:`lgp_ds.dist.in_lockstep`: ZeRO 3 gathers
    parameters collectively in the forward). The model is in eval mode meanwhile (no drop path,
    BN running statistics), back in training mode after.
    """
    engine.eval()
    try:
        totals = torch.zeros(2, dtype=torch.int64, device=device)
        for batch, shape in dist.in_lockstep(batches, device, lambda b: b[1].shape[1:]):
            if batch is None:
                engine(torch.zeros(1, *shape, device=device))  # dropped
                continue
            _, images, labels = batch
            logits = engine(images.to(device, non_blocking=True))
            labels = labels.to(device)
            totals += torch.stack([(logits.argmax(1) == labels).sum(),
                                   torch.tensor(labels.numel(), device=device)])
        dist.all_reduce_sum(totals)
        return int(totals[0]), int(totals[1])
    finally:
        engine.train()
