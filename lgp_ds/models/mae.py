"""Masked autoencoder (MAE, He et al. 2022), step i of Layer Grafted Pre-training.

As facebookresearch/mae's models_mae.py, with its state dict keys, so official checkpoints load
strictly and ours load in MAE's own code. The pieces are functions over attributes so that one
code serves :class:`MaskedAutoencoder` and a multi-task model whose shared encoder is a timm ViT:

    random_masking(x, ratio, noise)          per-sample masking by argsort of noise
    encode_visible(vit, imgs, ratio, noise)  the encoder on the visible patches (+ cls)
    add_decoder(module, ...)                 registers MAE's decoder_* attributes on a module
    decode(module, latent, ids_restore, ..)  the decoder: a pixel prediction for every patch

Activation checkpointing: the encoder's lowest blocks as :func:`lgp_ds.models.vit.set_checkpointing`
set them, the decoder's blocks where every encoder block is (:func:`decoder_checkpointed`).
"""
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from lgp_ds.objectives import mae_loss

from .partitioned import apply_gathered, full_shape, writable
from .vit import (CheckpointedBlocks, checkpointed_blocks, run_blocks, set_checkpointing,
                  vit_from_config)


def mae_sincos_pos_embed(embed_dim: int, grid_size, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table (util/pos_embed.py): [cls + h*w, embed_dim], fp32.

    Patch (row i, column j) gets [sin(j w), cos(j w), sin(i w), cos(i w)], w = 10000^(-k/(D/4)),
    k < D/4, computed in float64 as MAE's numpy code; the cls slot is zero. timm's
    ``build_sincos2d_pos_embed`` orders the bands differently: official MAE files carry MAE's.
    """
    if embed_dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs embed_dim % 4 == 0, "
                         f"got {embed_dim}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")
    out_w = cols.reshape(-1, 1) * omega  # [h*w, D/4]
    out_h = rows.reshape(-1, 1) * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, embed_dim), table])
    return table.float()


def _init_mae_weights(m: nn.Module) -> None:
    """MAE's ``_init_weights``: xavier-uniform Linear weights with zero bias, LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random masking by argsort of noise (MAE).

    x [N, L, D] -> (x_visible [N, Lv, D], mask [N, L] with 0 kept / 1 removed in patch order,
    ids_restore [N, L]). Lv = round(L * (1 - mask_ratio)), at least 1 (MAE's int() floors:
    int(10 * (1 - 0.9)) = 0). The patches of smallest noise [N, L] (torch.rand when None) stay.
    """
    n, length, d = (int(s) for s in x.shape)  # ints under jit tracing too (fvcore's counter)
    len_keep = max(1, round(length * (1 - mask_ratio)))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    elif noise.shape != (n, length):
        raise ValueError(f"noise must be [N, L] = {[n, length]}, got {list(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = (ids_restore >= len_keep).float()  # = MAE's ones, zeros at :len_keep, gathered back
    return x_visible, mask, ids_restore


def encode_visible(vit: nn.Module, imgs: torch.Tensor, mask_ratio: float,
                   noise: torch.Tensor | None = None):
    """MAE's forward_encoder on a module with timm ViT attributes (patch_embed, pos_embed
    [1, 1+L, D] with a cls slot, cls_token, blocks, norm).

    imgs [N, 3, H, W] (cast by the caller to the parameters' dtype) -> (latent [N, 1 + Lv, D],
    mask [N, L], ids_restore [N, L]); see :func:`random_masking` for ``noise``.
    """
    x = vit.patch_embed(imgs)
    if x.ndim == 4:  # timm's NHWC output (dynamic_img_size)
        x = x.flatten(1, 2)
    pos_embed = vit.pos_embed
    if pos_embed.shape[1] != x.shape[1] + 1:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} positions, MAE needs a cls slot and "
                         f"{x.shape[1]} patches (a timm ViT with class_token, no registers, "
                         f"no_embed_class=False and the image size it was built for)")
    x = x + pos_embed[:, 1:, :]
    x, mask, ids_restore = random_masking(x, mask_ratio, noise)
    cls = (vit.cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    x = torch.cat((cls, x), dim=1)
    x = run_blocks(vit.blocks, x, checkpointed_blocks(vit))
    return vit.norm(x), mask, ids_restore


def add_decoder(module: nn.Module, num_patches: int, grid_size, patch_size: int, embed_dim: int,
                decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                mlp_ratio: float = 4.0, fused_attn: bool = True) -> None:
    """Register MAE's decoder on ``module`` under MAE's names, initialised as MAE does.

    decoder_embed (Linear D -> Dd), mask_token [1, 1, Dd], decoder_pos_embed [1, 1 + L, Dd]
    (fixed sin-cos, zero cls slot, requires_grad=False), decoder_blocks (timm Blocks), decoder_norm,
    decoder_pred (Linear Dd -> patch_size**2 * 3). ``fused_attn``: SDPA vs explicit softmax.
    """
    grid = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if grid[0] * grid[1] != num_patches:
        raise ValueError(f"grid_size {grid} does not hold num_patches={num_patches}")
    norm_layer = partial(nn.LayerNorm, eps=1e-6)
    module.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
    module.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    module.decoder_pos_embed = nn.Parameter(
        mae_sincos_pos_embed(decoder_embed_dim, grid).unsqueeze(0), requires_grad=False)
    module.decoder_blocks = nn.ModuleList([
        Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
        for _ in range(decoder_depth)])
    for blk in module.decoder_blocks:
        blk.attn.fused_attn = fused_attn
    module.decoder_norm = norm_layer(decoder_embed_dim)
    module.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3, bias=True)
    nn.init.normal_(module.mask_token, std=0.02)
    for m in (module.decoder_embed, module.decoder_blocks, module.decoder_norm,
              module.decoder_pred):
        apply_gathered(_init_mae_weights, m)


def decoder_checkpointed(encoder: nn.Module) -> bool:
    """The decoder's blocks are checkpointed where ``encoder``'s were set to ``grad_ckpt: true``;
    a count of the lowest encoder blocks leaves the decoder out, the depth included."""
    return getattr(encoder.blocks, "every", False)


def decode(module: nn.Module, latent: torch.Tensor, ids_restore: torch.Tensor,
           grad_ckpt: bool) -> torch.Tensor:
    """MAE's forward_decoder over the attributes of :func:`add_decoder`.

    latent [N, 1 + Lv, D], ids_restore [N, L] -> pred [N, L, p*p*3] (cls dropped). ``grad_ckpt``:
    checkpoint the decoder blocks.
    """
    x = module.decoder_embed(latent)
    n, length, d = x.shape[0], ids_restore.shape[1], x.shape[2]
    mask_tokens = module.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # visible first, then the masked: shuffled
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # back to patch order
    x = torch.cat([x[:, :1, :], x_], dim=1) + module.decoder_pos_embed
    x = run_blocks(module.decoder_blocks, x, len(module.decoder_blocks) if grad_ckpt else 0)
    return module.decoder_pred(module.decoder_norm(x))[:, 1:, :]


class MaskedAutoencoder(nn.Module):
    """MAE pre-training model around a timm ViT encoder, with the official MAE state dict keys.

    The encoder's patch_embed, cls_token, pos_embed, blocks and norm become this module's own
    attributes (its head/fc_norm are dropped), so ``state_dict()`` is models_mae's:
    cls_token, pos_embed, mask_token, decoder_pos_embed, patch_embed.*, blocks.*, norm.*,
    decoder_embed.*, decoder_blocks.*, decoder_norm.*, decoder_pred.*.
    All weights get MAE's initialisation; both position embeddings are MAE's fixed sin-cos.

    forward(imgs [N,3,H,W], noise [N,L] | None) -> (loss fp32 scalar, pred [N,L,p*p*3], mask [N,L])
    """

    def __init__(self, encoder: nn.Module, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 fused_attn: bool = True):
        super().__init__()
        pe = encoder.patch_embed
        if (getattr(encoder, "cls_token", None) is None or getattr(encoder, "reg_token", None)
                is not None or getattr(encoder, "no_embed_class", False)
                or not isinstance(getattr(encoder, "norm_pre", nn.Identity()), nn.Identity)
                or full_shape(encoder.pos_embed)[1] != pe.num_patches + 1):
            raise ValueError("MaskedAutoencoder needs a plain timm ViT: a cls token with a "
                             "position slot, no registers, no pre-norm")
        if not isinstance(encoder.blocks, CheckpointedBlocks):  # a timm ViT built elsewhere
            set_checkpointing(encoder, bool(getattr(encoder, "grad_checkpointing", False)))
        # MAE's parameter and module registration order: its state dict lists keys in this order
        self.cls_token = encoder.cls_token
        self.pos_embed = encoder.pos_embed
        self.patch_embed = pe
        self.blocks = encoder.blocks
        self.norm = encoder.norm
        add_decoder(self, pe.num_patches, pe.grid_size, pe.patch_size[0], encoder.embed_dim,
                    decoder_embed_dim, decoder_depth, decoder_num_heads, fused_attn=fused_attn)
        self.patch_size = pe.patch_size[0]
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MAE's initialize_weights (the decoder was initialised by :func:`add_decoder`)."""
        w = self.patch_embed.proj.weight
        with writable([self.pos_embed, w, self.cls_token]):
            self.pos_embed.copy_(mae_sincos_pos_embed(self.pos_embed.shape[-1],
                                                      self.patch_embed.grid_size).unsqueeze(0))
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.cls_token, std=0.02)
        self.pos_embed.requires_grad_(False)
        for m in (self.blocks, self.norm):
            apply_gathered(_init_mae_weights, m)

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None):
        x = imgs.to(self.patch_embed.proj.weight.dtype)  # DeepSpeed's bf16 has no input autocast
        latent, mask, ids_restore = encode_visible(self, x, self.mask_ratio, noise)
        pred = decode(self, latent, ids_restore, decoder_checkpointed(self))
        loss = mae_loss(pred, imgs, mask, self.patch_size, self.norm_pix_loss)  # fp32 target
        return loss, pred, mask


def build_mae_model(cfg) -> MaskedAutoencoder:
    """MaskedAutoencoder from the experiment config (see ``lgp_ds.config.Config``)."""
    encoder = vit_from_config(cfg, sincos_pos_embed=True)  # MAE's position table is fixed
    return MaskedAutoencoder(encoder, cfg.decoder_embed_dim, cfg.decoder_depth,
                             cfg.decoder_num_heads, cfg.mask_ratio, cfg.norm_pix_loss,
                             cfg.fused_attn)
