"""The MoCo momentum encoder: an fp32 EMA of the base encoder, identical on every rank.

It lives outside the training engine because DeepSpeed casts every parameter of its module to
bf16/fp16, where an EMA with m >= 0.99 rounds its updates away. The EMA reads the base encoder's
fp32 master weights (:mod:`lgp_ds.engine.master`) after each step that DeepSpeed applied:

- ZeRO 0 with whole masters: the momentum encoder is whole on every rank; each rank updates it
  from its own masters, identically.
- ZeRO 1/2 (ZeRO 1 in bf16 with fp32 gradients runs DeepSpeed's BF16 optimizer): each rank
  keeps the fp32 EMA of its share of each of the optimizer's flat param groups, as it keeps the
  fp32 masters (:mod:`lgp_ds.engine.sharded_ema`, set up by :meth:`bind`), and updates it from
  its master shares (two foreach ops for the whole model); one all-gather per group in the
  compute dtype (bf16: a quarter of the traffic of all-reducing an fp32 update) and one small
  fp32 all-reduce rebuild the whole compute copy that the forward reads.
- ZeRO 3: the momentum encoder is partitioned like the base encoder (built partitioned, never
  whole; same shapes hence the same partitions). Each rank updates its own partition from its
  own master partition: no communication, no gathering of the whole model. Its forward gathers
  a transformer block at a time, the next one's gather in flight, without DeepSpeed's hooks
  (:mod:`lgp_ds.engine.partitioned_forward`); with ``offload_param`` the partitions stay on
  the host.

With ``offload_optimizer`` the masters are on the host: one copy per flat group brings this
rank's fp32 partition to the device each step (the EMA's PCIe traffic).
"""
import contextlib

import torch
import torch.nn as nn
from deepspeed.accelerator import get_accelerator

from lgp_ds import dist
from lgp_ds.models.heads import apply_to_views

from .master import MasterSlice, on_device
from .partitioned_forward import PartitionedForward
from .sharded_ema import ShardedEMA


class MomentumEncoder:
    """(x1, x2, ... [N,3,H,W]) -> keys (k1, k2, ... [N, dim]) without gradient; ``update`` does
    the EMA step.

    ``module`` (which it takes over) holds the initial weights in fp32: a copy of the base
    encoder; under ZeRO-3 built partitioned (``deepspeed.zero.Init``) as the base encoder is,
    for a run under the DeepSpeed config ``ds_config``.
    """

    def __init__(self, module: nn.Module, ds_config: dict, compute_dtype: torch.dtype,
                 prefix: str = "base_encoder."):
        module = module.float().requires_grad_(False)
        zero = ds_config.get("zero_optimization", {})
        self.prefix = prefix
        self.compute_dtype = compute_dtype
        self.sharded_master = zero.get("stage", 0) in (1, 2)  # else every rank holds whole masters
        # ZeRO 3: this rank's partitions, gathered by the forward
        self.partitioned = None
        if zero.get("stage", 0) == 3:
            on_host = zero.get("offload_param", {}).get("device", "none") == "cpu"
            self.partitioned = PartitionedForward(module, compute_dtype, on_host)
            self.module = module
        else:
            self.module = module.to(get_accelerator().current_device_name())
        self.params = dict(self.module.named_parameters())  # under ZeRO 3 empty placeholders
        self.sharded = None  # ZeRO 1/2: the EMA's shares, set by bind()

    @torch.no_grad()
    def __call__(self, *views: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """views [N,3,H,W] -> their keys [N, dim], all views in one pass (BatchNorm per view,
        :func:`lgp_ds.models.heads.apply_to_views`): under ZeRO 3 one gather of the encoder."""
        device = get_accelerator().device_name()
        autocast = (torch.autocast(device, dtype=self.compute_dtype)
                    if self.compute_dtype != torch.float32 else contextlib.nullcontext())
        gathered = (self.partitioned.gathered() if self.partitioned is not None
                    else contextlib.nullcontext())
        with autocast, gathered:
            return apply_to_views(self.module, self.module, views)

    @torch.no_grad()
    def update(self, slices: list[MasterSlice], m: float) -> None:
        """k <- m * k + (1 - m) * q for every base-encoder slice q of this rank's master weights."""
        slices = [s for s in slices if s.name.startswith(self.prefix)]
        if self.partitioned is not None:  # masters and partitions may be on different devices
            ks = [self.partitioned.parts[s.name[len(self.prefix):]][:s.numel] for s in slices]
            if ks:  # a rank may own no element of a small encoder on a large world
                qs = on_device([s.weight for s in slices], ks[0].device)
                torch._foreach_mul_(ks, m)
                torch._foreach_add_(ks, qs, alpha=1 - m)
            return
        if not self.sharded_master:
            for s in slices:
                self.params[s.name[len(self.prefix):]].view(-1).mul_(m).add_(s.weight, alpha=1 - m)
            return
        if self.sharded is None:
            raise RuntimeError("MomentumEncoder.bind(optimizer, named_params) was not called")
        self.sharded.update(m)

    def bind(self, optimizer, named_params) -> None:
        """Collective. ZeRO 1/2: shard the EMA like ``optimizer``'s fp32 masters (a DeepSpeed
        ZeRO 1/2 or BF16 optimizer; ``named_params`` the engine module's). Nothing to do for
        other stages."""
        if self.sharded_master:
            self.sharded = ShardedEMA(self.module, optimizer, named_params, self.prefix,
                                      self.compute_dtype)

    def state_dict(self, params: bool = True) -> dict[str, torch.Tensor]:
        """The whole fp32 state on the host (a collective under ZeRO 1-3: call it on every
        rank); ``params=False``: the buffers alone, the rank taking part in the gathers only (a
        checkpoint file that :meth:`load_state_dict` reads no parameters from)."""
        if self.partitioned is None:
            shared = self.sharded.whole() if self.sharded is not None else {}
            return {k: shared[k] if k in shared else v.detach().cpu().clone()
                    for k, v in self.module.state_dict().items() if params or k not in self.params}
        out = self.partitioned.state(keep=params)
        for name, b in self.module.named_buffers():
            out[name] = b.detach().cpu().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`; the buffers from each rank's ``state``, the parameters
        under ZeRO 3 from rank 0's alone (the others' may hold the buffers only)."""
        if self.partitioned is None:
            self.module.load_state_dict(state)  # the compute copy: cast where it is low
            if self.sharded is not None:
                self.sharded.load(state)
            return
        self.partitioned.load(state if dist.get_rank() == 0 else None)
        with torch.no_grad():
            for name, b in self.module.named_buffers():
                b.copy_(state[name])
