"""The model a run trains: built whole, or under ZeRO-3 partitioned while it is built.

Under ZeRO-3 the model is built inside ``deepspeed.zero.Init``: each module's parameters are
split across the ranks as soon as the module exists, so no rank ever holds the whole base
encoder (nor the momentum encoder, built the same way) on the device: what lets ViT-g/14 and
larger start at all. (The ``init=`` weights are read whole into each rank's host memory until
the engine is built.) The models' own initialisation gathers one module at a time
(:mod:`lgp_ds.models.partitioned`).

Either way the model is built in fp32: the trainer keeps the exact initial values of this rank's
part as the fp32 master weights, and only then are the parameters cast to the training dtype
(:func:`cast_partitions` does DeepSpeed's cast for partitioned ones).
"""
import contextlib

import deepspeed
import torch
import torch.nn as nn
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import set_z3_leaf_module
from timm.models.vision_transformer import Block

from lgp_ds.models.partitioned import is_partitioned, local_part
from lgp_ds.models.vit import compile_blocks


def build_model(method, cfg, zero3_config: dict | None = None) -> nn.Module:
    """``method``'s model, fp32, from ``cfg.seed`` (so every rank, and every call, builds the same
    weights), its transformer blocks compiled where ``cfg.compile_blocks`` says; partitioned
    where ``zero3_config`` (the ZeRO-3 DeepSpeed config it will train under) is given."""
    torch.manual_seed(cfg.seed)
    partitioning = contextlib.nullcontext()
    if zero3_config is not None:
        # fp32 through the config (DeepSpeed 0.19.8's zero.Init drops its dtype= argument on
        # accelerators without fp16: an operator-precedence slip in Init._set_dtype)
        fp32 = {k: v for k, v in zero3_config.items() if k not in ("bf16", "bfloat16", "fp16")}
        # Tensors made on the host as in a whole build (the same random draws, whatever the
        # device), each module's parameters moved to the device and partitioned when it is done
        partitioning = deepspeed.zero.Init(config_dict_or_path=fp32, tensor_overrides=[])
    with partitioning:
        model = method.build_model()
    if zero3_config is not None:  # zero.Init moves parameters only; the engine moves nothing
        device = get_accelerator().current_device_name()
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.to(device))
    if cfg.compile_blocks:
        compile_blocks(model, cfg.compile_backend)
    return model


def local_values(p: nn.Parameter) -> torch.Tensor:
    """A flat copy of what this rank holds of ``p``: its part [numel] where partitioned, else
    all of it."""
    return (local_part(p)[1] if is_partitioned(p) else p.detach().reshape(-1)).clone()


@torch.no_grad()
def cast_partitions(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s partitioned floating-point parameters to ``dtype`` (bf16/fp16), as
    DeepSpeed casts a whole model's, which it does not do for one partitioned at construction."""
    for p in model.parameters():
        if is_partitioned(p) and p.is_floating_point() and p.dtype != dtype:
            part = p.ds_tensor.data.to(dtype)
            # offload_param's host partitions are pinned, for asynchronous copies to the device
            p.ds_tensor.data = part.pin_memory() if p.ds_tensor.is_pinned() else part
            p.data = p.data.to(dtype)  # the empty placeholder: gathers allocate in its dtype


# What feeds the first block of a stack, by the stack's attribute name (timm's ViT and MAE's
# encoder; MAE's decoder): where one of these trains, that block's input needs a gradient.
_FEEDERS = {"blocks": ("patch_embed", "cls_token", "pos_embed", "reg_token"),
            "decoder_blocks": ("decoder_embed", "mask_token")}


def gather_blocks_whole(model: nn.Module) -> None:
    """ZeRO 3: have DeepSpeed gather each transformer block of ``model`` in one go, as a "leaf
    module", instead of hooking every Linear and LayerNorm in it.

    Per-submodule hooks cost more host time than the gathers themselves, and inside a regionally
    compiled block each hooked submodule breaks the graph. Call before ``deepspeed.initialize``,
    and only for a model that runs each block once per backward: DeepSpeed 0.19.8 reduces a
    leaf's gradients when its backward ends and fails on a second use
    (:attr:`lgp_ds.methods.base.Method.reuses_blocks`).

    That reduction runs from a full backward hook, which fires before the block's own backward
    when none of its inputs needs a gradient: the gradients then come after it (a shape error).
    So a block with trainable parameters becomes a leaf only where its input needs a gradient:
    above another trainable block, or first in its stack with a trainable feeder (``_FEEDERS``).
    A frozen block, whose parameters nothing reduces, always; a block with both kinds never.
    """
    for parent in model.modules():
        for name, stack in parent.named_children():
            if name not in _FEEDERS:
                continue
            feeders = [getattr(parent, f, None) for f in _FEEDERS[name]]
            below = any(p.requires_grad for f in feeders if f is not None
                        for p in ([f] if isinstance(f, nn.Parameter) else f.parameters()))
            for block in stack.children():
                trains = {p.requires_grad for p in block.parameters()}
                if isinstance(block, Block) and (trains == {False} or trains == {True} and below):
                    set_z3_leaf_module(block, True)
                below = below or True in trains
