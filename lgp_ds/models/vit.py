"""timm Vision Transformer factory with the switches the recipes use.

The encoder is a plain timm ``VisionTransformer`` so that its state dict keys are timm's (and
MAE's encoder keys): checkpoints move between lgp_ds, MAE and timm without renaming.
"""
import re

import timm
import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import (Attention, Block, VisionTransformer,
                                            get_init_weights_vit)
from torch.utils.checkpoint import checkpoint

from .partitioned import apply_gathered, copy_whole, full_shape, writable


def create_vit(arch: str, img_size: int = 224, patch_size: int | None = None,
               embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None,
               drop_path: float = 0.0, fused_attn: bool = True, grad_ckpt: bool | int = False,
               sincos_pos_embed: bool = False, frozen_patch_embed: bool = False) -> VisionTransformer:
    """Build a headless timm ViT (``num_classes=0``): forward(x [N,3,H,W]) -> [N, embed_dim].

    ``patch_size``/``embed_dim``/``depth``/``num_heads`` override the named architecture (None keeps
    it). ``grad_ckpt``: activation checkpointing, see :func:`set_checkpointing`.
    ``sincos_pos_embed`` fixes the position embedding to 2-D sin-cos (cls position zero) and
    freezes it; ``frozen_patch_embed`` freezes MoCo v3's random patch projection. Built inside
    ``deepspeed.zero.Init`` it comes out partitioned, initialised as it would be whole.
    """
    overrides = {k: v for k, v in dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                       num_heads=num_heads).items() if v is not None}
    # timm initialises at the end of __init__, when zero.Init has partitioned the blocks already:
    # built uninitialised, then initialised here the same way, a module at a time
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size,
                              drop_path_rate=drop_path, weight_init="skip", **overrides)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"arch={arch!r} is not a timm VisionTransformer")
    _init_timm_weights(model)
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = fused_attn  # SDPA (flash / memory-efficient kernels) vs explicit softmax
    set_checkpointing(model, grad_ckpt)
    if sincos_pos_embed:
        _fix_sincos_pos_embed(model)
    if frozen_patch_embed:
        model.patch_embed.requires_grad_(False)
    return model


def _init_timm_weights(model: VisionTransformer) -> None:
    """timm's ``VisionTransformer.init_weights()`` (its default scheme, the same draws in the same
    order), each module's parameters gathered in turn where zero.Init partitioned them."""
    if getattr(model, "fix_init", False):
        raise ValueError("timm ViTs with fix_init are not supported")
    tokens = [t for t in (model.pos_embed, model.cls_token, model.reg_token) if t is not None]
    with writable(tokens), torch.no_grad():
        if model.pos_embed is not None:
            trunc_normal_(model.pos_embed, std=.02)
        if model.cls_token is not None:
            nn.init.normal_(model.cls_token, std=1e-6)
        if model.reg_token is not None:
            nn.init.normal_(model.reg_token, std=1e-6)
    init = get_init_weights_vit("", needs_reset=False)
    for child in model.children():  # timm's named_apply leaves the root out
        apply_gathered(init, child)


class CheckpointedBlocks(nn.Sequential):
    """A ViT's ``blocks`` whose lowest ``checkpointed`` blocks are checkpointed (see
    :func:`run_blocks`). The same children as timm's ``nn.Sequential``: the same state dict.

    forward(x [N, T, D]) -> [N, T, D]
    """
    checkpointed = 0
    every = False  # grad_ckpt: true, which checkpoints the MAE decoder's blocks too

    def configure(self, grad_ckpt: bool | int) -> None:
        """Checkpoint every block (True), none (False) or the lowest ``grad_ckpt``."""
        count = len(self) if grad_ckpt is True else int(grad_ckpt)
        if not 0 <= count <= len(self):
            raise ValueError(f"config key grad_ckpt={grad_ckpt} must lie in [0, {len(self)}], "
                             f"the model's depth")
        self.checkpointed, self.every = count, grad_ckpt is True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self, x, self.checkpointed)


def run_blocks(blocks, x: torch.Tensor, checkpointed: int) -> torch.Tensor:
    """``blocks`` in turn on x [N, T, D]. The first ``checkpointed`` keep only their input for
    backward and run their forward again there (torch's non-reentrant checkpoint, which ZeRO 3's
    gathering hooks and regionally compiled blocks run inside); without autograd recording (the
    momentum encoder, evaluation) there is nothing to keep and they run plainly."""
    for i, block in enumerate(blocks):
        if i < checkpointed and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def set_checkpointing(vit: VisionTransformer, grad_ckpt: bool | int) -> None:
    """Activation checkpointing of ``vit``'s blocks: every block (True), none (False) or the
    lowest ``grad_ckpt``.

    A checkpointed block keeps its input (2 bytes per token and width in bf16) instead of its
    activations (about 32) and costs one more forward of itself in backward, so checkpointing
    only as many blocks as memory needs saves that share of the recompute. Blocks that record
    nothing for autograd (frozen, with nothing trained below them: mim2cl_frozen's lower stages,
    ``freeze_blocks``) keep no activations either way. ``vit.blocks`` becomes a
    :class:`CheckpointedBlocks`; timm's all-or-nothing ``grad_checkpointing`` is left off.
    """
    if getattr(vit, "grad_checkpointing", False):
        vit.grad_checkpointing = False  # timm's forward would checkpoint every block again
    vit.blocks.__class__ = CheckpointedBlocks
    vit.blocks.configure(grad_ckpt)


def checkpointed_blocks(vit: nn.Module) -> int:
    """How many of ``vit``'s lowest blocks are checkpointed (a module with timm ViT attributes:
    set by :func:`set_checkpointing`, or timm's own all-or-nothing flag)."""
    count = getattr(vit.blocks, "checkpointed", None)
    if count is None:
        count = len(vit.blocks) if getattr(vit, "grad_checkpointing", False) else 0
    return count


def vit_from_config(cfg, **overrides) -> VisionTransformer:
    """:func:`create_vit` with the model keys of an experiment config (``overrides`` win)."""
    # grad_ckpt=auto: the trainer resolves it to a number before it builds the model it trains
    # (lgp_ds.scaling.memory.auto_checkpointing); models built otherwise (FLOP counts, stand-in
    # weights, frozen encoders) train nothing
    grad_ckpt = 0 if cfg.grad_ckpt == "auto" else cfg.grad_ckpt
    kwargs = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                  depth=cfg.depth, num_heads=cfg.num_heads, drop_path=cfg.drop_path,
                  fused_attn=cfg.fused_attn, grad_ckpt=grad_ckpt,
                  sincos_pos_embed=cfg.sincos_pos_embed, frozen_patch_embed=cfg.frozen_patch_embed)
    return create_vit(cfg.arch, **{**kwargs, **overrides})


_COMPILED_CLASSES: dict[tuple[type, str], type] = {}


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Regional compilation: every timm transformer ``Block`` of ``model`` (encoders and decoders)
    runs a ``torch.compile``d forward; returns how many blocks.

    The blocks repeat, so compiling one block's forward, reused by all, takes a fraction of the
    time a whole-model (or whole-engine) compile takes at ViT-L/g size. The compiled forward is
    a class attribute of a subclass each block is switched to: module hooks (ZeRO-3's parameter
    gathers, activation checkpointing's recompute) stay outside the compiled region, other
    models of the class (the momentum encoder) share the compiled code, and the state dict is
    unchanged. Blocks that differ in a constant (their drop-path rate, with ``drop_path`` > 0)
    compile once each, so dynamo's cache limit is raised to fit them all.
    """
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        cls = type(block)
        if cls in _COMPILED_CLASSES.values():  # compiled already
            continue
        key = (cls, backend)
        if key not in _COMPILED_CLASSES:
            _COMPILED_CLASSES[key] = type(f"Compiled{cls.__name__}", (cls,), {
                "forward": torch.compile(cls.forward, backend=backend)})
        block.__class__ = _COMPILED_CLASSES[key]
    limit = torch._dynamo.config.cache_size_limit  # a graph per block: training, no-grad, eval
    torch._dynamo.config.cache_size_limit = max(limit, 3 * len(blocks))
    return len(blocks)


# Keys of an MAE pre-training model that are not part of its encoder.
MAE_ONLY_PREFIXES = ("decoder_", "mask_token")
# Keys of a timm ViT that are not part of a pre-trained encoder: the projector or classifier.
HEAD_PREFIXES = ("head.", "fc_norm.")


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                 skip: tuple[str, ...] = HEAD_PREFIXES) -> None:
    """Copy ``state`` into ``module``, every key but those starting with ``skip`` on both sides.

    Raises ValueError naming the first offending keys when the weights do not fit: a checkpoint
    of another model (depth, width) is refused rather than half loaded.
    """
    own = {k: v for k, v in module.state_dict(keep_vars=True).items() if not k.startswith(skip)}
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {tuple(full_shape(v))}"
                   for k, v in own.items() if k in state and state[k].shape != full_shape(v)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
    if wrong_shape:
        problems.append(f"shape mismatch {wrong_shape[:5]}")
    if problems:
        raise ValueError(f"init={source} does not fit the model ({type(module).__name__}, "
                         f"{len(own)} tensors): " + "; ".join(problems))
    for k, v in own.items():  # a partitioned parameter takes this rank's part
        copy_whole(v, state[k])


def _fix_sincos_pos_embed(model: VisionTransformer) -> None:
    grid = list(model.patch_embed.grid_size)
    shape = full_shape(model.pos_embed)
    table = build_sincos2d_pos_embed(grid, dim=shape[-1])  # [H*W, D]
    n_prefix = shape[1] - table.shape[0]  # cls (and register) tokens: zeros
    with writable([model.pos_embed]), torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, n_prefix:].copy_(table)
    model.pos_embed.requires_grad_(False)


_BLOCK = re.compile(r"blocks\.(\d+)\.")
_EMBEDDINGS = ("cls_token", "reg_token", "pos_embed", "patch_embed.")


def vit_layer_id(name: str, depth: int) -> int:
    """Layer of a ViT parameter name: 0 = embeddings, i + 1 = block i, depth + 1 = after the blocks."""
    if name.startswith(_EMBEDDINGS):
        return 0
    block = _BLOCK.match(name)
    return int(block.group(1)) + 1 if block else depth + 1
