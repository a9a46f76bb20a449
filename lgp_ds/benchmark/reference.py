"""The baseline every speed claim is a ratio to: the same method's step written the way the
official MAE and MoCo v3 code writes it, run in the same process on the same device.

What makes it "official style" (MoCo v3's main_moco.py / builder.py, MAE's engine_pretrain.py):
- a plain module (no DeepSpeed engine), fp32 weights, fp16 autocast with a GradScaler;
- unfused attention (explicit softmax(q k^T) v) and no activation checkpointing;
- torch's AdamW in its default implementation (foreach on a GPU, not the fused kernel);
- the momentum encoder updated one parameter at a time (``p_m = p_m * m + p_b * (1 - m)``);
- a pass through the encoders per view (lgp_ds stacks the views in one pass).

The model, views and loss are lgp_ds's own (:meth:`Method.loss` on the plain module), with the
lower stages frozen where the Trainer freezes them (``frozen_stages``), so the baseline differs
from lgp_ds's step in exactly those choices. Left out: MAE's loss scaler also computes the
gradient norm each step; leaving it out makes the baseline faster, not slower.
On a CPU, fp16 autocast is emulated and far slower than fp32: ratios measured there say nothing.
"""
import copy

import torch
import torch.nn as nn

from lgp_ds.engine.param_groups import freeze_lower_stages
from lgp_ds.methods import build_method


class _OfficialMomentum:
    """MoCo v3's momentum encoder: an fp32 copy of the base encoder, its keys computed under the
    caller's autocast, updated parameter by parameter."""

    def __init__(self, base_encoder: nn.Module):
        self.base = base_encoder
        self.module = copy.deepcopy(base_encoder).requires_grad_(False)

    @torch.no_grad()
    def __call__(self, *views: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.module(x) for x in views)  # a pass per view

    @torch.no_grad()
    def update(self, m: float) -> None:
        for p_b, p_m in zip(self.base.parameters(), self.module.parameters()):
            if p_b.requires_grad:  # frozen stages stay as they are, as in lgp_ds's step
                p_m.data = p_m.data * m + p_b.data * (1.0 - m)


class OfficialStyleStep:
    """``step(views, labels)``: one micro-batch of ``cfg``'s method on this rank's views
    [B,3,H,W] x k (as the method's ``device_views`` returns them), official style: forward and
    backward, and every ``accumulation``-th call the optimizer step and momentum update (MAE's
    ``accum_iter``: the loss divided by it), as lgp_ds's step does at its accumulation boundary.

    ``cfg`` is the benchmarked run's config; only ``fused_attn`` and ``grad_ckpt`` are changed.
    On several ranks each runs its own copy (cross-rank BatchNorm still syncs; gradients are not
    averaged): compare it with lgp_ds on one device."""

    def __init__(self, cfg, device: str, accumulation: int = 1):
        cfg = cfg.model_copy(update={"fused_attn": False, "grad_ckpt": False})
        self.method = build_method(cfg)
        torch.manual_seed(cfg.seed)
        self.model = self.method.build_model().to(device)
        if hasattr(self.model, "one_pass"):  # the two-view models: a pass per view
            self.model.one_pass = False
        depth = len(self.method.encoder(self.model).blocks)
        # as the Trainer freezes them: a grafting method's frozen stages have no backward
        freeze_lower_stages(self.model, depth, cfg.num_stages, cfg.frozen_stages,
                            self.method.encoder_prefix)
        lrs = [blr * cfg.batch_size / 256 for blr in cfg.stage_blrs]
        groups = self.method.param_groups(self.model, depth, lrs)
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.betas))
        self.momentum = (_OfficialMomentum(self.model.base_encoder)
                         if self.method.momentum_encoder else None)
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type)
        self.m = cfg.momentum
        self.accumulation, self.micro_batches = accumulation, 0

    def step(self, views: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        # from the host, as the official code moves them
        labels = labels.to(views[0].device, non_blocking=True)
        with torch.autocast(self.device_type, dtype=torch.float16):
            loss, _ = self.method.loss(self.model, views, self.momentum, labels)
        self.scaler.scale(loss / self.accumulation).backward()
        self.micro_batches += 1
        if self.micro_batches % self.accumulation == 0:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.momentum is not None:
                self.momentum.update(self.m)
        return loss.detach()
