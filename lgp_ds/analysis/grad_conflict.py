"""Gradient conflict between MIM and CL (the paper's Figure 1): for each block of a ViT, the
cosine similarity between the gradient of the MAE loss and that of the MoCo v3 loss with respect
to all of that block's parameters, over many batches.

The model is the multi-task one (:class:`lgp_ds.methods.mtl.MTLModel`): one encoder, MAE's
decoder on the visible patches of a light view, MoCo v3's projector and predictor on two strong
views against a momentum encoder, as MTL trains them. Whatever part the checkpoint lacks (an MAE
file has no projector, a MoCo file no decoder, a timm file neither) is freshly initialised from
``seed`` and reported; a missing momentum encoder is a copy of the encoder.

Several ranks compute the cosine of one global batch as one process would: each rank takes its
share of the batch (the views and the MAE mask of every image drawn from its position), BN
statistics cover the global batch and the keys are all-gathered (as in training); the gradients
of the ranks' local losses are summed with an all-reduce before the cosine (the sum is the
global loss's gradient times the world size, and the cosine ignores the scale).
"""
import copy

import numpy as np
import torch

from lgp_ds import convert, dist
from lgp_ds.config import build_config
from lgp_ds.methods.mtl import MTLModel
from lgp_ds.models.vit import load_weights
from lgp_ds.objectives import mae_loss, moco_loss

from .images import view_seed

# The config keys that define the two losses and their views (recorded with the results)
LOSS_KEYS = ("mask_ratio", "norm_pix_loss", "tau", "crop_min", "mae_crop_min", "proj_dim",
             "mlp_dim", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def gradient_cosines(loss_a: torch.Tensor, loss_b: torch.Tensor, blocks) -> torch.Tensor:
    """Collective: [depth] float64, per block of ``blocks`` (modules), the cosine between the
    gradients of ``loss_a`` and ``loss_b`` with respect to all its parameters (flattened into
    one vector), each gradient summed over the ranks first. A block that gets no gradient from
    a loss counts as a zero gradient (cosine 0)."""
    params = [list(b.parameters()) for b in blocks]
    flat = [p for ps in params for p in ps]
    grads = []
    for i, loss in enumerate((loss_a, loss_b)):
        g = torch.autograd.grad(loss, flat, retain_graph=i == 0, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                                for x, p in zip(g, flat)]))
    both = dist.all_reduce_sum(torch.stack(grads).double())  # [2, P]: one collective
    out, start = [], 0
    for ps in params:
        size = sum(p.numel() for p in ps)
        a, b = both[:, start:start + size]
        out.append(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))
        start += size
    return torch.stack(out).cpu()


def build_mtl(weights: convert.Weights, values: dict, seed: int, where: str):
    """(MTLModel, momentum encoder, config, notes) from a checkpoint's ``weights``.

    ``values``: the config keys (the checkpoint's own for an lgp_ds run, else a recipe's) that
    size the heads and set masking and tau; the encoder is the model the weights name
    (:func:`lgp_ds.convert.model_spec`). Parts the checkpoint lacks are initialised from
    ``seed``; ``notes`` says which.
    """
    cfg = build_config({**values, "drop_path": 0.0})
    encoder_sd = weights.encoder()
    if not any(k.startswith("blocks.") for k in encoder_sd):
        raise ValueError(f"{where}: the checkpoint has no transformer blocks (blocks.*)")
    spec = convert.model_spec(encoder_sd, weights.arch, weights.num_heads, arch_recorded=True)
    torch.manual_seed(seed)
    model = MTLModel(spec.create(), cfg)
    load_weights(model.base_encoder, encoder_sd, where)
    notes = [f"encoder: {spec.describe()}"] + [f"encoder: {note}" for note in spec.notes]
    parts = {"projector": (model.base_encoder.head,
                           {k[5:]: v for k, v in weights.base.items() if k.startswith("head.")}),
             "predictor": (model.predictor, weights.predictor or {}),
             "decoder": (model, weights.decoder or {})}
    for name, (module, sd) in parts.items():
        if not sd:
            notes.append(f"{name}: not in the checkpoint, freshly initialised (seed {seed})")
        elif name == "decoder":
            load_weights(module, sd, where, skip=("base_encoder.", "predictor.",
                                                  "decoder_pos_embed"))  # fixed sin-cos
        else:
            convert.load_strict(module, sd, f"{where}: the {name} does not fit "
                                            f"proj_dim={cfg.proj_dim}, mlp_dim={cfg.mlp_dim}")
    momentum = copy.deepcopy(model.base_encoder)
    if weights.momentum is not None:
        convert.load_strict(momentum, weights.momentum, f"{where}: the momentum encoder")
    else:
        notes.append("momentum encoder: not in the checkpoint, a copy of the encoder")
    momentum.requires_grad_(False)
    return model.train(), momentum.train(), cfg, notes


def mask_noise(positions: torch.Tensor, num_patches: int, seed: int) -> torch.Tensor:
    """[n, L] MAE masking noise, each row drawn from the seed of the image's position."""
    return torch.stack([torch.rand(num_patches, generator=torch.Generator().manual_seed(
        view_seed(seed, int(p), stream=1))) for p in positions])


def batch_cosines(model: MTLModel, momentum, positions: torch.Tensor, views, cfg,
                  seed: int) -> torch.Tensor:
    """Collective: [depth] float64 MIM-vs-CL gradient cosines of one global batch, this rank
    holding ``views`` (x1, x2 MoCo views, x3 MAE view, each [n,3,H,W]) of the images at
    ``positions`` [n]."""
    w = model.base_encoder.patch_embed.proj.weight
    x1, x2, x3 = (x.to(w.device, w.dtype) for x in views)
    noise = mask_noise(positions, model.base_encoder.patch_embed.num_patches, seed).to(w.device)
    q1, q2, pred, mask = model(x1, x2, x3, noise)
    with torch.no_grad():
        k1, k2 = momentum(x1), momentum(x2)
    cl = moco_loss(q1, q2, k1, k2, cfg.tau)
    mim = mae_loss(pred, x3, mask, model.base_encoder.patch_embed.patch_size[0],
                   cfg.norm_pix_loss)
    return gradient_cosines(mim, cl, model.base_encoder.blocks)


def summary(cosines: np.ndarray) -> dict:
    """cosines [batches, depth] -> the per-block medians, the least-squares line through them
    (median = slope * block + intercept, blocks numbered from 1) and the share of negatives."""
    medians = np.median(cosines, axis=0)
    blocks = np.arange(1, cosines.shape[1] + 1)
    slope, intercept = np.polyfit(blocks, medians, 1) if len(blocks) > 1 else (0.0, medians[0])
    return {"median": medians.tolist(), "slope": float(slope), "intercept": float(intercept),
            "negative_fraction": (cosines < 0).mean(axis=0).tolist()}


def plot(ax, name: str, cosines: np.ndarray, fit: dict) -> None:
    """Figure 1: a box per block over the batches, the regression line of the medians, and 0."""
    blocks = np.arange(1, cosines.shape[1] + 1)
    ax.boxplot(cosines, positions=blocks, widths=0.6, showfliers=True)
    ax.plot(blocks, fit["slope"] * blocks + fit["intercept"], "r-",
            label=f"median fit: {fit['slope']:+.3f} per block")
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("block")
    ax.set_ylabel("cos(grad MIM, grad CL)")
    ax.set_title(name)
    ax.legend(fontsize=8)
