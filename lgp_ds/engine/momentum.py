"""The MoCo momentum encoder: an fp32 EMA of the base encoder, identical on every rank.

It lives outside the training engine because DeepSpeed casts every parameter of its module to
bf16/fp16, where an EMA with m >= 0.99 rounds its updates away. The EMA reads the base encoder's
fp32 master weights (:mod:`lgp_ds.engine.master`) after each step that DeepSpeed applied:

- ZeRO 0-2: the momentum encoder is whole on every rank. Each rank updates the slices whose
  master it owns; one all-reduce of the (disjoint) updates brings every rank the same result.
- ZeRO 3: the momentum encoder is partitioned like the base encoder (a ZeRO-3 engine without an
  optimizer, same shapes hence the same sharding). Each rank updates its own partition from its
  own master partition: no communication, no gathering of the whole model.
"""
import contextlib
import copy

import deepspeed
import torch
import torch.nn as nn
from deepspeed.accelerator import get_accelerator

from lgp_ds import dist

from .master import MasterSlice


class MomentumEncoder:
    """forward(x [N,3,H,W]) -> keys [N, dim] without gradient; ``update`` does the EMA step."""

    def __init__(self, base_encoder: nn.Module, zero_stage: int, compute_dtype: torch.dtype,
                 prefix: str = "base_encoder."):
        module = copy.deepcopy(base_encoder).float().requires_grad_(False)
        self.prefix = prefix
        self.compute_dtype = compute_dtype
        self.zero3 = zero_stage == 3
        self.sharded_master = zero_stage in (1, 2)  # else every rank holds whole masters
        if self.zero3:
            # Persistent (unpartitioned) small parameters would keep a full copy that the
            # partition-wise EMA never updates: the threshold 0 partitions every parameter.
            config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
            engine, *_ = deepspeed.initialize(model=module, config=config)
            self.module, self._forward = engine.module, engine
        else:
            self.module = module.to(get_accelerator().current_device_name())
            self._forward = self.module
        self.params = dict(self.module.named_parameters())
        self._offsets, self._numel = {}, 0  # each parameter's place in the flat update buffer
        for name, p in self.params.items():
            self._offsets[name], self._numel = self._numel, self._numel + p.numel()
        self._delta = None  # allocated on the first sharded update

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        device = get_accelerator().device_name()
        autocast = (torch.autocast(device, dtype=self.compute_dtype)
                    if self.compute_dtype != torch.float32 else contextlib.nullcontext())
        with autocast:
            return self._forward(x)

    @torch.no_grad()
    def update(self, slices: list[MasterSlice], m: float) -> None:
        """k <- m * k + (1 - m) * q for every base-encoder slice q of this rank's master weights."""
        slices = [s for s in slices if s.name.startswith(self.prefix)]
        if self.zero3:
            for s in slices:
                k = self.params[s.name[len(self.prefix):]].ds_tensor[:s.numel]
                k.mul_(m).add_(s.weight, alpha=1 - m)
            return
        if not self.sharded_master:
            for s in slices:
                self.params[s.name[len(self.prefix):]].view(-1).mul_(m).add_(s.weight, alpha=1 - m)
            return
        if self._delta is None:
            self._delta = torch.zeros(self._numel, device=next(iter(self.params.values())).device)
        offsets, delta = self._offsets, self._delta.zero_()
        for s in slices:
            name = s.name[len(self.prefix):]
            k = self.params[name].view(-1).narrow(0, s.start, s.numel)
            start = offsets[name] + s.start
            delta[start:start + s.numel] = (s.weight - k) * (1 - m)
        dist.all_reduce_sum(delta)  # each element has exactly one owner: the sum is exact
        for name, p in self.params.items():
            p.view(-1).add_(delta[offsets[name]:offsets[name] + p.numel()])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 state on CPU (a collective under ZeRO 3: call it on every rank)."""
        if not self.zero3:
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        out = {}
        for name, p in self.params.items():
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().cpu().clone()
        for name, b in self.module.named_buffers():
            out[name] = b.detach().cpu().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`; every rank passes the same full state."""
        if not self.zero3:
            self.module.load_state_dict(state)
            return
        for name, p in self.params.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if dist.get_rank() == 0:
                    p.data.copy_(state[name])
        with torch.no_grad():
            for name, b in self.module.named_buffers():
                b.copy_(state[name])
