"""Where DeepSpeed keeps each parameter's fp32 master weights and gradient on this rank.

The momentum EMA and the distance-to-MIM anchor work on the fp32 master weights, not on the
bf16/fp16 copies the model computes with. DeepSpeed holds them differently per set-up:

- ZeRO 3: each rank owns one contiguous partition of every flattened parameter.
- ZeRO 1/2 (and bf16 with ZeRO 0 through the BF16 optimizer): each rank owns a fragment of the
  flattened parameter, found through ``param._hp_mapping``; some ranks own none of a tensor.
- ZeRO 0 with a plain optimizer: the parameter is its own master, whole on every rank.
- ZeRO 0 with mixed precision: fp32 copies, whole on every rank; one tensor per parameter
  (FP16_UnfusedOptimizer, torch AdamW) or one flat tensor per group (FP16_Optimizer, FusedAdam).

:func:`master_slices` hides those four behind one record per (parameter, rank).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad

from lgp_ds import dist


@dataclass
class MasterSlice:
    """This rank's slice ``[start, start + numel)`` of a flattened parameter's fp32 master."""
    name: str
    param: nn.Parameter
    start: int
    numel: int
    weight: torch.Tensor  # fp32 [numel], a live view of the master weights

    @torch.no_grad()
    def copy_from(self, full: torch.Tensor) -> None:
        """Set this slice of the master weights from the whole parameter ``full`` (any shape)."""
        self.weight.copy_(full.reshape(-1)[self.start:self.start + self.numel])

    def add_to_grad(self, g: torch.Tensor) -> None:
        """Add ``g`` [numel] to this slice's gradient; valid between backward and step."""
        if hasattr(self.param, "ds_id"):  # ZeRO 3: the API copies in and out of the partition
            full = safe_get_local_grad(self.param)
            full[:self.numel] += g.to(full.dtype)
            safe_set_local_grad(self.param, full)
            return
        mapping = getattr(self.param, "_hp_mapping", None)
        if mapping is not None:
            grad = mapping.get_lp_grad_fragment(self.param._index_in_param_group).view(-1)
            if grad.numel() == self.param.numel() != self.numel:  # a full accumulation buffer
                grad = grad.narrow(0, self.start, self.numel)
        else:
            if self.param.grad is None:
                self.param.grad = torch.zeros_like(self.param)
            grad = self.param.grad.view(-1)
        grad += g.to(grad.dtype)


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
        if hasattr(p, "ds_id"):
            part = p.ds_tensor.numel()
            start = dist.get_rank() * part
            numel = max(0, min(part, p.ds_numel - start))
            if numel:
                out.append(MasterSlice(name, p, start, numel,
                                       safe_get_local_fp32_param(p)[:numel]))
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
