"""Variance, invariance and covariance of each block's output (the paper's Figure 6, VICReg's
three terms used as measurements).

Per block, each image's output tokens [T, D] are averaged over the patch tokens (prefix tokens
such as the class token left out, as MAE's global pool) and the average is normalised per image
with a LayerNorm without affine weights (zero mean and unit mean square over the D features), so
that blocks of different scale compare. On the normalised features z1, z2 [B, D] of two
augmented views (MoCo v3's) of the same B images:

    variance   = mean over features of the std over the batch (unbiased), mean of both views:
                 high = the images are spread out, 0 = collapse (VICReg hinges this at 1)
    invariance = mean((z1 - z2)^2): low = the two views map to the same feature
    covariance = sum of the squared off-diagonal entries of the covariance matrix [D, D] over
                 the batch, / D (VICReg's term), mean of both views: low = decorrelated features

The statistics are computed per global batch (features gathered from every rank) and averaged
over the batches.
"""
import torch
import torch.nn.functional as F

from lgp_ds import dist
from lgp_ds.objectives import off_diagonal

TERMS = ("variance", "invariance", "covariance")


def pool_and_normalise(tokens: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """tokens [N, T, D] -> [N, D] fp32: the mean over the patch tokens, LayerNorm-ed (no affine,
    eps 1e-6)."""
    pooled = tokens[:, num_prefix_tokens:].float().mean(dim=1)
    return F.layer_norm(pooled, pooled.shape[-1:], eps=1e-6)


def _covariance(z: torch.Tensor) -> torch.Tensor:
    z = z - z.mean(dim=0)
    cov = z.T @ z / (z.shape[0] - 1)
    return off_diagonal(cov).square().sum() / z.shape[1]


def vic_statistics(z1: torch.Tensor, z2: torch.Tensor) -> dict[str, float]:
    """{variance, invariance, covariance} (see the module docstring) of two views' features
    z1, z2 [B, D] (B >= 2), computed in float64."""
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 2:
        raise ValueError(f"vic_statistics needs two views of one shape [B >= 2, D], got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    z1, z2 = z1.double(), z2.double()
    return {"variance": float((z1.std(dim=0).mean() + z2.std(dim=0).mean()) / 2),
            "invariance": float((z1 - z2).square().mean()),
            "covariance": float((_covariance(z1) + _covariance(z2)) / 2)}


@torch.no_grad()
def block_features(vit, images: torch.Tensor) -> torch.Tensor:
    """[N, depth, D] fp32: :func:`pool_and_normalise` of each block's output for ``images``
    [N, 3, H, W] through the timm ViT ``vit``."""
    out = []
    handles = [blk.register_forward_hook(
        lambda module, args, y: out.append(pool_and_normalise(y, vit.num_prefix_tokens)))
        for blk in vit.blocks]
    try:
        w = vit.patch_embed.proj.weight
        vit(images.to(w.device, w.dtype))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(out, dim=1)


def block_vic(vit, batches) -> list[dict[str, float]]:
    """Collective: per block, the statistics averaged over the global batches; ``batches``
    yields (positions [n], (view1, view2 [n,3,H,W]), labels) as
    :func:`lgp_ds.analysis.images.rank_batches` does with two views."""
    sums, count = None, 0
    for positions, (x1, x2), _ in batches:
        f1, f2 = block_features(vit, x1), block_features(vit, x2)
        _, f1, f2 = dist.gather_in_order(positions, f1, f2, device=f1.device)
        stats = [vic_statistics(f1[:, i], f2[:, i]) for i in range(f1.shape[1])]
        sums = stats if sums is None else [{k: s[k] + t[k] for k in TERMS}
                                           for s, t in zip(sums, stats)]
        count += 1
    return [{k: s[k] / count for k in TERMS} for s in sums]


def plot(axes, stats: dict[str, list[dict[str, float]]]) -> None:
    """Three panels (variance, invariance, covariance against the block), a line per
    checkpoint."""
    for ax, term in zip(axes, TERMS):
        for c, (name, blocks) in enumerate(stats.items()):
            ax.plot(range(1, len(blocks) + 1), [b[term] for b in blocks], "o-", color=f"C{c}",
                    label=name)
        ax.set_xlabel("block")
        ax.set_title(term)
        ax.set_xticks(range(1, len(next(iter(stats.values()))) + 1))
    axes[0].legend(fontsize=8)
