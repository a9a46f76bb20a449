"""Where DeepSpeed keeps each parameter's fp32 master weights and gradient on this rank.

The momentum EMA and the distance-to-MIM anchor work on the fp32 master weights, not on the
bf16/fp16 copies the model computes with. DeepSpeed holds them differently per set-up:

- ZeRO 3: each rank owns one contiguous partition of every flattened parameter.
- ZeRO 1/2 (and bf16 with ZeRO 0 through the BF16 optimizer): each rank owns a fragment of the
  flattened parameter, found through ``param._hp_mapping``; some ranks own none of a tensor.
  With ``offload_optimizer`` (ZeRO 1-3) the fp32 masters and the fp32 gradients the CPU
  optimizer steps with are in host memory, while the model (and the momentum encoder) compute
  on the device: a slice's ``weight`` is then on the host; :func:`on_device` brings slices over
  with one copy per flat group.
- ZeRO 0 with a plain optimizer: the parameter is its own master, whole on every rank.
- ZeRO 0 with mixed precision: fp32 copies, whole on every rank; one tensor per parameter
  (FP16_UnfusedOptimizer, torch AdamW) or one flat tensor per group (FP16_Optimizer, FusedAdam).

:func:`master_slices` hides those four behind one record per (parameter, rank).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

from lgp_ds.models.partitioned import is_partitioned, local_part


@dataclass
class MasterSlice:
    """This rank's slice ``[start, start + numel)`` of a flattened parameter's fp32 master."""
    name: str
    param: nn.Parameter
    start: int
    numel: int
    weight: torch.Tensor  # fp32 [numel], a live view of the master weights

    def __post_init__(self):
        # DeepSpeed's flat masters require grad, which forbids writing a view of them in place
        self.weight = self.weight.detach()

    def gradient(self) -> torch.Tensor | None:
        """A live view of this slice's gradient [numel], valid between backward and step; None
        under ZeRO 3 on the device, where DeepSpeed hands out copies (:meth:`add_to_grad`).

        With ``offload_optimizer`` it is the fp32 gradient on the host that the CPU optimizer
        reads (ZeRO 1/2 copy it there during the reduction, ZeRO 3 as each partition is reduced):
        add to it after the device has finished those copies (:meth:`MIMAnchor.add_gradient`
        waits for them once)."""
        if is_partitioned(self.param):
            optimizer = self.param._z3_optimizer
            if optimizer.offload_optimizer:
                return _zero3_partition(optimizer, self.param, grad=True)[:self.numel]
            return None
        mapping = getattr(self.param, "_hp_mapping", None)
        if mapping is not None:
            # ZeRO 1/2: a view of the gradient partition (on the host under offload)
            grad = mapping.get_lp_grad_fragment(self.param._index_in_param_group).view(-1)
            if grad.numel() == self.param.numel() != self.numel:  # a full accumulation buffer
                grad = grad.narrow(0, self.start, self.numel)
            return grad
        if self.param.grad is None:
            self.param.grad = torch.zeros_like(self.param)
        return self.param.grad.view(-1)

    def add_to_grad(self, g: torch.Tensor) -> None:
        """Add ``g`` [numel] to this slice's gradient where :meth:`gradient` has no view of it
        (ZeRO 3 on the device): through DeepSpeed's API, whose partition is the optimizer's own,
        copied out and back in."""
        full = safe_get_local_grad(self.param)
        full[:self.numel] += g.to(full.dtype)
        safe_set_local_grad(self.param, full)


def master_slices(optimizer, named_params) -> list[MasterSlice]:
    """One :class:`MasterSlice` per trainable parameter of which this rank holds master weights.

    ``optimizer`` is the DeepSpeed engine's ``engine.optimizer``; ``named_params`` an iterable of
    (name, parameter) of the engine's module.
    """
    fp32_copy = {}  # ZeRO 0 mixed precision: low-precision param -> fp32 master copy
    hp_groups = getattr(optimizer, "fp32_groups", None) or getattr(optimizer, "fp32_groups_flat", [])
    for lp_group, hp_group in zip(getattr(optimizer, "fp16_groups", []), hp_groups):
        if not isinstance(lp_group, list):
            continue
        if torch.is_tensor(hp_group):  # one flat fp32 tensor holding the group's params in order
            hp_group = torch.split(hp_group.detach(), [lp.numel() for lp in lp_group])
        fp32_copy.update({id(lp): hp for lp, hp in zip(lp_group, hp_group)})
    out = []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if is_partitioned(p):
            start, part = local_part(p)
            numel = part.numel()
            if numel:
                out.append(MasterSlice(name, p, start, numel,
                                       _zero3_partition(optimizer, p)[:numel]))
        elif hasattr(p, "_hp_mapping"):
            if p._hp_mapping is not None:  # None: another rank owns all of this tensor
                address = p._hp_mapping.lp_fragment_address
                out.append(MasterSlice(name, p, address.start, address.numel,
                                       p._hp_mapping.get_hp_fragment().view(-1)))
        elif id(p) in fp32_copy:
            out.append(MasterSlice(name, p, 0, p.numel(), fp32_copy[id(p)].view(-1)))
        elif p.dtype == torch.float32:
            out.append(MasterSlice(name, p, 0, p.numel(), p.data.view(-1)))
        else:
            raise RuntimeError(f"no fp32 master weights found for {name} ({p.dtype})")
    return out


def step_gradients(optimizer) -> list[torch.Tensor]:
    """The gradients that ``optimizer`` (``engine.optimizer``) steps with, as this rank holds
    them between the backward pass at the accumulation boundary and the step, the MIM anchor's
    gradient added: a torch optimizer's (fp32 ZeRO 0: whole, all-reduced) or, under DeepSpeed's
    ZeRO 1/2 optimizer on the device, this rank's partitions (what its own overflow check
    reads)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [p.grad for group in optimizer.param_groups for p in group["params"]
                if p.grad is not None]
    return [g for group in optimizer.averaged_gradients.values() if group is not None
            for g in group if g is not None]


def _zero3_partition(optimizer, param, grad: bool = False) -> torch.Tensor:
    """This rank's fp32 master partition of ZeRO-3 ``param`` (or, ``grad``, the gradient the
    optimizer steps with, kept there under ``offload_optimizer`` only): a live view into the
    optimizer's flat sub-group, on the host under ``offload_optimizer``, where DeepSpeed's
    safe_get_local_fp32_param would hand back a device copy."""
    group, offset, numel = optimizer.grad_position[optimizer.get_param_id(param)]
    flat = optimizer.fp32_partitioned_groups_flat[group]
    return (flat.grad if grad else flat).narrow(0, offset, numel)


def on_device(tensors: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """``tensors`` (views, e.g. master slices' weights) on ``device``, without a copy where they
    are there already; elsewhere (offloaded masters on the host) one asynchronous copy per
    underlying storage, of the span that its views cover, rather than one per tensor.

    The host tensors must stay unchanged until the device has read them: DeepSpeed writes its
    host masters only in the next optimizer step, which first waits for the device's gradient
    copies, queued after this one."""
    device = torch.device(device)
    out, spans = list(tensors), {}
    for i, t in enumerate(tensors):
        if t.device != device:
            spans.setdefault(t.untyped_storage().data_ptr(), []).append(i)
    for found in spans.values():
        base = tensors[found[0]]
        lo = min(tensors[i].storage_offset() for i in found)
        hi = max(tensors[i].storage_offset() + tensors[i].numel() for i in found)
        # to the host, blocking: the host reads the copy next (a non-blocking one may not
        # have landed yet)
        copy = base.as_strided((hi - lo,), (1,), lo).to(device, non_blocking=device.type != "cpu")
        for i in found:
            out[i] = copy.narrow(0, tensors[i].storage_offset() - lo,
                                 tensors[i].numel()).view_as(tensors[i])
    return out
