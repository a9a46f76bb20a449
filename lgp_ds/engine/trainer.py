"""The grafting step's training loop on a DeepSpeed engine.

One iteration (per micro-batch of this rank):
    views x1, x2 [B,3,H,W] -> engine(x1, x2) -> q1, q2 [B,dim]     (base encoder + predictor)
    momentum(x1), momentum(x2) -> k1, k2 [B,dim]                   (fp32 EMA encoder, no grad)
    loss = ctr(q1, k2) + ctr(q2, k1) with keys all-gathered        -> engine.backward(loss)
    at the accumulation boundary: anchor gradient on the master weights -> engine.step()
    if DeepSpeed applied the step: momentum EMA from the master weights
"""
import json
import math
import os
import time
from functools import partial

import deepspeed
import torch
import yaml
from deepspeed.accelerator import get_accelerator
from torch.optim.lr_scheduler import LambdaLR

from lgp_ds import dist
from lgp_ds.config import Config
from lgp_ds.data.pipeline import TrainData
from lgp_ds.models.moco import build_graft_model, load_mim_weights, read_mim_state_dict
from lgp_ds.objectives import moco_loss

from . import checkpoint
from .anchor import MIMAnchor
from .master import master_slices
from .momentum import MomentumEncoder
from .param_groups import build_param_groups
from .schedules import lr_factor, momentum_at


def build_optimizer(cfg: Config, groups: list[dict]) -> torch.optim.Optimizer:
    betas = tuple(cfg.betas)
    if cfg.optimizer == "fused_adam":
        from deepspeed.ops.adam import FusedAdam  # JIT-built CUDA kernel
        return FusedAdam(groups, betas=betas, adam_w_mode=True)
    # torch's fused AdamW kernel on the GPU; the plain loop elsewhere
    return torch.optim.AdamW(groups, betas=betas, fused=get_accelerator().device_name() == "cuda")


class GraftTrainer:
    """Builds model, engine, momentum encoder, anchor and data for ``cfg``; :meth:`fit` trains."""

    def __init__(self, cfg: Config, ds_config: dict):
        self.cfg = cfg
        self.device = get_accelerator().current_device_name()
        write_run_files(cfg, ds_config)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        model = build_graft_model(cfg)
        self.depth = len(model.base_encoder.blocks)
        lrs = [blr * cfg.batch_size / 256 for blr in cfg.stage_blrs]
        groups = build_param_groups(model, self.depth, lrs, cfg.weight_decay,
                                    model.base_encoder.no_weight_decay())
        mim_state = None
        if cfg.init:
            mim_state = read_mim_state_dict(cfg.init)
            load_mim_weights(model.base_encoder, mim_state, cfg.init)

        self.data = TrainData(cfg, ds_config["train_micro_batch_size_per_gpu"])
        self.steps_per_epoch = self.data.samples_per_epoch // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"samples_per_epoch={self.data.samples_per_epoch} is smaller than "
                             f"batch_size={cfg.batch_size}")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        warmup_steps = cfg.warmup_epochs * self.steps_per_epoch

        zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}
        self.dtype = next((dt for k, dt in low.items() if ds_config.get(k, {}).get("enabled")),
                          torch.float32)
        self.momentum = MomentumEncoder(model.base_encoder, zero_stage, self.dtype)

        schedule = partial(lr_factor, total_steps=self.total_steps, warmup_steps=warmup_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(cfg, groups), config=ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, schedule))
        self.group_names = [g["name"] for g in groups]
        # This rank's fp32 master slices: live views into DeepSpeed's buffers, found once (and
        # again after a checkpoint load) rather than on every step.
        self.slices = self._find_slices()

        self.anchor = None
        if cfg.anchor_weight > 0:
            blocks = cfg.anchor_blocks if cfg.anchor_blocks is not None else self.depth // 2
            self.anchor = MIMAnchor(mim_state, self.slices, cfg.anchor_weight, cfg.anchor_norm,
                                    blocks, sharded=zero_stage > 0)
        del mim_state

        self.step = 0  # optimizer steps applied or skipped (engine.global_steps)
        self.epoch, self.batch_in_epoch = 0, 0
        self.corrupt_samples = 0
        self.ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")

    def _find_slices(self):
        return master_slices(self.engine.optimizer, self.engine.module.named_parameters())

    def applied_steps(self) -> int:
        return self.engine.global_steps - self.engine.skipped_steps

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> str:
        state = {"momentum": self.momentum.state_dict(), "step": self.step, "epoch": self.epoch,
                 "batch_in_epoch": self.batch_in_epoch, "corrupt_samples": self.corrupt_samples,
                 "config": self.cfg.to_dict()}
        return checkpoint.save(self.engine, self.ckpt_dir, self.step, state)

    def maybe_resume(self) -> None:
        if self.cfg.resume is None:
            return
        found = checkpoint.find_checkpoint(self.cfg.resume, self.ckpt_dir)
        if found is None:
            dist.print_main(f"resume=auto: no complete checkpoint in {self.ckpt_dir}, starting fresh")
            return
        state = checkpoint.load(self.engine, *found)
        self.slices = self._find_slices()
        self.momentum.load_state_dict(state["momentum"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.corrupt_samples = state["corrupt_samples"]
        dist.print_main(f"resumed from {os.path.join(*found)} at step {self.step}, "
                        f"epoch {self.epoch}, batch {self.batch_in_epoch}")

    # -- training ------------------------------------------------------------------------------
    def train_step(self, x1: torch.Tensor, x2: torch.Tensor) -> dict:
        """One micro-batch: forward, backward, and at the accumulation boundary step + EMA."""
        x1 = x1.to(self.device, self.dtype, non_blocking=True)
        x2 = x2.to(self.device, self.dtype, non_blocking=True)
        q1, q2 = self.engine(x1, x2)
        k1, k2 = self.momentum(x1), self.momentum(x2)
        loss = moco_loss(q1, q2, k1, k2, self.cfg.tau)
        self.engine.backward(loss)
        anchor = 0.0
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and self.anchor is not None:
            anchor = self.anchor.add_gradient(self.slices,
                                              getattr(self.engine.optimizer, "loss_scale", 1.0))
        self.engine.step()
        m = None
        if boundary:
            m = momentum_at(self.applied_steps(), self.total_steps, self.cfg.momentum)
            if self.engine.was_step_applied():
                self.momentum.update(self.slices, m)
        return {"loss": loss.detach(), "anchor": anchor, "momentum": m, "boundary": boundary}

    def fit(self) -> list[dict]:
        """Train until ``epochs`` or ``max_steps``; return the logged records."""
        cfg = self.cfg
        self.maybe_resume()
        last_step = min(self.total_steps, cfg.max_steps or self.total_steps)
        gas = self.engine.gradient_accumulation_steps()
        records, meter = [], _Meter()
        while self.step < last_step:
            batches = self.data.batches(self.epoch, self.steps_per_epoch * gas,
                                        skip=self.batch_in_epoch)
            for x1, x2, _, skipped in batches:
                out = self.train_step(x1, x2)
                self.batch_in_epoch += 1
                self.corrupt_samples += int(skipped.sum())
                meter.add(out, x1.shape[0])
                if not out["boundary"]:
                    continue
                self.step = self.engine.global_steps
                if self.batch_in_epoch == self.steps_per_epoch * gas:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if self.step % cfg.log_every == 0 or self.step == last_step:
                    records.append(self.log(meter.pop(), out))
                if self.step % cfg.save_every == 0 or self.step == last_step:
                    self.save()
                if self.step >= last_step:
                    break
        return records

    def log(self, window: dict, out: dict) -> dict:
        loss = dist.all_reduce_sum(window["loss"].clone()) / dist.get_world_size()
        corrupt = dist.all_reduce_sum(torch.tensor([self.corrupt_samples], device=self.device))
        record = {
            "step": self.step, "epoch": self.epoch, "loss": loss.item(),
            "lr": {n: g["lr"] for n, g in zip(self.group_names, self.engine.optimizer.param_groups)},
            "momentum": out["momentum"], "anchor": out["anchor"],
            "img_per_s": window["images"] * dist.get_world_size() / window["seconds"],
            "skipped_steps": self.engine.skipped_steps, "corrupt_samples": int(corrupt.item()),
        }
        if self.dtype == torch.float16:
            record["loss_scale"] = float(self.engine.optimizer.loss_scale)
        if dist.is_main():
            with open(os.path.join(self.cfg.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            top = f"stage{self.cfg.num_stages}"
            print(f"step {self.step}/{min(self.total_steps, self.cfg.max_steps or math.inf)} "
                  f"epoch {self.epoch} loss {record['loss']:.4f} anchor {record['anchor']:.4g} "
                  f"lr[{top}] {record['lr'][top]:.3g} m {record['momentum']:.5f} "
                  f"{record['img_per_s']:.1f} img/s skipped {record['skipped_steps']}", flush=True)
        return record


class _Meter:
    """Mean loss and throughput over the micro-batches since the last log line."""

    def __init__(self):
        self.start, self.loss, self.n, self.images = time.perf_counter(), 0.0, 0, 0

    def add(self, out: dict, batch: int) -> None:
        self.loss, self.n, self.images = self.loss + out["loss"], self.n + 1, self.images + batch

    def pop(self) -> dict:
        now = time.perf_counter()
        window = {"loss": self.loss / max(1, self.n), "images": self.images,
                  "seconds": max(now - self.start, 1e-9)}
        self.start, self.loss, self.n, self.images = now, 0.0, 0, 0
        return window


def write_run_files(cfg: Config, ds_config: dict) -> None:
    """Rank 0: create ``output_dir`` with the resolved ``config.yaml`` and ``ds_config.json``."""
    if dist.is_main():
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        with open(os.path.join(cfg.output_dir, "ds_config.json"), "w") as f:
            json.dump(ds_config, f, indent=2)
    dist.barrier()
