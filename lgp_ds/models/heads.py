"""MoCo v3 projector/predictor and VICReg expander heads, BatchNorm synchronised across ranks.

torch.nn.SyncBatchNorm only runs on CUDA tensors; :class:`CrossRankBatchNorm1d` sums the batch
statistics with a differentiable all-reduce that works on gloo (CPU) and NCCL alike.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from lgp_ds import dist


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of all ranks.

    Statistics are computed in fp32 whatever the input dtype, so the layer also runs when
    DeepSpeed keeps parameters in bf16 and the running buffers in fp32. Output: input dtype.
    Inside :func:`apply_to_views` the batch holds ``views`` views stacked, each normalised with
    its own statistics.
    """
    views = 1  # equal slices of the batch normalised apart (apply_to_views sets it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, C], or [views x N, C]
        xf = x.float()
        if not self.training:  # running statistics (fp32 buffers), whatever the weights' dtype
            return F.batch_norm(xf, self.running_mean, self.running_var,
                                self.weight.float() if self.affine else None,
                                self.bias.float() if self.affine else None,
                                False, 0.0, self.eps).to(x.dtype)
        xf = xf.unflatten(0, (self.views, -1))  # [V, N, C]
        # Two passes over the global batch: the mean, then the centred sum of squares. The one-pass
        # E[x^2] - E[x]^2 cancels catastrophically when a channel's mean is large against its
        # spread (5% error at mean/std 300), which is where projector features of near-identical
        # images sit. new_full, not new_tensor: a copy from the host would wait for the device.
        count_and_sum = torch.cat([xf.new_full((self.views, 1), xf.shape[1]), xf.sum(1)], 1)
        count_and_sum = dist.all_reduce_sum_with_grad(count_and_sum)  # [V, 1 + C]
        n, mean = count_and_sum[:, :1], count_and_sum[:, 1:] / count_and_sum[:, :1]
        centred = xf - mean.unsqueeze(1)
        var = dist.all_reduce_sum_with_grad(centred.square().sum(1)) / n  # [V, C], biased
        with torch.no_grad():  # as one call per view, in the views' order
            unbiased = var * n / (n - 1).clamp_min(1)
            for v in range(self.views):
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean[v].detach(), self.momentum)
                self.running_var.lerp_(unbiased[v].detach(), self.momentum)
        y = centred * torch.rsqrt(var + self.eps).unsqueeze(1)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.flatten(0, 1).to(x.dtype)


def apply_to_views(module: nn.Module, fn, views: tuple[torch.Tensor, ...],
                   one_pass: bool = True) -> tuple[torch.Tensor, ...]:
    """``fn`` (which runs ``module``) on each of ``views`` (each [N, ...]) -> its outputs, one per
    view, with BatchNorm statistics per view as MoCo v3 and VICReg take them.

    ``one_pass``: the views stacked along the batch ([views x N, ...]) go through ``fn`` once,
    and the :class:`CrossRankBatchNorm1d` layers of ``module`` normalise each view's slice with
    its own statistics, as they would in a call per view: one ZeRO-3 gather of each parameter
    instead of one per view, and half the hooks and kernel launches. ValueError for a
    ``module`` with another BatchNorm, whose statistics would mix the views, and for views of
    different shapes. Else one call per view, as the official code does.
    """
    if not one_pass or len(views) == 1:
        return tuple(fn(v) for v in views)
    shapes = [[int(d) for d in v.shape] for v in views]  # ints under jit tracing (fvcore's)
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(f"views in one pass must have one shape, got {shapes}")
    layers = []  # one walk of the modules: this runs every step
    for name, m in module.named_modules():
        if isinstance(m, CrossRankBatchNorm1d):
            layers.append(m)
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            raise ValueError(f"{len(views)} views in one pass: {name} is a {type(m).__name__}, "
                             f"which would normalise them together (build the heads with "
                             f"cross_rank_bn=True)")
    before = [m.views for m in layers]
    for m in layers:
        m.views = len(views)
    try:
        return fn(torch.cat(views)).chunk(len(views))
    finally:
        for m, v in zip(layers, before):
            m.views = v


def hidden_layers(units: int, in_dim: int, hidden_dim: int, bn: type = CrossRankBatchNorm1d,
                  bias: bool = False) -> tuple[list[nn.Module], int]:
    """(Linear -> BN -> ReLU) x ``units`` (module indices 3u, 3u+1, 3u+2: the first units of a
    projector, as its checkpoint keys number them) and the width they end at (in_dim if none)."""
    layers, d_in = [], in_dim
    for _ in range(units):
        layers += [nn.Linear(d_in, hidden_dim, bias=bias), bn(hidden_dim), nn.ReLU(inplace=True)]
        d_in = hidden_dim
    return layers, d_in


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int,
              cross_rank_bn: bool = True) -> nn.Sequential:
    """MoCo v3 MLP: (Linear(bias=False) -> BN -> ReLU) x (num_layers-1), Linear -> BN(affine=False).

    Input [N, in_dim] -> output [N, out_dim].
    """
    bn = CrossRankBatchNorm1d if cross_rank_bn else nn.BatchNorm1d
    layers, d_in = hidden_layers(num_layers - 1, in_dim, hidden_dim, bn, bias=False)
    if num_layers > 0:
        layers += [nn.Linear(d_in, out_dim, bias=False), bn(out_dim, affine=False)]
    return nn.Sequential(*layers)


def build_expander(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3,
                   cross_rank_bn: bool = True) -> nn.Sequential:
    """VICReg's projector ("expander"): (Linear -> BN -> ReLU) x (num_layers-1), Linear(bias=False).

    As facebookresearch/vicreg's Projector: hidden Linears carry a bias, the last Linear has
    none and no BN follows it (VICReg's loss acts on the raw output). BN is
    :class:`CrossRankBatchNorm1d` (global-batch statistics) or, with ``cross_rank_bn=False``,
    nn.BatchNorm1d. Input [N, in_dim] -> output [N, out_dim].
    """
    if num_layers < 1:
        raise ValueError(f"build_expander needs num_layers >= 1, got {num_layers}")
    bn = CrossRankBatchNorm1d if cross_rank_bn else nn.BatchNorm1d
    layers, d_in = hidden_layers(num_layers - 1, in_dim, hidden_dim, bn, bias=True)
    layers.append(nn.Linear(d_in, out_dim, bias=False))
    return nn.Sequential(*layers)
