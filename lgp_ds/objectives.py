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
