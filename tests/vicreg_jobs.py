"""Rank functions of the VICReg tests (loss, gathered gradient, expander), for ``run_ranks``.

Each rank takes its rows of a global batch, runs lgp_ds as a user would, and returns plain
tensors; parameter gradients are all-reduced over ranks as DeepSpeed does (summed, and divided
by the world size where the engine averages). The tests hold the single-process references.
One job per test file: a 2-rank start costs most of a test's time.
"""
import torch
import torch.distributed as tdist

from lgp_ds import dist
from lgp_ds.models.heads import build_expander
from lgp_ds.objectives import vicreg_loss


def local(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch [B, ...] -> [B / world, ...]."""
    n = x.shape[0] // dist.get_world_size()
    return x[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def vicreg_job(z1, z2, x1, x2, w, gather_x, gather_grad):
    """VICReg on this rank's rows of z1, z2 [B, D]; the W gradient of VICReg(x1 @ W, x2 @ W) on
    this rank's rows, averaged over ranks; all_gather_with_grad of ``gather_x[rank]`` with
    ``gather_grad[rank]`` as the gradient of its output."""
    loss, terms = vicreg_loss(local(z1), local(z2))

    weight = w.clone().requires_grad_(True)
    grad_loss, _ = vicreg_loss(local(x1) @ weight, local(x2) @ weight)
    grad_loss.backward()
    grad = weight.grad.clone()
    tdist.all_reduce(grad)  # DeepSpeed's gradient averaging
    grad /= dist.get_world_size()

    x = gather_x[dist.get_rank()].clone().requires_grad_(True)
    y = dist.all_gather_with_grad(x)
    y.backward(gather_grad[dist.get_rank()])
    return {"loss": loss.item(), "loss_dtype": loss.dtype, "terms": terms, "w_grad": grad,
            "gathered": y.detach(), "gather_grad": x.grad}


def expander_job(x, grad_out, dims, state_dict):
    """The cross-rank-BN expander with ``state_dict`` on this rank's rows of x [B, in_dim]:
    output and parameter gradients of sum(output * grad_out), summed over ranks."""
    expander = build_expander(*dims, cross_rank_bn=True)
    expander.load_state_dict(state_dict)
    y = expander(local(x))
    y.backward(local(grad_out))
    grads = {n: p.grad.clone() for n, p in expander.named_parameters()}
    for g in grads.values():
        tdist.all_reduce(g)
    return {"y": y.detach(), "grads": grads}
