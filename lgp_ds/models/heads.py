"""MoCo v3 projector and predictor heads with BatchNorm synchronised across ranks.

torch.nn.SyncBatchNorm only runs on CUDA tensors; :class:`CrossRankBatchNorm1d` sums the batch
statistics with a differentiable all-reduce that works on gloo (CPU) and NCCL alike.
"""
import torch
import torch.nn as nn

from lgp_ds import dist


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of all ranks.

    Statistics are computed in fp32 whatever the input dtype, so the layer also runs when
    DeepSpeed keeps parameters in bf16 and the running buffers in fp32. Output: input dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, C]
        if not self.training:
            return super().forward(x)
        xf = x.float()
        # Two passes over the global batch: the mean, then the centred sum of squares. The one-pass
        # E[x^2] - E[x]^2 cancels catastrophically when a channel's mean is large against its
        # spread (5% error at mean/std 300), which is where projector features of near-identical
        # images sit.
        count_and_sum = torch.cat([xf.new_tensor([xf.shape[0]]), xf.sum(0)])  # [1 + C]
        count_and_sum = dist.all_reduce_sum_with_grad(count_and_sum)
        n, mean = count_and_sum[0], count_and_sum[1:] / count_and_sum[0]
        centred = xf - mean
        var = dist.all_reduce_sum_with_grad(centred.square().sum(0)) / n  # biased, as BN normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var * n / (n - 1).clamp_min(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(unbiased.detach(), self.momentum)
        y = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int,
              cross_rank_bn: bool = True) -> nn.Sequential:
    """MoCo v3 MLP: (Linear(bias=False) -> BN -> ReLU) x (num_layers-1), Linear -> BN(affine=False).

    Input [N, in_dim] -> output [N, out_dim].
    """
    bn = CrossRankBatchNorm1d if cross_rank_bn else nn.BatchNorm1d
    layers = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [bn(d_out), nn.ReLU(inplace=True)]
        else:
            layers.append(bn(d_out, affine=False))
    return nn.Sequential(*layers)
