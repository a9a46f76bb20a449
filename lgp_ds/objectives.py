"""Losses over a batch. Each rank holds its local batch; keys are all-gathered across ranks."""
import torch
import torch.nn.functional as F

from lgp_ds import dist


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo v3 InfoNCE for local queries q [N, D] against keys k [N, D] of every rank.

    Logits [N, world*N] are computed in fp32; the positive of query i on rank r is key r*N + i.
    Scaled by 2*tau as in MoCo v3.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    k_all = dist.all_gather_cat(k)
    logits = q @ k_all.T / tau
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * dist.get_rank()
    return F.cross_entropy(logits, labels) * (2 * tau)


def moco_loss(q1, q2, k1, k2, tau: float) -> torch.Tensor:
    """Symmetric MoCo v3 loss: ctr(q1, k2) + ctr(q2, k1). All inputs [N, D]."""
    return contrastive_loss(q1, k2, tau) + contrastive_loss(q2, k1, tau)


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The D*(D-1) off-diagonal entries of a square matrix [D, D], flattened (VICReg's trick)."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0,
                std_coeff: float = 25.0, cov_coeff: float = 1.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg (Bardes et al., 2022) on this rank's expander outputs z1, z2 [N, D] of two views.

    As facebookresearch/vicreg main_vicreg.py, in fp32 whatever the input dtype:

        invariance = mean((z1 - z2)^2) over this rank's N x D entries
        z1, z2     = all-gathered (with gradient) to [B, D], B = world * N, and centred over B
        std_z      = sqrt(var_B(z) + 1e-4)        per feature, unbiased variance (divisor B - 1)
        variance   = mean_d relu(1 - std_z1) / 2 + mean_d relu(1 - std_z2) / 2
        covariance = sum_{i != j} C(z1)_ij^2 / D + sum_{i != j} C(z2)_ij^2 / D,
                     C(z) = z^T z / (B - 1)       [D, D], z centred
        loss       = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance

    The invariance term covers the local batch only: the engine's mean of the ranks' gradients
    makes it the global-batch mean. The variance and covariance terms need the global batch, are
    the same on every rank, and reach the right gradient through ``dist.all_gather_with_grad``.

    Returns (loss, terms): the fp32 scalar loss, and the unweighted terms "invariance",
    "variance", "covariance" as detached fp32 scalars (the invariance term is this rank's).
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"vicreg_loss needs z1, z2 of one shape [N, D], got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    d = z1.shape[1]
    z1, z2 = dist.all_gather_with_grad(torch.cat([z1, z2], dim=1)).split(d, dim=1)  # one gather
    b = z1.shape[0]
    if b < 2:
        raise ValueError("vicreg_loss needs a global batch of at least 2 samples (a variance)")
    variance, covariance = 0.0, 0.0
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.square().sum(dim=0) / (b - 1) + 1e-4)
        variance = variance + F.relu(1 - std).mean() / 2
        cov = (z.T @ z) / (b - 1)
        covariance = covariance + off_diagonal(cov).square().sum() / d
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    terms = {"invariance": invariance.detach(), "variance": variance.detach(),
             "covariance": covariance.detach()}
    return loss, terms


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's patchify: imgs [N, C, H, W] -> [N, L, p*p*C], L = (H/p)(W/p) in row-major patch
    order, each patch flattened as (row in patch, column in patch, channel) ('nchpwq->nhwpqc')."""
    n, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a whole number of {p}x{p} patches")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def mae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool = True) -> torch.Tensor:
    """MAE's forward_loss, in fp32 whatever the input dtype: pred [N, L, p*p*3] against the
    patchified imgs [N, 3, H, W]; mask [N, L] (1 = removed).

    With norm_pix_loss each target patch is (t - mean) / sqrt(var + 1e-6), var unbiased (torch's
    default, as MAE). Per-patch MSE, averaged over the masked patches of this rank (0 when none
    are masked, where MAE's division gives NaN).
    """
    target = patchify(imgs.float(), patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred.float() - target).square().mean(dim=-1)  # [N, L]
    mask = mask.float()
    return (loss * mask).sum() / mask.sum().clamp_min(1)
