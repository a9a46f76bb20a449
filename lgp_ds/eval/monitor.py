"""The online kNN monitor of a pre-training run (``knn_every``): frozen-feature kNN of the live
encoder, possibly ZeRO-3 partitioned, in the middle of training, without disturbing it."""
import contextlib
import random

import numpy as np
import torch
import torch.nn as nn

from lgp_ds import dist
from lgp_ds.data.pipeline import shards_or_embedded
from lgp_ds.data.transforms import eval_transform

from .features import extract_features
from .knn import knn_predict


def backbone_features(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The class token after the final norm of a training model's encoder (a timm ViT, its
    projector left out, or an lgp_ds MaskedAutoencoder run on the whole image, unmasked):
    images [N,3,H,W] -> [N, D] in the module's dtype. Under ZeRO-3 the module's own parameters
    (class token, position embedding) must be gathered (:func:`own_parameters_gathered`); its
    submodules gather theirs in their forward."""
    from lgp_ds.models.mae import MaskedAutoencoder, encode_visible
    x = images.to(module.patch_embed.proj.weight.dtype)
    if isinstance(module, MaskedAutoencoder):
        n, length = x.shape[0], module.patch_embed.num_patches
        keep_order = torch.arange(length, device=x.device, dtype=torch.float32).expand(n, -1)
        tokens, _, _ = encode_visible(module, x, 0.0, keep_order)
        return tokens[:, 0]
    return module.forward_head(module.forward_features(x), pre_logits=True)


def own_parameters_gathered(module: nn.Module):
    """Context: the parameters ``module`` holds itself (not its submodules') gathered in full
    under ZeRO-3 (a collective: every rank enters it); nothing otherwise."""
    import deepspeed
    own = list(module.parameters(recurse=False))
    return deepspeed.zero.GatheredParameters(own, enabled=any(hasattr(p, "ds_id") for p in own))


@contextlib.contextmanager
def _rng_preserved(device: torch.device):
    """Every RNG the training stream draws from (torch CPU and GPU, Python, NumPy) is as it was
    afterwards: DataLoader iterators draw a seed from the global torch RNG when created."""
    py, np_state = random.getstate(), np.random.get_state()
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


class KNNMonitor:
    """The online kNN evaluation of a pre-training run (``knn_every``): cosine kNN top-1 (%)
    (``knn_k`` neighbours, temperature ``knn_t``) of the class token after the final norm, from
    ``knn_train_data`` (the labelled set) to ``knn_val_data``; by default the embedded digits
    set's train and held-out val splits. Images: :func:`eval_transform` at ``img_size``.

    Built on every rank alike (a collective with the embedded data: its shards are built on
    first use); missing shards raise FileNotFoundError here, before training.
    """

    def __init__(self, cfg, batch_size: int):
        self.every = cfg.knn_every
        self.sets = {split: shards_or_embedded(patterns, cfg.img_size, split, cfg.num_workers)
                     for split, patterns in (("train", cfg.knn_train_data),
                                             ("val", cfg.knn_val_data))}
        self.k, self.t, self.batch_size = cfg.knn_k, cfg.knn_t, batch_size
        self.num_workers = cfg.num_workers
        self.transform = eval_transform(cfg.img_size)

    def __call__(self, trainer) -> dict:
        """Collective: {"knn": top-1 (%)} of ``trainer``'s live base encoder."""
        return {"knn": self.accuracy(trainer.method.encoder(trainer.engine.module),
                                     trainer.device)}

    def accuracy(self, encoder: nn.Module, device) -> float:
        """Collective: kNN top-1 (%) of ``encoder`` (ZeRO-3 partitioned or not, any dtype),
        evaluated in eval mode without gradients and put back in the mode it was in; the
        training RNG streams are left as they were."""
        device = torch.device(device)
        was_training = encoder.training
        encoder.eval()
        try:
            with _rng_preserved(device), own_parameters_gathered(encoder):
                def features(images):
                    return backbone_features(encoder, images)

                train, train_labels = extract_features(features, self.sets["train"],
                                                       self.transform, self.batch_size,
                                                       self.num_workers, device)
                val, val_labels = extract_features(features, self.sets["val"], self.transform,
                                                   self.batch_size, self.num_workers, device)
        finally:
            encoder.train(was_training)
        # each rank predicts its share of the val rows (on the device), the counts are summed
        rank, world = dist.get_rank(), dist.get_world_size()
        mine, correct = val[rank::world], torch.zeros(1, dtype=torch.int64, device=device)
        if mine.shape[0]:
            pred = knn_predict(train.to(device), train_labels.to(device), mine.to(device),
                               self.k, self.t)
            correct += (pred.cpu() == val_labels[rank::world]).sum().item()
        return 100.0 * int(dist.all_reduce_sum(correct).item()) / val.shape[0]
