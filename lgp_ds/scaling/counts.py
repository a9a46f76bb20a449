"""What the scaling model needs from the grafting step's models, counted on the meta device.

The models are built by the same code as training (the method's ``build_model`` from a bundled
recipe) with ``torch.device("meta")``: shapes without storage, so ViT-g/14 (1B parameters, 4 GB
in fp32) counts in a fraction of a second.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from lgp_ds.config import load_config
from lgp_ds.engine.anchor import is_anchored
from lgp_ds.engine.partitioned_forward import autocast_weights, gather_units
from lgp_ds.methods import build_method
from lgp_ds.models.heads import CrossRankBatchNorm1d
from lgp_ds.models.vit import checkpointed_blocks

# The sizes the report covers, each by its grafting recipe (ViT-H and ViT-g: ViT-L's carried
# over, stages of 8 blocks, the anchor on the lower half, batch 4096).
ARCHS = {"ViT-B/16": "vit_b_graft", "ViT-L/16": "vit_l_graft", "ViT-H/14": "vit_h_graft",
         "ViT-g/14": "vit_g_graft"}


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Params:
    """The parameter tensors of a module: their sizes and whether each one trains."""
    numels: tuple[int, ...]
    trains: tuple[bool, ...]

    @classmethod
    def of(cls, module: nn.Module) -> "Params":
        params = list(module.parameters())
        return cls(tuple(p.numel() for p in params), tuple(p.requires_grad for p in params))

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def trained(self) -> int:
        return sum(n for n, t in zip(self.numels, self.trains) if t)

    def over(self, threshold: int, trained_only: bool = False) -> int:
        """Elements in tensors of more than ``threshold`` elements (ZeRO-3 gathers those; the
        others persist whole on every rank)."""
        return sum(n for n, t in zip(self.numels, self.trains)
                   if n > threshold and (t or not trained_only))

    def persistent(self, threshold: int) -> int:
        """Tensors of at most ``threshold`` elements (ZeRO-3 keeps them whole on every rank)."""
        return sum(n <= threshold for n in self.numels)


@dataclass(frozen=True)
class ModelCounts:
    """One grafting model: the engine's module (base encoder with its projector, predictor), the
    momentum encoder (a copy of the base encoder with its projector), and per-image work."""
    name: str
    recipe: str
    engine: Params
    momentum: Params
    engine_bn: tuple[int, ...]  # widths of the engine's cross-rank BNs, each run once per view
    momentum_bn: tuple[int, ...]  # the same for the momentum encoder (forward only)
    # ZeRO 3: the momentum encoder's forward gathers, (dtype, calls, elements) per dtype (bf16:
    # the Linear and Conv2d weights; fp32: the rest), a call per unit that holds the dtype
    # (lgp_ds.engine.partitioned_forward.gather_units)
    momentum_gathers: tuple[tuple[str, int, int], ...]
    # ZeRO 3: bytes the momentum encoder's forward holds gathered at most: its first unit (all
    # but the blocks' weights), the block that runs and the next one, whose gather is in flight
    momentum_gathered: int
    # ZeRO 1/2: the momentum update's collectives (lgp_ds.engine.sharded_ema): the elements of
    # each of the optimizer's flat groups that holds a Linear or Conv2d weight of the momentum
    # encoder (all-gathered whole in bf16), and of its other trained tensors (one fp32 all-reduce)
    ema_groups: tuple[int, ...]
    ema_fp32: int
    key_dim: int  # width of the keys the contrastive loss all-gathers
    anchored_tensors: int  # tensors whose partial norms the MIM anchor all-reduces (0: no anchor)
    tokens: int  # per view, class token included
    width: int
    mlp_width: int  # the blocks' MLP hidden width
    depth: int
    ckpt_blocks: int  # the lowest blocks under activation checkpointing
    forward_flops: float  # one view of one image through base encoder, projector and predictor
    momentum_flops: float  # one view of one image through the momentum encoder
    global_batch: int  # the recipe's

    @property
    def train_flops(self) -> float:
        """FLOPs of one image (two views) per step, as REFERENCE.md counts them: forward and
        backward (3 forwards) of the engine's model, one forward of the momentum encoder."""
        return 2 * (3 * self.forward_flops + self.momentum_flops)

    @property
    def executed_flops(self) -> float:
        """FLOPs the GPU runs for one image (two views) per step: :attr:`train_flops` plus the
        forward that activation checkpointing computes again in the backward. The step time
        scales with these: a rate measured on a checkpointed model (ViT-L's recipe) applied to
        model FLOPs would make a model without checkpointing (ViT-B's) look a quarter slower."""
        return 2 * ((3 + self.recompute) * self.forward_flops + self.momentum_flops)

    @property
    def recompute(self) -> float:
        """The share of the forward that activation checkpointing runs again in backward (its
        share of the blocks, which hold nearly all the FLOPs)."""
        return self.ckpt_blocks / self.depth

    @property
    def fp32_grads(self) -> bool:
        """With the MIM anchor lgp_ds accumulates gradients in fp32 under bf16 (its gradient
        rounds away in bf16: ``config._anchor_precision``), which refuses ZeRO 0 and makes
        ZeRO 1 DeepSpeed's BF16_Optimizer."""
        return self.anchored_tensors > 0


def _forward_flops(encoder: nn.Module, tokens: int, patches: int) -> float:
    """2 x multiply-adds of one image through a timm ViT whose ``head`` is the projector: the
    blocks' linear layers on every token, attention's two token-by-token products, the patch
    projection on every patch, the projector on the class token."""
    flops = 0.0
    for name, m in encoder.named_modules():
        if isinstance(m, nn.Linear):
            flops += 2 * m.weight.numel() * (1 if name.startswith("head.") else tokens)
        elif isinstance(m, nn.Conv2d):
            flops += 2 * m.weight.numel() * patches
    return flops + len(encoder.blocks) * 2 * 2 * tokens ** 2 * encoder.embed_dim


def count_model(name: str) -> ModelCounts:
    """Count the grafting model ``name`` (a key of :data:`ARCHS`) as its recipe builds it."""
    cfg = load_config(ARCHS[name], [])
    return count_config(cfg, name, ARCHS[name])


def count_config(cfg, name: str = "", recipe: str = "",
                 global_batch: int | None = None) -> ModelCounts:
    """Count the model that ``cfg`` (a MoCo-style method's config) builds, on the meta device."""
    method = build_method(cfg)
    with torch.device("meta"):
        model = method.build_model()
    encoder = method.encoder(model)  # the ViT with the projector as its head
    patches = encoder.patch_embed.num_patches
    tokens = patches + encoder.num_prefix_tokens
    predictor = sum(2 * m.weight.numel() for m in model.predictor.modules()
                    if isinstance(m, nn.Linear))
    encoder_flops = _forward_flops(encoder, tokens, patches)
    anchor_blocks = cfg.anchor_blocks if cfg.anchor_blocks is not None else len(encoder.blocks) // 2
    anchored = sum(is_anchored(n, anchor_blocks) for n, p in model.named_parameters()
                   if p.requires_grad) if cfg.anchor_weight > 0 else 0
    bn = [m.num_features for m in model.modules() if isinstance(m, CrossRankBatchNorm1d)]
    momentum_bn = [m.num_features for m in encoder.modules() if isinstance(m, CrossRankBatchNorm1d)]
    gathers, unit_bytes = {}, []
    for unit in gather_units(encoder, torch.bfloat16):
        unit_bytes.append(0)
        for dtype, params in unit.items():
            calls, elements = gathers.get(dtype, (0, 0))
            numel = sum(p.numel() for _, p in params)
            gathers[dtype] = calls + 1, elements + numel
            unit_bytes[-1] += numel * dtype.itemsize
    cast = autocast_weights(encoder)
    members = {id(p) for p in encoder.parameters()}
    groups = method.param_groups(model, len(encoder.blocks), [1.0] * cfg.num_stages)
    ema_groups = tuple(sum(p.numel() for p in g["params"]) for g in groups
                       if any(id(p) in cast for p in g["params"] if id(p) in members))
    ema_fp32 = sum(p.numel() for p in encoder.parameters() if p.requires_grad and id(p) not in cast)
    return ModelCounts(
        name=name, recipe=recipe, engine=Params.of(model), momentum=Params.of(encoder),
        engine_bn=tuple(bn), momentum_bn=tuple(momentum_bn),
        momentum_gathers=tuple((_DTYPE_NAMES[dtype], *n) for dtype, n in
                               sorted(gathers.items(), key=lambda g: g[0].itemsize)),
        momentum_gathered=unit_bytes[0] + 2 * max(unit_bytes[1:], default=0),
        ema_groups=ema_groups, ema_fp32=ema_fp32,
        key_dim=cfg.proj_dim,
        anchored_tensors=anchored, tokens=tokens, width=encoder.embed_dim,
        mlp_width=encoder.blocks[0].mlp.fc1.out_features,
        depth=len(encoder.blocks), ckpt_blocks=checkpointed_blocks(encoder),
        forward_flops=encoder_flops + predictor, momentum_flops=encoder_flops,
        global_batch=global_batch or cfg.batch_size)
