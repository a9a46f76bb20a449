"""Functions that run on each of the real ranks started by ``multirank.run_ranks``.

They use lgp_ds as a user would and return plain tensors; the tests compare them with
single-process references computed independently in ``reference.py``.
"""
import os

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from lgp_ds import dist
from lgp_ds.config import build_config, resolve_ds_config
from lgp_ds.engine.trainer import GraftTrainer
from lgp_ds.objectives import moco_loss

TINY = dict(arch="vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=3,
            num_heads=2, proj_dim=16, mlp_dim=32, batch_size=8, epochs=3, warmup_epochs=1,
            samples_per_epoch=16, num_workers=0, shuffle_buffer=64, stage_blrs=[1e-2, 2e-2, 4e-2],
            momentum=0.9, weight_decay=0.05, log_every=1, save_every=1000)


def tiny_config(**overrides):
    return build_config({**TINY, **overrides}, source="test")


def ds_config(cfg, stage: int, bf16: bool, fp32_reduce: bool = False) -> dict:
    ds = {"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
          "steps_per_print": 10 ** 9}
    if fp32_reduce:
        ds["communication_data_type"] = "fp32"
    return resolve_ds_config(ds, cfg, dist.get_world_size())


def global_batch(seed: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch of two views [B, 3, H, W], the same on every rank and reference."""
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.batch_size, 3, cfg.img_size, cfg.img_size)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def local(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0] // dist.get_world_size()
    return x[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def full_master_weights(engine) -> dict[str, torch.Tensor]:
    """Full fp32 master weights of the trainable parameters, through DeepSpeed's own API."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if engine.zero_optimization_stage() > 0:
        return {n: safe_get_full_fp32_param(p).cpu().clone() for n, p in named}
    fp32 = getattr(engine.optimizer, "fp32_groups", None)
    if fp32 is None:  # plain optimizer: the parameters are the masters
        return {n: p.detach().cpu().clone() for n, p in named}
    master_of = {id(lp): hp for lps, hps in zip(engine.optimizer.fp16_groups, fp32)
                 for lp, hp in zip(lps, hps)}
    return {n: master_of[id(p)].detach().cpu().clone() for n, p in named}


def momentum_partition_numel(trainer) -> int:
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
               for p in trainer.momentum.params.values())


def train_job(configs, batches, out_dir):
    """For each (zero stage, bf16): one grafting step per global batch of ``batches``."""
    results = {}
    for stage, bf16, *fp32_reduce in configs:
        cfg = tiny_config(output_dir=os.path.join(out_dir, f"z{stage}{bf16}{fp32_reduce}"))
        trainer = GraftTrainer(cfg, ds_config(cfg, stage, bf16, *fp32_reduce))
        lrs, losses = [], []
        for x1, x2 in batches:
            lrs.append({g["name"]: g["lr"] for g in trainer.engine.optimizer.param_groups})
            losses.append(trainer.train_step(local(x1), local(x2))["loss"].float().item())
        results[(stage, bf16, *fp32_reduce)] = {
            "weights": full_master_weights(trainer.engine),
            "momentum": trainer.momentum.state_dict(),
            "momentum_numel": momentum_partition_numel(trainer),
            "lrs": lrs, "losses": losses,
        }
    return results


def anchor_job(cases, mim_path, out_dir):
    """Per (zero stage, norm): one step away from the MIM weights, then the anchor's value and
    gradient on their own (the loss is multiplied by 0)."""
    results = {}
    for stage, norm, *bf16 in cases:
        cfg = tiny_config(output_dir=os.path.join(out_dir, f"{stage}{norm}{bf16}"), init=mim_path,
                          anchor_weight=0.5, anchor_norm=norm, anchor_blocks=2, warmup_epochs=0)
        trainer = GraftTrainer(cfg, ds_config(cfg, stage, bool(bf16)))
        x1, x2 = global_batch(0, cfg)
        trainer.train_step(local(x1), local(x2))
        weights = full_master_weights(trainer.engine)
        engine = trainer.engine
        q1, q2 = engine(local(x1).to(trainer.dtype), local(x2).to(trainer.dtype))
        engine.backward((q1.sum() + q2.sum()) * 0.0)  # zero gradients, reduced as usual
        value = trainer.anchor.add_gradient(trainer.slices)
        grads = {n: safe_get_full_grad(p).cpu().clone()
                 for n, p in engine.module.named_parameters() if p.requires_grad}
        reference_numel = sum(v.numel() for v in trainer.anchor.reference.values())
        results[(stage, norm, *bf16)] = {"weights": weights, "value": value, "grads": grads,
                                  "reference_numel": reference_numel}
    return results


def contrastive_job(q1, q2, k1, k2, tau):
    loss = moco_loss(local(q1), local(q2), local(k1), local(k2), tau)
    return loss.item()


def resume_job(stage, bf16, out_dir):
    """2N steps straight vs N steps + resume + N steps, on the real data pipeline."""
    common = dict(samples_per_epoch=24, save_every=1000, seed=3)  # 3 steps per epoch

    def run(name, max_steps, resume=None):
        cfg = tiny_config(output_dir=os.path.join(out_dir, name), max_steps=max_steps,
                          resume=resume, **common)
        trainer = GraftTrainer(cfg, ds_config(cfg, stage, bf16))
        trainer.fit()
        return trainer

    straight = run("straight", 4)
    first = run("split", 2)
    deepspeed.comm.barrier()
    second = run("split", 4, resume="auto")
    return {name: {"weights": full_master_weights(t.engine), "momentum": t.momentum.state_dict(),
                   "step": t.step, "epoch": t.epoch}
            for name, t in (("straight", straight), ("first", first), ("resumed", second))}


def save_job(cases, out_dir):
    """Per (zero stage, bf16): two steps, a checkpoint, and the exact fp32 masters it holds."""
    results = {}
    for stage, bf16 in cases:
        cfg = tiny_config(output_dir=os.path.join(out_dir, f"z{stage}{bf16}"), warmup_epochs=0)
        trainer = GraftTrainer(cfg, ds_config(cfg, stage, bf16))
        for seed in range(2):
            x1, x2 = global_batch(seed, cfg)
            trainer.train_step(local(x1), local(x2))
        trainer.step = trainer.engine.global_steps
        trainer.save()
        results[(stage, bf16)] = {"weights": full_master_weights(trainer.engine),
                                  "momentum": trainer.momentum.state_dict(),
                                  "checkpoints": trainer.ckpt_dir}
    return results
