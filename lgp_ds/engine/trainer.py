"""The one training loop of every pre-training method, on a DeepSpeed engine.

One iteration (per micro-batch of this rank):
    views [B,3,H,W] x k, labels [B] -> method.loss(engine, views, momentum, labels)
                                                                   (forward + loss; MoCo: base
                                                                     and momentum encoders,
                                                                     keys all-gathered)
    -> engine.backward(loss)
    at the accumulation boundary: anchor gradient on the master weights -> engine.step()
    if DeepSpeed applied the step: momentum EMA from the master weights (methods that have one)

What differs between methods (model, views, loss, which shared components are on) is the
:class:`lgp_ds.methods.Method` object; this file never names a method.
"""
import contextlib
import os
import time
from functools import partial

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from torch.optim.lr_scheduler import LambdaLR

from lgp_ds import dist
from lgp_ds.checkpoint_file import tensor_digest
from lgp_ds.config import Config
from lgp_ds.data.pipeline import build_train_data, samples_per_epoch
from lgp_ds.ds_config import offloads_optimizer, precision, run_identity
from lgp_ds.models.partitioned import is_partitioned, whole_copies
from lgp_ds.scaling.memory import auto_checkpointing

from . import checkpoint, run_dir
from .anchor import MIMAnchor
from .construct import build_model, cast_partitions, gather_blocks_whole, local_values
from .faults import FaultGuard, lgp_ds_checks_gradients
from .init_weights import read_init
from .master import master_slices, step_gradients
from .momentum import MomentumEncoder
from .monitoring import Meter, Progress, check_monitor_packages, peak_memory_gib
from .param_groups import freeze_lower_stages
from .run_dir import MetricsLog
from .schedules import lr_factor, momentum_at


def build_optimizer(cfg: Config, groups: list[dict], ds_config: dict) -> torch.optim.Optimizer:
    betas = tuple(cfg.betas)
    offload = offloads_optimizer(ds_config)
    # Host masters: DeepSpeed's CPU Adam, unless the config lets a torch optimizer step them
    if offload and ds_config.get("zero_force_ds_cpu_optimizer", True):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-built C++ (about a minute once)
        return DeepSpeedCPUAdam(groups, betas=betas, adamw_mode=True)
    if cfg.optimizer == "fused_adam":
        from deepspeed.ops.adam import FusedAdam  # JIT-built CUDA kernel
        return FusedAdam(groups, betas=betas, adam_w_mode=True)
    # torch's fused AdamW kernel for masters on the GPU; the plain loop elsewhere
    cuda = get_accelerator().device_name() == "cuda"
    return torch.optim.AdamW(groups, betas=betas, fused=cuda and not offload)


class Trainer:
    """Builds ``method``'s model, the engine, momentum encoder, anchor and data for ``cfg``;
    :meth:`fit` trains.

    Everything that can be wrong with the input (data, init weights, the checkpoint to resume
    from) raises ValueError or FileNotFoundError here, on every rank alike, before training.
    ``with_data=False`` leaves out the data (for :meth:`train_step` on batches of one's own).
    """

    def __init__(self, cfg: Config, ds_config: dict, method, with_data: bool = True,
                 evaluators=()):
        if cfg.anchor_weight > 0 and cfg.init is None:
            raise ValueError(f"config key anchor_weight={cfg.anchor_weight} needs init= (the MIM "
                             f"weights to stay close to)")
        check_monitor_packages(ds_config)
        self.cfg, self.method = cfg, method
        self.device = get_accelerator().current_device_name()
        run_dir.prepare(cfg)
        self.metrics = MetricsLog(cfg.output_dir)
        zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16",
                                     "fp32": "float32"}[precision(ds_config)])
        # ZeRO-3: partitioned as it is built, no rank ever holding the whole model
        zero3 = zero_stage == 3
        if cfg.grad_ckpt == "auto":  # resolved here, so the run folder's config says how many
            cfg.grad_ckpt = auto_checkpointing(cfg, zero_stage, dist.get_world_size(),
                                               ds_config["train_micro_batch_size_per_gpu"],
                                               get_accelerator().total_memory())
            dist.print_main(f"grad_ckpt=auto: the lowest {cfg.grad_ckpt} blocks checkpointed")
        # Whole fp32 values (momentum encoder, frozen parameters) go into this rank's checkpoint
        # file where it may be the one read: DeepSpeed writes the client state from data-parallel
        # rank 0 (each node's first rank with node-local storage), and under ZeRO 3 from every
        # rank, where each file would hold a whole copy (4 GB of momentum encoder per rank for
        # ViT-g/14): resume reads those from rank 0's (MomentumEncoder.load_state_dict)
        self.saves_whole = dist.is_main() or not zero3
        model = build_model(method, cfg, ds_config if zero3 else None)
        prefix = method.encoder_prefix
        self.depth = len(method.encoder(model).blocks)
        anchor_blocks = cfg.anchor_blocks if cfg.anchor_blocks is not None else self.depth // 2
        if anchor_blocks > self.depth:
            raise ValueError(f"config key anchor_blocks={anchor_blocks} exceeds the model depth "
                             f"{self.depth}")
        weights, mim_state, init_digest = None, None, None
        if cfg.init:
            weights = read_init(cfg.init, method.encoder(model).blocks[0].attn.num_heads,
                                cfg.method)
            method.load_init(model, weights)
            init_digest = tensor_digest(weights.encoder())
            mim_state = weights.encoder() if cfg.anchor_weight > 0 else None
        freeze_lower_stages(model, self.depth, cfg.num_stages, cfg.frozen_stages, prefix)
        lrs = [blr * cfg.batch_size / 256 for blr in cfg.stage_blrs]
        groups = method.param_groups(model, self.depth, lrs)
        name_of = {id(p): n for n, p in model.named_parameters()}
        # Parameter names in optimizer order: the ZeRO-0 fp32 master groups in a checkpoint are
        # flat lists in this order, with no names of their own.
        self.group_params = [[name_of[id(p)] for p in g["params"]] for g in groups]
        self.group_names = [g["name"] for g in groups]

        self.data = None
        if with_data:
            self.data = build_train_data(cfg, ds_config["train_micro_batch_size_per_gpu"],
                                         method)
            method.prepare_data()
        # Periodic evaluations besides the method's own (the kNN monitor): each has ``every``
        # (steps) and is called with this trainer; built by lgp_ds.launch.build_trainer.
        self.evaluators = list(evaluators)
        # read once: with data= it comes from the shards' index (every shard's size checked)
        epoch_samples = samples_per_epoch(cfg)
        self.steps_per_epoch = epoch_samples // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"samples_per_epoch={epoch_samples} is smaller than "
                             f"batch_size={cfg.batch_size}")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        warmup_steps = cfg.warmup_epochs * self.steps_per_epoch

        # The momentum encoder: the base encoder of a second model built alike (same seed, same
        # init= weights, partitioned alike under ZeRO-3), kept in fp32 where DeepSpeed casts.
        self.momentum = None
        if method.momentum_encoder:
            with torch.random.fork_rng(devices=[]):  # the run draws what it would without it
                twin = build_model(method, cfg, ds_config if zero3 else None)
            if weights is not None:
                method.load_init(twin, weights)
            self.momentum = MomentumEncoder(twin.base_encoder, ds_config, self.dtype)
            del twin
        del weights
        # DeepSpeed builds the fp32 masters from the rounded bf16/fp16 module: they are restored
        # below from these exact values of this rank's part (in fp32 the masters are the weights).
        exact = {} if self.dtype == torch.float32 else {
            name_of[id(p)]: local_values(p) for g in groups for p in g["params"]}
        # Frozen parameters have no fp32 master, and DeepSpeed saves them in the model dtype
        # (ZeRO >= 2) or not at all (ZeRO 0/1): checkpoints keep their exact values, but for
        # those the fp32 momentum encoder already holds.
        held = tuple(f"base_encoder.{n}" for n, _ in model.base_encoder.named_parameters()
                     ) if self.momentum is not None else ()
        self.frozen = whole_copies({n: p for n, p in model.named_parameters()
                                    if not p.requires_grad and n not in held},
                                   keep=self.saves_whole)
        cast_partitions(model, self.dtype)

        # a pass per view (a two-view model's one_pass off) runs each block twice per backward
        if zero3 and not method.reuses_blocks and getattr(model, "one_pass", True):
            gather_blocks_whole(model)
        schedule = partial(lr_factor, total_steps=self.total_steps, warmup_steps=warmup_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(cfg, groups, ds_config), config=ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, schedule))
        if isinstance(self.engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
            # ZeRO 0 in fp16/bf16: DeepSpeed stepped the torch optimizer once on zero gradients
            # to create its state; kept, the first real step would be Adam's second (its bias
            # correction making that update 0.74x a single process's)
            self.engine.optimizer.optimizer.state.clear()
        self.metrics.monitor = self.engine.monitor  # the DeepSpeed config's monitors get each record
        # This rank's fp32 master slices: live views into DeepSpeed's buffers, found once (and
        # again after a checkpoint load) rather than on every step.
        self.slices = self._find_slices()
        if self.momentum is not None:  # ZeRO 1/2: its layout follows the optimizer's groups
            self.momentum.bind(self.engine.optimizer, self.engine.module.named_parameters())
        # Without this the base encoder would start off the MIM weights (and off the momentum
        # encoder) by the rounding of bf16/fp16.
        with torch.no_grad():
            for s in self.slices if exact else ():
                s.weight.copy_(exact[s.name] if is_partitioned(s.param) else
                               exact[s.name][s.start:s.start + s.numel])
        del exact

        self.anchor = None
        if cfg.anchor_weight > 0:
            self.anchor = MIMAnchor(mim_state, self.slices, cfg.anchor_weight, cfg.anchor_norm,
                                    anchor_blocks, sharded=zero_stage > 0, prefix=prefix)
        # What a resume must match; the init= weights by content (the file may move)
        self.run = run_identity(cfg, ds_config, init_digest, epoch_samples)
        del mim_state

        self.step = 0  # optimizer steps applied or skipped (engine.global_steps)
        self.stopped = False  # fit() ended early on a stop request (SIGTERM), with a checkpoint
        self.step_logged = True  # False: resumed at a step whose record was never logged
        self.fit_began = (time.perf_counter(), 0)  # (time, step) where fit() began
        self.epoch, self.batch_in_epoch = 0, 0
        # Corrupt samples: the global count before this process started (from the checkpoint)
        # and this rank's own count since; ranks are summed only when logging or saving.
        self.corrupt_before, self.corrupt_local = 0, 0
        self.ckpt_dir = os.path.join(cfg.output_dir, run_dir.CHECKPOINTS)
        # A stop request may take a step and a checkpoint write, each bounded by the timeout.
        self.faults = FaultGuard(cfg.max_nonfinite_steps, 2 * cfg.collective_timeout_s,
                                 self.device)
        # ZeRO 1/2 configs that turn DeepSpeed's per-tensor gradient checks off (the shipped bf16
        # ones), and fp32 ZeRO 0: lgp_ds finds non-finite gradients itself, in one pass
        self.checks_gradients = lgp_ds_checks_gradients(self.engine.optimizer)
        if cfg.resume is not None:
            self._resume(zero_stage)
        run_dir.write_configs(cfg, ds_config)

    def _find_slices(self):
        return master_slices(self.engine.optimizer, self.engine.module.named_parameters())

    def applied_steps(self) -> int:
        return self.engine.global_steps - self.engine.skipped_steps

    def corrupt_samples(self) -> int:
        """Collective: corrupt samples skipped so far by all ranks, over the whole run."""
        local = torch.tensor([self.corrupt_local], device=self.device)
        return self.corrupt_before + int(dist.all_reduce_sum(local).item())

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> str:
        # Every rank's data position: DeepSpeed writes the client state of rank 0 only.
        position = self.data.state_dict() if self.data is not None else None
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "data": dist.all_gather_object(position),
                 "corrupt_samples": self.corrupt_samples(), "config": self.cfg.to_dict(),
                 "group_params": self.group_params, "frozen": self.frozen,
                 "faults": self.faults.state_dict()}
        if self.momentum is not None:
            state["momentum"] = self.momentum.state_dict(params=self.saves_whole)
        return checkpoint.save(self.engine, self.ckpt_dir, self.step, state, self.run,
                               keep=self.cfg.keep_checkpoints)

    def _resume(self, zero_stage: int) -> None:
        """Collective: continue from the checkpoint that ``cfg.resume`` names (rank 0 decides)."""
        chosen = checkpoint.choose(self.cfg.resume, self.ckpt_dir, zero_stage, self.run)
        if chosen is None:
            dist.print_main(f"resume=auto: no complete checkpoint in {self.ckpt_dir}, starting fresh")
            self.metrics.truncate(0)
            return
        found, changes = chosen
        for change in changes:
            dist.print_main(f"resume: {change}")
        state = checkpoint.load(self.engine, *found)
        self.slices = self._find_slices()
        if self.momentum is not None:
            self.momentum.load_state_dict(state["momentum"])
        self.step, self.epoch = state["step"], state["epoch"]
        # Micro-batches of the epoch done, at this run's accumulation: saved at a step's end, so
        # the steps done in the epoch are whole on any accumulation.
        marker = checkpoint.read_marker(*found)
        saved_gas = marker["run"].get("deepspeed.gradient_accumulation_steps", 1)
        self.batch_in_epoch = (state["batch_in_epoch"] // saved_gas
                               * self.engine.gradient_accumulation_steps())
        self.corrupt_before = state["corrupt_samples"]
        self.faults.load_state_dict(state.get("faults"))
        if self.data is not None:  # checkpoints written before positions were recorded lack them
            positions = state.get("data") or [None] * marker["world_size"]
            if marker["world_size"] == dist.get_world_size():
                self.data.resume(positions[dist.get_rank()], self.epoch, self.batch_in_epoch)
            else:  # each rank's shards are dealt from (seed, epoch, rank, world size)
                self.data.resume(None, self.epoch, self.batch_in_epoch, lost=(
                    f"it was written by {marker['world_size']} ranks, whose shares of the "
                    f"epoch's shards differ from those of {dist.get_world_size()}"))
        self.metrics.truncate(self.step)
        self.step_logged = self.metrics.has(self.step)
        dist.print_main(f"resumed from {os.path.join(*found)} at step {self.step}, "
                        f"epoch {self.epoch}, batch {self.batch_in_epoch}")

    # -- training ------------------------------------------------------------------------------
    def train_step(self, *views: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """One micro-batch of views [B,3,H,W] as the method's transform() makes them (and the
        samples' labels [B], which fine-tuning reads): the method's device part of the views
        (``augment_on: device``), forward, backward, and at the accumulation boundary step + EMA.
        The views stay fp32 (an MAE target is computed from them); the models cast their inputs
        to the engine's dtype."""
        views = tuple(v.to(self.device, non_blocking=True) for v in views)
        if labels is not None:
            self.method.check_labels(labels)
            labels = labels.to(self.device, non_blocking=True)
        with self._forward_rng():  # the device augmentation draws from it too
            views = self.method.device_views(views)
            loss, terms = self.method.loss(self.engine, views, self.momentum, labels)
        boundary = self.engine.is_gradient_accumulation_boundary()  # backward leaves it as is
        self.faults.watch(loss, boundary)
        self.engine.backward(loss)
        anchor = 0.0
        bad, stop = self.faults.flags() if boundary else (False, False)
        if boundary and self.anchor is not None:
            anchor = self.anchor.add_gradient(self.slices,
                                              getattr(self.engine.optimizer, "loss_scale", 1.0))
        bad_gradients = boundary and self.checks_gradients and self.faults.nonfinite_gradients(
            step_gradients(self.engine.optimizer))
        with self.faults.skip_if(bad or bad_gradients, self.engine):
            self.engine.step()
        if boundary:  # fp16 loss-scale overflows are DeepSpeed's own, not counted as non-finite
            skipped = not self.engine.was_step_applied() and self.dtype != torch.float16
            self.faults.count(bad, bad_gradients or skipped, self.engine.global_steps)
        m = None
        if boundary and self.momentum is not None:
            m = momentum_at(self.applied_steps(), self.total_steps, self.cfg.momentum)
            if self.engine.was_step_applied():
                self.momentum.update(self.slices, m)
        return {"loss": loss.detach(), "terms": terms, "anchor": anchor, "momentum": m,
                "boundary": boundary, "stop": stop}

    @contextlib.contextmanager
    def _forward_rng(self):
        """The global RNG, for the forward pass only, seeded from (seed, micro-batch, rank).

        What the models draw (MAE's mask noise, drop path) then differs between ranks and is a
        pure function of the position in the run, so a resumed run draws what an uninterrupted
        one would; the RNG outside (image transforms without DataLoader workers) is left as it
        was. Activation checkpointing replays the forward's RNG state in the backward pass.
        """
        gas = self.engine.gradient_accumulation_steps()
        micro_batch = self.engine.global_steps * gas + self.engine.micro_steps % gas
        seed = ((self.cfg.seed * 1_000_003 + micro_batch) * 10_007 + dist.get_rank()) % 2 ** 63
        cuda = get_accelerator().device_name() == "cuda"
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            torch.manual_seed(seed)
            yield

    def fit(self) -> list[dict]:
        """Train until ``epochs`` or ``max_steps``, or until SIGTERM (then with a checkpoint of
        the step every rank stops at); return the logged records."""
        self.faults.install()
        try:
            return self._fit()
        finally:
            self.faults.uninstall()

    def _fit(self) -> list[dict]:
        cfg = self.cfg
        last_step = min(self.total_steps, cfg.max_steps or self.total_steps)
        gas = self.engine.gradient_accumulation_steps()
        records, meter = [], Meter()
        if not self.step_logged:
            # The checkpoint of this step was saved, but the run ended before the step's record:
            # its evaluations (the last step's: the run's results) may not have finished.
            evaluations = self.evaluate(last_step)
            if evaluations:
                records.append(self.log_evaluations(evaluations))
            self.step_logged = True
        self.fit_began = (time.perf_counter(), self.step)
        self.progress = Progress(self.step, last_step)
        stopped = False
        while self.step < last_step and not stopped:
            epoch = self.epoch
            batches = self.data.batches(epoch, self.steps_per_epoch * gas, skip=self.batch_in_epoch)
            for *views, labels, skipped in batches:
                out = self.train_step(*views, labels=labels)
                self.batch_in_epoch += 1
                self.corrupt_local += int(skipped.sum())
                meter.add(out, views[0].shape[0])
                if not out["boundary"]:
                    continue
                self.step = self.engine.global_steps
                self.progress.update(self.step)
                if self.batch_in_epoch == self.steps_per_epoch * gas:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                # Saved before evaluating: an evaluation that fails loses no training.
                stopped = out["stop"]
                # Not from inside a run of non-finite steps: resume=auto would take the newest
                # checkpoint, that of a run that is diverging.
                if (self.step % cfg.save_every == 0 or self.step == last_step
                        or stopped) and self.faults.nonfinite_in_a_row == 0:
                    self.save()
                evaluations = self.evaluate(last_step, meter)
                if self.step % cfg.log_every == 0 or self.step == last_step or evaluations:
                    records.append(self.log(meter.pop(), out, evaluations))
                if self.step >= last_step or stopped:
                    break
            # would spin on an empty epoch
            if self.step < last_step and self.epoch == epoch and not stopped:
                raise RuntimeError(f"epoch {epoch} ended at micro-batch {self.batch_in_epoch} of "
                                   f"{self.steps_per_epoch * gas} without reaching its last step")
        self.progress.close()
        self.stopped = stopped
        if stopped:
            saved = ("checkpoint saved" if self.faults.nonfinite_in_a_row == 0 else
                     "no checkpoint of this step (its loss was not finite)")
            dist.print_main(f"stopped at step {self.step} on request (SIGTERM), {saved} in "
                            f"{self.ckpt_dir}: continue with resume=auto")
        return records

    def evaluate(self, last_step: int, meter=None) -> dict:
        """Collective: the evaluations due at this step, as {metric: number}: the method's own
        (fine-tuning's ``val_top1``) every ``eval_every`` steps and each evaluator's (the kNN
        monitor's ``knn``) every ``evaluator.every`` steps, all at the last step. Their time is
        kept out of ``meter``'s throughput window."""
        def due(every: int) -> bool:
            return self.step == last_step or bool(every and self.step % every == 0)

        began = time.perf_counter()
        results = self.method.evaluate(self) if due(self.cfg.eval_every) else {}
        for evaluator in self.evaluators:
            if due(evaluator.every):
                results.update(evaluator(self))
        if meter is not None:  # the window goes on after the evaluation, as if it took no time
            meter.start += time.perf_counter() - began
        return results

    def _time_left(self, last_step: int) -> str:
        """`` eta h:mm:ss`` to ``last_step`` at this process's pace so far in :meth:`fit`."""
        began, first = self.fit_began
        if self.step <= first:
            return ""
        left = int((last_step - self.step) * (time.perf_counter() - began) / (self.step - first))
        return f" eta {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"

    def log_evaluations(self, evaluations: dict) -> dict:
        """The record of this step's ``evaluations`` alone (the training metrics of the step are
        lost with the process that trained it), logged by rank 0."""
        record = {"step": self.step, "epoch": self.epoch, **evaluations}
        self.metrics.append(record, self.engine.global_samples, evaluated=evaluations)
        dist.print_main(f"step {self.step} (evaluated after resuming) " + " ".join(
            f"{k} {v:.4g}" for k, v in evaluations.items()))
        return record

    def log(self, window: dict, out: dict, evaluations: dict | None = None) -> dict:
        """Collective: the metrics record of this step (means over ranks) with the
        ``evaluations`` that ran at it, logged by rank 0."""
        names = list(window["means"])  # "loss" and the method's terms, the same on every rank
        means = torch.stack([window["means"][n].float() for n in names])
        means = dist.all_reduce_sum(means) / dist.get_world_size()
        record = {"step": self.step, "epoch": self.epoch,
                  **{n: v.item() for n, v in zip(names, means)},
                  "lr": {n: g["lr"] for n, g in zip(self.group_names,
                                                   self.engine.optimizer.param_groups)}}
        if self.momentum is not None:
            record["momentum"] = out["momentum"]
        record.update(anchor=float(out["anchor"]), skipped_steps=self.engine.skipped_steps,
                      nonfinite_steps=self.faults.nonfinite_steps,
                      img_per_s=window["images"] * dist.get_world_size() / window["seconds"],
                      corrupt_samples=self.corrupt_samples())
        if self.dtype == torch.float16:
            record["loss_scale"] = float(self.engine.optimizer.loss_scale)
        record["peak_mem_gib"] = peak_memory_gib(self.device)
        record.update(evaluations or {})
        self.metrics.append(record, self.engine.global_samples, evaluated=evaluations or {})
        if dist.is_main():
            top = self.group_names[-1].removesuffix("_no_wd")
            terms = "".join(f" {n} {record[n]:.4f}" for n in names[1:])
            m = f" m {record['momentum']:.5f}" if "momentum" in record else ""
            anchor = f" anchor {record['anchor']:.4g}" if self.anchor is not None else ""
            last_step = min(self.total_steps, self.cfg.max_steps or self.total_steps)
            eta = self._time_left(last_step)
            self.progress.line(
                f"step {self.step}/{last_step} "
                f"epoch {self.epoch} loss {record['loss']:.4f}{terms}{anchor} "
                f"lr[{top}] {record['lr'][self.group_names[-1]]:.3g}{m} "
                f"{record['img_per_s']:.1f} img/s skipped {record['skipped_steps']} "
                f"mem {record['peak_mem_gib']:.2f} GiB"
                + "".join(f" {k} {v:.4g}" for k, v in (evaluations or {}).items()) + eta)
        return record
