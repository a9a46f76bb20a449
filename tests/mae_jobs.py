"""Rank function of the MAE tests, for ``multirank.run_ranks``: the MAE model under DeepSpeed.

Each rank builds the model from the same seed (identical weights), wraps it in a DeepSpeed
engine and feeds its half of a global batch with its half of the noise; it returns plain
tensors. The test holds the single-process reference.
"""
import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from lgp_ds import dist
from lgp_ds.models.mae import MaskedAutoencoder
from lgp_ds.models.vit import create_vit

# The tiny model of the tests: 16 px images of 4x4 patches (L = 16), a 2-block encoder, a
# 1-block decoder. (create_vit's keyword arguments, MaskedAutoencoder's.)
ENCODER = dict(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
               num_heads=2, sincos_pos_embed=True)
DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75)
# activation checkpointing: none, the lowest encoder block, every block (as str(): True == 1)
GRAD_CKPT = (False, 1, True)


def tiny_mae(seed: int, grad_ckpt: bool | int = False, **overrides) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return MaskedAutoencoder(create_vit(**ENCODER, grad_ckpt=grad_ckpt), **{**DECODER, **overrides})


def local(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch [B, ...] -> [B / world, ...]."""
    n = x.shape[0] // dist.get_world_size()
    return x[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def zero3_job(imgs, noise, seed):
    """For each of GRAD_CKPT (keyed by its str()): a ZeRO-3 fp32 engine of ``tiny_mae(seed)``,
    one forward and backward on this rank's rows; loss, pred, mask and the full (rank-averaged)
    gradients."""
    out = {}
    for grad_ckpt in GRAD_CKPT:
        model = tiny_mae(seed, grad_ckpt)
        config = {"train_micro_batch_size_per_gpu": imgs.shape[0] // dist.get_world_size(),
                  "zero_optimization": {"stage": 3}, "bf16": {"enabled": False},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                  "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(
            model=model, config=config,
            model_parameters=[p for p in model.parameters() if p.requires_grad])
        loss, pred, mask = engine(local(imgs), local(noise))
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p).cpu().clone()
                 for n, p in engine.module.named_parameters() if p.requires_grad}
        out[str(grad_ckpt)] = {
            "loss": loss.detach().clone(), "pred": pred.detach().clone(), "mask": mask.clone(),
            "grads": grads,
            "partitioned": hasattr(engine.module.blocks[0].attn.qkv.weight, "ds_tensor")}
    return out
