"""The momentum encoder's weights under ZeRO 1/2: the fp32 EMA kept sharded like the fp32
masters, and the whole compute copy that every rank's forward reads.

DeepSpeed's ZeRO 1/2 optimizer (and its BF16 optimizer) holds each rank's equal share of each
flat param group as fp32 masters. The EMA of a share needs that share's masters alone, so each
rank keeps the fp32 EMA of its shares only (1/N of the encoder). After each update the ranks
rebuild the compute copy from the shares:

- the weights autocast casts anyway (Linear, Conv2d: nearly all the bytes) live in the compute
  dtype, laid out like the group: one all-gather per group in that dtype (bf16: half the
  traffic and half the memory of an fp32 copy). The forward computes bit for bit what it
  computes from fp32 weights.
- the few other tensors (norms, biases, class token, position embeddings) stay fp32, back to
  back in one buffer: each rank writes the elements of its shares into a zeroed buffer and one
  fp32 all-reduce sums them, exactly (every element comes from one rank, the others add zero).

In fp32 runs everything is in the first kind, gathered in fp32.
"""
import deepspeed.comm as ds_comm
import torch
import torch.nn as nn

from lgp_ds import dist

from .master import on_device
from .partitioned_forward import autocast_weights


class _Group:
    """The momentum parameters in one flat param group of the optimizer: ``members``, (name,
    offset in the group, parameter) of each; ``part``, the fp32 EMA of this rank's share
    [share size]; ``compute``, the whole group in the compute dtype [group size] (None where it
    holds none of the weights kept in it); ``small_at`` / ``share_at``, the positions of its
    fp32 tensors' elements of this rank's share in the fp32 buffer and in the share."""

    def __init__(self, index: int, numel: int, share: slice, members: list):
        self.index, self.numel, self.share, self.members = index, numel, share, members
        self.part = self.compute = self.small_at = self.share_at = None

    def overlap(self, offset: int, n: int) -> tuple[int, int]:
        """[lo, hi) of the group's [offset, offset + n) in this rank's share (lo >= hi: none)."""
        return max(offset, self.share.start), min(offset + n, self.share.stop)


class ShardedEMA:
    """The fp32 EMA of ``module``'s parameters sharded like ``optimizer``'s fp32 masters (a
    DeepSpeed ZeRO 1/2 or BF16 optimizer; ``named_params`` the engine module's, whose names
    start with ``prefix`` for ``module``'s). ``module``'s parameters in the optimizer's groups
    become views into the compute copy and the fp32 buffer; the others (frozen ones) keep their
    fp32 values. A group's parameters outside ``module`` (the predictor) get an EMA nobody
    reads. Building it is collective."""

    def __init__(self, module: nn.Module, optimizer, named_params, prefix: str,
                 compute_dtype: torch.dtype):
        self.optimizer = optimizer
        params = dict(module.named_parameters())
        low = (autocast_weights(module) if compute_dtype != torch.float32
               else {id(p) for p in params.values()})
        name_of = {id(p): n for n, p in named_params}
        flats = getattr(optimizer, "bit16_groups_flat", None) or optimizer.bf16_groups_flat
        groups = getattr(optimizer, "bit16_groups", None) or optimizer.bf16_groups
        world, rank = dist.get_world_size(), dist.get_rank()
        self.groups = []
        for g, (flat, group_params) in enumerate(zip(flats, groups)):
            members = [(name_of[id(p)][len(prefix):],
                        (p.data_ptr() - flat.data_ptr()) // p.element_size())
                       for p in group_params if name_of[id(p)].startswith(prefix)]
            if members:
                size = flat.numel() // world  # DeepSpeed pads a group to divide evenly
                group = _Group(g, flat.numel(), slice(rank * size, (rank + 1) * size),
                               [(name, offset, params[name]) for name, offset in members])
                group.part = torch.zeros(size, dtype=torch.float32, device=flat.device)
                if any(id(p) in low for *_, p in group.members):
                    group.compute = torch.zeros(flat.numel(), dtype=compute_dtype,
                                                device=flat.device)
                self.groups.append(group)
        self.load({name: p.detach() for name, p in params.items()})
        # The fp32 tensors back to back, and where this rank's shares hold their elements
        small = [(group, offset, p) for group in self.groups for _, offset, p in group.members
                 if id(p) not in low]
        self.small = torch.zeros(sum(p.numel() for *_, p in small),
                                 device=self.groups[0].part.device if self.groups else None)
        at, positions = 0, {id(group): ([], []) for group in self.groups}
        for group, offset, p in small:
            lo, hi = group.overlap(offset, p.numel())
            if lo < hi:
                positions[id(group)][0].append(torch.arange(at + lo - offset, at + hi - offset))
                positions[id(group)][1].append(torch.arange(lo - group.share.start,
                                                            hi - group.share.start))
            p.data = self.small.narrow(0, at, p.numel()).view_as(p)
            at += p.numel()
        for group in self.groups:
            if positions[id(group)][0]:
                group.small_at, group.share_at = (torch.cat(i).to(self.small.device)
                                                  for i in positions[id(group)])
            for _, offset, p in group.members:
                if id(p) in low:
                    p.data = group.compute.narrow(0, offset, p.numel()).view_as(p)
        self.publish()

    @torch.no_grad()
    def load(self, values: dict[str, torch.Tensor]) -> None:
        """This rank's shares from the whole fp32 ``values`` of the momentum parameters (local;
        the compute copy is :meth:`publish`'s, or the caller's, to set)."""
        for group in self.groups:
            for name, offset, p in group.members:
                lo, hi = group.overlap(offset, p.numel())
                if lo < hi:
                    group.part[lo - group.share.start:hi - group.share.start].copy_(
                        values[name].reshape(-1)[lo - offset:hi - offset])

    @torch.no_grad()
    def update(self, m: float) -> None:
        """Collective: share <- m * share + (1 - m) * master share; then :meth:`publish`."""
        parts = [group.part for group in self.groups]
        if parts:
            masters = _master_partitions(self.optimizer, [g.index for g in self.groups],
                                         parts[0].device)
            torch._foreach_mul_(parts, m)
            torch._foreach_add_(parts, masters, alpha=1 - m)
        self.publish()

    @torch.no_grad()
    def publish(self) -> None:
        """Collective: the whole compute copy and fp32 buffer from every rank's shares."""
        world = dist.get_world_size()
        for group in self.groups:
            if group.compute is not None:
                mine = group.compute[group.share]
                mine.copy_(group.part)
                if world > 1:
                    ds_comm.all_gather_into_tensor(group.compute, mine)  # in place: a view
        if self.small.numel():
            self.small.zero_()
            for group in self.groups:
                if group.small_at is not None:
                    self.small.index_copy_(0, group.small_at,
                                           group.part.index_select(0, group.share_at))
            if world > 1:
                ds_comm.all_reduce(self.small)

    @torch.no_grad()
    def whole(self) -> dict[str, torch.Tensor]:
        """Collective: {name: whole fp32 EMA on the host} of the momentum parameters in the
        optimizer's groups."""
        out = {}
        for group in self.groups:
            flat = group.part
            if dist.get_world_size() > 1:
                flat = torch.empty(group.numel, dtype=torch.float32, device=group.part.device)
                ds_comm.all_gather_into_tensor(flat, group.part)
            for name, offset, p in group.members:
                out[name] = flat.narrow(0, offset, p.numel()).view(p.shape).cpu().clone()
        return out


def _master_partitions(optimizer, groups: list[int], device) -> list[torch.Tensor]:
    """This rank's fp32 master partition [partition numel] of each flat param group in
    ``groups``, on ``device``: with offload_optimizer they are on the host, and one copy each
    brings them over (an fp32 partition per step: the EMA's PCIe traffic)."""
    found = getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO 1/2
    if found is None:
        found = optimizer.fp32_groups_flat_partition  # BF16 optimizer
    return on_device([found[g] for g in groups], device)
