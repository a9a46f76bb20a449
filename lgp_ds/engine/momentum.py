"""The MoCo momentum encoder: an fp32 EMA of the base encoder, identical on every rank.

It lives outside the training engine because DeepSpeed casts every parameter of its module to
bf16/fp16, where an EMA with m >= 0.99 rounds its updates away. The EMA reads the base encoder's
fp32 master weights (:mod:`lgp_ds.engine.master`) after each step that DeepSpeed applied:

- ZeRO 0 with whole masters: the momentum encoder is whole on every rank; each rank updates it
  from its own masters, identically.
- ZeRO 1/2 (ZeRO 1 in bf16 with fp32 gradients runs DeepSpeed's BF16 optimizer): the momentum
  encoder is whole on every rank, its fp32 weights laid out like the optimizer's flat param
  groups (:meth:`bind`). Each rank updates its partition of each group from its fp32 master
  partition (two foreach ops for the whole model) and one fp32 all-gather per group brings
  every rank the rest: exact, and half the traffic of all-reducing an update of the encoder.
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

import deepspeed.comm as ds_comm
import torch
import torch.nn as nn
from deepspeed.accelerator import get_accelerator

from lgp_ds import dist
from lgp_ds.models.heads import apply_to_views

from .master import MasterSlice, on_device
from .partitioned_forward import PartitionedForward


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
        # ZeRO 1/2, set by bind(): (group index, flat fp32 group, this rank's part: a view of it)
        self._optimizer, self._flats = None, []

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
        if self._optimizer is None:
            raise RuntimeError("MomentumEncoder.bind(optimizer, named_params) was not called")
        parts = [part for _, _, part in self._flats]
        masters = _master_partitions(self._optimizer, [g for g, _, _ in self._flats],
                                     get_accelerator().current_device_name())
        torch._foreach_mul_(parts, m)
        torch._foreach_add_(parts, masters, alpha=1 - m)
        if dist.get_world_size() > 1:
            for _, flat, part in self._flats:
                ds_comm.all_gather_into_tensor(flat, part)  # in place: part is a view of flat

    def bind(self, optimizer, named_params) -> None:
        """ZeRO 1/2: lay the momentum weights out like ``optimizer``'s flat param groups (a
        DeepSpeed ZeRO 1/2 or BF16 optimizer; ``named_params`` the engine module's), so that each
        rank's part of a group lines up with its fp32 master partition. A group's parameters
        outside the base encoder (the predictor) get an EMA nobody reads; frozen parameters are
        in no group and keep their values. Nothing to do for other stages."""
        if not self.sharded_master:
            return
        self._optimizer = optimizer
        name_of = {id(p): n for n, p in named_params}
        lp_flats = getattr(optimizer, "bit16_groups_flat", None) or optimizer.bf16_groups_flat
        lp_groups = getattr(optimizer, "bit16_groups", None) or optimizer.bf16_groups
        self._flats = []
        for g, (lp_flat, lp_params) in enumerate(zip(lp_flats, lp_groups)):
            mine = [(p, name_of[id(p)][len(self.prefix):]) for p in lp_params
                    if name_of[id(p)].startswith(self.prefix)]
            if not mine:
                continue
            flat = torch.zeros(lp_flat.numel(), dtype=torch.float32, device=lp_flat.device)
            for p, name in mine:
                k = self.params[name]
                offset = (p.data_ptr() - lp_flat.data_ptr()) // p.element_size()
                view = flat.narrow(0, offset, p.numel())
                view.copy_(k.detach().reshape(-1))
                k.data = view.view_as(k)
            self._flats.append((g, flat, _own_partition(flat)))

    def state_dict(self, params: bool = True) -> dict[str, torch.Tensor]:
        """The whole fp32 state on the host (a collective under ZeRO 3: call it on every rank);
        ``params=False``: the buffers alone, the rank taking part in ZeRO 3's gathers only (a
        checkpoint file that :meth:`load_state_dict` reads no parameters from)."""
        if self.partitioned is None:
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()
                    if params or k not in self.params}
        out = self.partitioned.state(keep=params)
        for name, b in self.module.named_buffers():
            out[name] = b.detach().cpu().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`; the buffers from each rank's ``state``, the parameters
        under ZeRO 3 from rank 0's alone (the others' may hold the buffers only)."""
        if self.partitioned is None:
            self.module.load_state_dict(state)
            return
        self.partitioned.load(state if dist.get_rank() == 0 else None)
        with torch.no_grad():
            for name, b in self.module.named_buffers():
                b.copy_(state[name])


def _master_partitions(optimizer, groups: list[int], device) -> list[torch.Tensor]:
    """This rank's fp32 master partition [partition numel] of each flat param group in
    ``groups``, on ``device``: with offload_optimizer they are on the host, and one copy each
    brings them over (an fp32 partition per step: the EMA's PCIe traffic)."""
    found = getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO 1/2
    if found is None:
        found = optimizer.fp32_groups_flat_partition  # BF16 optimizer
    return on_device([found[g] for g in groups], device)


def _own_partition(flat: torch.Tensor) -> torch.Tensor:
    """This rank's equal share of a flat group (DeepSpeed pads the group to divide evenly)."""
    size = flat.numel() // dist.get_world_size()
    return flat.narrow(0, dist.get_rank() * size, size)
