"""The MoCo v3 model that the grafting step trains, and loading MIM weights into it.

Layout follows MoCo v3 and the official grafting code: ``base_encoder`` is the ViT whose
``head`` is the 3-layer projector, ``predictor`` the 2-layer MLP on top. The momentum encoder is
a copy of ``base_encoder`` kept outside the DeepSpeed engine (see ``lgp_ds.engine.momentum``).
"""

import torch
import torch.nn as nn

from lgp_ds import checkpoint_file

from .heads import build_mlp
from .vit import create_vit

# Keys of an MAE pre-training checkpoint that are not part of the encoder.
MAE_ONLY_PREFIXES = ("decoder_", "mask_token")


class GraftModel(nn.Module):
    """forward(x1 [N,3,H,W], x2 [N,3,H,W]) -> (q1 [N,dim], q2 [N,dim]), predictor outputs."""

    def __init__(self, encoder: nn.Module, dim: int = 256, mlp_dim: int = 4096,
                 cross_rank_bn: bool = True):
        super().__init__()
        width = encoder.embed_dim
        encoder.head = build_mlp(3, width, mlp_dim, dim, cross_rank_bn)  # projector
        self.base_encoder = encoder
        self.predictor = build_mlp(2, dim, mlp_dim, dim, cross_rank_bn)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        return self.predictor(self.base_encoder(x1)), self.predictor(self.base_encoder(x2))


def build_graft_model(cfg, cross_rank_bn: bool = True) -> GraftModel:
    """GraftModel from the experiment config (see ``lgp_ds.config.Config``)."""
    encoder = create_vit(cfg.arch, img_size=cfg.img_size, patch_size=cfg.patch_size,
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                         drop_path=cfg.drop_path, fused_attn=cfg.fused_attn, grad_ckpt=cfg.grad_ckpt,
                         sincos_pos_embed=cfg.sincos_pos_embed,
                         frozen_patch_embed=cfg.frozen_patch_embed)
    return GraftModel(encoder, cfg.proj_dim, cfg.mlp_dim, cross_rank_bn)


def read_mim_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Encoder weights from an MAE/timm file: a bare state dict or ``{'model': state_dict}``.

    Decoder keys and the mask token are dropped. The file is read by the safe loader
    (:mod:`lgp_ds.checkpoint_file`: MAE's ``args`` Namespace is accepted, code is not);
    ValueError for a file it refuses, FileNotFoundError for a missing one.
    """
    try:
        state = checkpoint_file.load(path)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"init={e}") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"init={path}: expected a state dict or {{'model': state_dict}} of tensors")
    return {k: v for k, v in state.items() if not k.startswith(MAE_ONLY_PREFIXES)}


def load_mim_weights(encoder: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy MIM encoder weights into ``encoder`` (a timm ViT); its ``head`` stays as it is.

    Raises ValueError naming the first offending keys when the checkpoint does not fit.
    """
    own = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
                   for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
    if wrong_shape:
        problems.append(f"shape mismatch {wrong_shape[:5]}")
    if problems:
        raise ValueError(f"init={source} does not fit the model ({type(encoder).__name__}, "
                         f"{len(own)} tensors): " + "; ".join(problems))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])
