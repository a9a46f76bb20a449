"""Training FLOPs of one image, counted by fvcore on the method's own model.

The rule: 3 x the forward FLOPs of the method's model on its views (forward + backward, the
backward counted as twice the forward), plus one forward of the momentum encoder on each of the
two contrastive views where the method has one. The forward runs the model as it trains (MAE's
encoder on the visible patches only), with explicit attention matmuls (fvcore does not count
fused SDPA) and without activation checkpointing (its recomputed forward is not useful work).
"""
import torch
from fvcore.nn import FlopCountAnalysis
from PIL import Image
from timm.models.vision_transformer import Attention

from lgp_ds.models.vit import CheckpointedBlocks


def sample_views(method, img_size: int) -> tuple[torch.Tensor, ...]:
    """The views the method's transform makes of one (blank) image: their number and dtype."""
    return method.transform()(Image.new("RGB", (img_size, img_size)))


def _forward_flops(module, inputs) -> float:
    """FLOPs of one image: fvcore counts multiply-adds (x2) of a batch of 2 (/2)."""
    return 2 * FlopCountAnalysis(module, inputs).unsupported_ops_warnings(False).total() / 2


def flops_per_image(method, cfg) -> float:
    """Training FLOPs of one image by the rule above."""
    torch.manual_seed(cfg.seed)
    model = method.build_model().eval()  # eval: BatchNorm without cross-rank statistics
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
        if isinstance(m, CheckpointedBlocks):
            m.configure(False)  # the MAE decoder's blocks too
    views = tuple(torch.zeros(2, 3, cfg.img_size, cfg.img_size)
                  for _ in sample_views(method, cfg.img_size))
    flops = 3 * _forward_flops(model, views)
    if method.momentum_encoder:
        flops += 2 * _forward_flops(model.base_encoder, views[0])
    return flops
