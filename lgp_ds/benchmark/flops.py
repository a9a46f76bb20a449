"""Training FLOPs of one image, counted by fvcore on the method's own model.

The rule: the forward FLOPs of the method's model on its views, plus a backward counted as
twice the forward FLOPs of the modules that train (the lower stages a grafting method freezes,
``frozen_stages``, have no backward), plus one forward of the momentum encoder on each of the
two contrastive views where the method has one. The model is frozen as the Trainer freezes it
and runs as it trains (MAE's encoder on the visible patches only), with explicit attention
matmuls (fvcore does not count fused SDPA) and without activation checkpointing (its recomputed
forward is not useful work).
"""
import torch
from fvcore.nn import FlopCountAnalysis
from PIL import Image
from timm.models.vision_transformer import Attention

from lgp_ds.engine.param_groups import freeze_lower_stages
from lgp_ds.models.vit import CheckpointedBlocks


def sample_views(method, img_size: int) -> tuple[torch.Tensor, ...]:
    """The views the method's transform makes of one (blank) image: their number and dtype."""
    return method.transform()(Image.new("RGB", (img_size, img_size)))


def _frozen_modules(module) -> list[str]:
    """Names of the outermost submodules whose parameters are all frozen (none has a backward)."""
    names = []
    for name, m in module.named_modules():
        params = list(m.parameters())
        if (params and not any(p.requires_grad for p in params)
                and not any(name.startswith(f"{outer}.") for outer in names)):
            names.append(name)
    return names


def _forward_flops(module, inputs) -> tuple[float, float]:
    """FLOPs of one image, all and those of the modules that train: fvcore counts multiply-adds
    (x2) of a batch of 2 (/2)."""
    analysis = FlopCountAnalysis(module, inputs).unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    by_module = analysis.by_module()
    frozen = sum(by_module[name] for name in _frozen_modules(module))
    return analysis.total(), analysis.total() - frozen


def flops_per_image(method, cfg) -> float:
    """Training FLOPs of one image by the rule above."""
    torch.manual_seed(cfg.seed)
    model = method.build_model().eval()  # eval: BatchNorm without cross-rank statistics
    freeze_lower_stages(model, len(method.encoder(model).blocks), cfg.num_stages,
                        cfg.frozen_stages, method.encoder_prefix)
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
        if isinstance(m, CheckpointedBlocks):
            m.configure(False)  # the MAE decoder's blocks too
    views = tuple(torch.zeros(2, 3, cfg.img_size, cfg.img_size)
                  for _ in sample_views(method, cfg.img_size))
    forward, trained = _forward_flops(model, views)
    flops = forward + 2 * trained
    if method.momentum_encoder:
        flops += 2 * _forward_flops(model.base_encoder, views[0])[0]
    return flops
