"""A model partitioned across the ranks that only ever runs forward: the momentum encoder under
ZeRO 3, gathered a transformer block at a time, the next block's gather in flight.

DeepSpeed's ZeRO-3 engine gathers from hooks on the modules, and its fetch coordinator (which
traces the order of the modules, walks their parameters and checks a prefetch budget at every
gather) costs host time where the device waits: on the CPU a depth-24 ViT's momentum forward
took 63 ms under it against 14 ms whole. A forward without backward needs none of that, since
the order is the blocks' order. Here each rank keeps, for each unit (a transformer block's
weights; and the rest: the weights outside the blocks, of patch embedding and projector, and
every small tensor), its partition of every parameter in fp32, back to back in one flat tensor
per dtype the unit is gathered in. A forward gathers the rest, then each block with one
all-gather, started while the block before it computes, and frees it when the block is done.

The partitions are DeepSpeed's: each rank holds the same contiguous part of every flattened
parameter as its ZeRO-3 partition of the base encoder's (padded alike), so the EMA of a
partition needs only this rank's master partition, and no communication. The weights of Linear
and Conv2d layers (nearly all the bytes) are gathered in the compute dtype, which autocast
would cast them to anyway: the forward computes bit for bit what it computes from fp32 weights,
with half the traffic. The rest stays fp32: norms, tokens, and biases, which DeepSpeed's
memory-efficient linear adds in fp32 for 3-D inputs.
"""
import contextlib

import deepspeed.comm as ds_comm
import torch
import torch.nn as nn
from deepspeed.accelerator import get_accelerator

from lgp_ds import dist


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``module``, in order: the children of its ``blocks`` stacks
    (timm's ViTs, whatever their block class)."""
    return [block for name, stack in module.named_modules() if name.rpartition(".")[2] == "blocks"
            for block in stack.children()]


def autocast_weights(module: nn.Module) -> set[int]:
    """ids of the parameters of ``module`` that autocast casts to its dtype wherever they are
    used: the weights of Linear and Conv2d layers (nearly all the bytes of a ViT). Kept in that
    dtype, they compute bit for bit what their fp32 values compute under autocast."""
    return {id(m.weight) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def gather_units(module: nn.Module, compute_dtype: torch.dtype
                 ) -> list[dict[torch.dtype, list[tuple[str, nn.Parameter]]]]:
    """What a forward of ``module`` gathers, in order, each unit's (name, parameter) by the dtype
    they are gathered in: first, for the whole forward, the weights outside its transformer
    blocks and every small tensor (norms, biases, tokens: fp32, a few MB, in one call rather
    than a latency-bound call per block); then each block's weights. Weights: those of Linear
    and Conv2d layers, in ``compute_dtype``."""
    blocks = transformer_blocks(module)
    cast = autocast_weights(module)
    in_blocks = {id(p) for b in blocks for p in b.parameters() if id(p) in cast}
    name_of = {id(p): name for name, p in module.named_parameters()}
    units = []
    for params in ([p for p in module.parameters() if id(p) not in in_blocks],
                   *([p for p in b.parameters() if id(p) in cast] for b in blocks)):
        by_dtype = {}
        for p in params:
            dtype = compute_dtype if id(p) in cast else torch.float32
            by_dtype.setdefault(dtype, []).append((name_of[id(p)], p))
        units.append(by_dtype)
    return units


class _Group:
    """The parameters of one unit gathered in one dtype: this rank's fp32 partition of each, back
    to back in ``flat`` [sum of partition sizes], each padded as DeepSpeed pads it (every rank's
    partition of a parameter is equally long)."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], dtype: torch.dtype,
                 store: torch.device):
        self.dtype = dtype
        self.names = [name for name, _ in params]
        self.shapes = [p.ds_shape for _, p in params]
        self.sizes = [p.ds_tensor.numel() for _, p in params]
        self.flat = torch.empty(sum(self.sizes), device=store)
        if store.type == "cpu":  # (offload_param) pinned, for asynchronous copies to the device
            self.flat = get_accelerator().pin_memory(self.flat)
        self.parts = list(self.flat.split(self.sizes))
        for part, (_, p) in zip(self.parts, params):
            part.copy_(p.ds_tensor.reshape(-1))

    def start(self, device: torch.device, dtype: torch.dtype | None = None):
        """Start gathering the whole parameters in ``dtype`` (default: the group's); pass the
        result to :meth:`wholes`."""
        send = self.flat.to(device, non_blocking=True).to(dtype or self.dtype)
        world = dist.get_world_size()
        if world == 1:
            return send, None, send
        recv = torch.empty(world * send.numel(), dtype=send.dtype, device=device)
        return recv, ds_comm.all_gather_into_tensor(recv, send, async_op=True), send

    def wholes(self, started) -> list[torch.Tensor]:
        """The whole parameters [their shapes], once the gather ``started`` has arrived."""
        recv, work, _ = started  # the input is held until the gather is done
        if work is not None:
            work.wait()
        world, offset, out = dist.get_world_size(), 0, []
        rows = recv.view(world, -1)  # rank-major: a parameter's parts lie a row apart
        for size, shape in zip(self.sizes, self.shapes):
            whole = (recv.narrow(0, offset, shape.numel()) if world == 1 else  # a view
                     rows[:, offset:offset + size].reshape(-1)[:shape.numel()])  # a copy
            out.append(whole.view(shape))
            offset += size
        return out


class PartitionedForward:
    """Holds ``module``'s parameters (partitioned by ``deepspeed.zero.Init``) as this rank's fp32
    partitions, which :attr:`parts` exposes by name (live views, for the EMA), and gathers them
    while ``module`` runs inside :meth:`gathered`; outside, its parameters are empty
    placeholders. ``compute_dtype``: the autocast dtype the forward runs under; ``on_host``:
    keep the partitions in host memory (ZeRO 3's ``offload_param``), copied to the device per
    gather."""

    def __init__(self, module: nn.Module, compute_dtype: torch.dtype, on_host: bool = False):
        self.device = torch.device(get_accelerator().current_device_name())
        self._empty = torch.empty(0, device=self.device)  # what the parameters hold between uses
        store = torch.device("cpu") if on_host else self.device
        blocks = transformer_blocks(module)
        self.outside, *self.blocks = [[_Group(named, dtype, store) for dtype, named in u.items()]
                                      for u in gather_units(module, compute_dtype)]
        self.parts = {name: part for u in self._units() for g in u
                      for name, part in zip(g.names, g.parts)}
        # DeepSpeed's partitioned parameters give way to plain empty ones: no ZeRO-3 hook or
        # bookkeeping applies to this module, whose gathers are all here
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = nn.Parameter(self._empty, requires_grad=False)
        self.params = dict(module.named_parameters())
        self._started = {}  # block index -> its gather in flight
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda _m, _x, i=i: self._enter_block(i))
            block.register_forward_hook(lambda _m, _x, _y, i=i: self._bind(self.blocks[i], None))

    @contextlib.contextmanager
    def gathered(self):
        """Inside: the parameters outside the blocks' weights whole, each block's weights while
        it runs."""
        self._bind(self.outside, [g.start(self.device) for g in self.outside])
        if self.blocks:
            self._started = {0: [g.start(self.device) for g in self.blocks[0]]}
        try:
            yield
        finally:
            self._started = {}
            for u in self._units():
                self._bind(u, None)

    def state(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """{name: whole fp32 parameter} on the host, in the module's order. Collective: every
        rank calls it; ``keep`` False takes part in the gathers only and returns {}."""
        out = {}
        for g in (g for u in self._units() for g in u):
            wholes = g.wholes(g.start(self.device, torch.float32))
            if keep:
                out.update({n: w.to("cpu", copy=True) for n, w in zip(g.names, wholes)})
        return {name: out[name] for name in self.params if name in out}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor] | None) -> None:
        """Set the partitions from rank 0's ``state`` {name: whole parameter} (the other ranks'
        is not read). Collective: every rank calls it."""
        rank, world = dist.get_rank(), dist.get_world_size()
        for g in (g for u in self._units() for g in u):
            numels = [shape.numel() for shape in g.shapes]
            whole = torch.empty(sum(numels), device=self.device)
            if rank == 0:
                whole.copy_(torch.cat([state[n].reshape(-1).float() for n in g.names]))
            if world > 1:
                ds_comm.broadcast(whole, 0)
            for part, values in zip(g.parts, whole.split(numels)):
                mine = values[rank * part.numel():(rank + 1) * part.numel()]
                part.zero_()
                part[:mine.numel()].copy_(mine)

    def _units(self) -> list[list[_Group]]:
        return [self.outside, *self.blocks]

    def _enter_block(self, i: int) -> None:
        started = self._started.pop(i, None) or [g.start(self.device) for g in self.blocks[i]]
        if i + 1 < len(self.blocks) and i + 1 not in self._started:  # in flight while i runs
            self._started[i + 1] = [g.start(self.device) for g in self.blocks[i + 1]]
        self._bind(self.blocks[i], started)

    def _bind(self, unit: list[_Group], started) -> None:
        """Point the unit's parameters at their gathered wholes (``started``), or (None) at
        empty placeholders again, which frees the wholes."""
        for j, g in enumerate(unit):
            wholes = g.wholes(started[j]) if started is not None else [None] * len(g.names)
            for name, whole in zip(g.names, wholes):
                self.params[name].data = whole if whole is not None else self._empty
