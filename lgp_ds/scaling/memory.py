"""What each rank holds in a step of the grafting step, per ZeRO stage (bytes, rough where said).

- parameters: the engine's bf16 module, whole (ZeRO 0-2) or a 1/n partition plus the tensors
  under the persistence threshold and ZeRO-3's gathered working set (one prefetch bucket).
- gradients: bf16, whole (ZeRO 0) or this rank's averaged partition plus the reduce buckets
  that the hooks fill in backward (ZeRO 1/2 with ``overlap_comm``: two of ``reduce_bucket_size``
  elements; ZeRO 3: one). Without gradient accumulation ZeRO 1 holds what ZeRO 2 holds. With
  the MIM anchor (fp32 gradient accumulation) partitions and buckets are fp32, and ZeRO 1 (the
  BF16_Optimizer) holds the bf16 gradients and a whole fp32 copy.
- optimizer: fp32 masters and Adam's two moments, plus the fp32 gradient made for the step from
  bf16 ones, whole (ZeRO 0) or partitioned.
- momentum encoder (:mod:`lgp_ds.engine.momentum`): a whole fp32 copy (ZeRO 0); ZeRO 1/2 the
  fp32 EMA of this rank's share of the optimizer's flat groups (which also hold the predictor),
  a bf16 compute copy of the groups that hold its Linear and Conv2d weights, its other trained
  tensors and its frozen ones in fp32; ZeRO 3 a 1/n fp32 partition plus what its forward holds
  gathered (:attr:`ModelCounts.momentum_gathered`).
- activations: what a timm block saves for backward per token and view, in bf16 with fused
  attention (no token-by-token matrix): 8 values of the block's width (the two LayerNorms'
  inputs and outputs, the latter the qkv and first MLP layer's inputs; q, k and v; the attention
  output, of which the projection's input is a view) and 2 of the MLP's hidden width (the
  GELU's input and output): 2 x (8 + 2 x 4) = 32 bytes per token and width at
  MLP ratio 4 (Korthikanti et al. 2022's 34 without their dropout masks; measured by
  tests/test_scaling.py with torch's saved-tensor hooks). A checkpointed block keeps its
  input (2 bytes) and rebuilds the rest in backward (see :func:`activation_bytes`). The
  momentum encoder runs without gradient (no activations kept), the heads see one token per
  image (left out).
"""
import dataclasses

from .counts import ModelCounts, count_config
from .traffic import (BF16, FP32, PERSISTENCE_THRESHOLD, PREFETCH_BUCKET, REDUCE_BUCKET, VIEWS,
                      Setup)

OPTIMIZER_BYTES = 12  # fp32 master, Adam's m and v
# Left of a GPU's memory for what the model does not count: CUDA context, NCCL buffers, the
# allocator's fragmentation
MEMORY_RESERVE_GB = 10.0


def activation_bytes(m: ModelCounts, batch: float) -> float:
    """Activations a rank holds at the peak of a step of ``batch`` images (both views)."""
    block = BF16 * m.tokens * (8 * m.width + 2 * m.mlp_width)
    kept = m.depth - m.ckpt_blocks
    # The lowest blocks are checkpointed, so backward rebuilds them last, one at a time, once the
    # kept blocks' activations are freed: the peak is at the start of backward (the checkpointed
    # blocks' inputs, the kept blocks' activations). Where every block is checkpointed it is the
    # top block's rebuild, whose activations include its input: as with all but the top block
    # checkpointed, which is why checkpointing the top block too saves nothing.
    inputs = min(m.ckpt_blocks, m.depth - 1)
    per_view = inputs * BF16 * m.tokens * m.width + max(kept, 1) * block
    return VIEWS * batch * per_view


def memory(m: ModelCounts, setup: Setup, n: int, batch: float) -> dict[str, float]:
    """{part: bytes} on each of ``n`` ranks; parts: params, grads, optimizer, momentum,
    activations."""
    stage, total, trained, mom = setup.stage, m.engine.total, m.engine.trained, m.momentum.total
    shards = 1 if stage == 0 else n
    fp32_grads = m.fp32_grads and stage > 0  # ZeRO 0 runs without the anchor
    grad_bytes = FP32 if fp32_grads else BF16
    if stage == 3:
        gathered = m.engine.over(PERSISTENCE_THRESHOLD)
        params = BF16 * (total - gathered + gathered / n + PREFETCH_BUCKET)
        grads = grad_bytes * (trained / n + REDUCE_BUCKET)
        # on more than one rank a gather's receive buffer and the tensors copied out of it
        momentum = FP32 * mom / n + m.momentum_gathered * (2 if n > 1 else 1)
    else:
        params = BF16 * total
        if stage == 0:
            grads = BF16 * trained
        elif stage == 1 and fp32_grads:  # the BF16_Optimizer
            grads = (BF16 + FP32) * trained
        else:
            grads = grad_bytes * (trained / n + 2 * REDUCE_BUCKET)
        if stage == 0:
            momentum = FP32 * mom
        else:
            momentum = (FP32 * trained / n + BF16 * sum(m.ema_groups)
                        + FP32 * (m.ema_fp32 + mom - m.momentum.trained))
    optimizer = (OPTIMIZER_BYTES + (0 if fp32_grads else FP32)) * trained / shards
    return {"params": params, "grads": grads, "optimizer": optimizer, "momentum": momentum,
            "activations": activation_bytes(m, batch)}


def fewest_checkpointed(m: ModelCounts, setup: Setup, n: int, batch: float,
                        budget: float) -> int | None:
    """The fewest of the lowest blocks to checkpoint (``grad_ckpt: N``) for a rank's memory
    under ``setup`` on ``n`` ranks to fit ``budget`` bytes; None where checkpointing every block
    does not fit either. Each block left out saves its share of the recompute."""
    for blocks in range(m.depth + 1):
        counted = memory(dataclasses.replace(m, ckpt_blocks=blocks), setup, n, batch)
        if sum(counted.values()) <= budget:
            return blocks
    return None


def auto_checkpointing(cfg, stage: int, n: int, batch: int, device_bytes: float) -> int:
    """``grad_ckpt: auto``: :func:`fewest_checkpointed` for the model ``cfg`` builds (a grafting
    step's) under ZeRO ``stage`` on ``n`` ranks of ``batch`` images each, in ``device_bytes`` less
    :data:`MEMORY_RESERVE_GB`. Raises ValueError where checkpointing every block does not fit."""
    m = count_config(cfg.model_copy(update={"grad_ckpt": False}))
    budget = device_bytes - MEMORY_RESERVE_GB * 1e9
    blocks = fewest_checkpointed(m, Setup(stage), n, batch, budget)
    if blocks is None:
        every = sum(memory(dataclasses.replace(m, ckpt_blocks=m.depth), Setup(stage), n,
                           batch).values())
        raise ValueError(f"config key grad_ckpt=auto: {batch} images per rank do not fit even "
                         f"with every block checkpointed ({every / 1e9:.1f} GB predicted under "
                         f"ZeRO {stage} on {n} ranks, {budget / 1e9:.1f} GB available): take a "
                         f"smaller micro-batch, more ranks or ZeRO 3")
    return blocks
