"""Rank functions for tests/test_finetune.py: fine-tuning on 2 real ranks with the real trainer."""
import os

import torch

from jobs import ds_config, full_master_weights, local, tiny_config
from lgp_ds import dist
from lgp_ds.engine.trainer import Trainer
from lgp_ds.methods import build_method
from lgp_ds.methods.finetune import top1
from method_jobs import module_weights

# Fine-tuning keys on top of jobs.TINY (depth 3, width 32, 16 px, patch 8)
FINETUNE = dict(method="finetune", num_classes=10, sincos_pos_embed=False,
                frozen_patch_embed=False, num_stages=1, stage_blrs=[2e-3], layer_decay=0.75,
                weight_decay=0.05, warmup_epochs=0, samples_per_epoch=None, crop_min=0.5)


def finetune_config(out_dir, name, **keys):
    return tiny_config(**{**FINETUNE, "output_dir": os.path.join(out_dir, name), **keys})


def _trainer(cfg, stage, bf16, **kwargs):
    return Trainer(cfg, ds_config(cfg, stage, bf16), build_method(cfg), **kwargs)


def labels_job(out_dir, x, y):
    """ZeRO 1, fp32, no data: the first step's loss on this rank's half of (x, y), the
    classifier's bias after it, and each param group's LR as the optimizer holds it, with the
    parameter names in it."""
    cfg = finetune_config(out_dir, "labels", layer_decay=0.5)
    trainer = _trainer(cfg, 1, False, with_data=False)
    lrs = {g["name"]: g["lr"] for g in trainer.engine.optimizer.param_groups}
    groups = dict(zip(trainer.group_names, trainer.group_params))
    loss = trainer.train_step(local(x), labels=local(y))["loss"].item()
    bias = full_master_weights(trainer.engine)["base_encoder.head.0.bias"]
    return {"loss": loss, "bias": bias, "lrs": lrs, "groups": groups,
            "batch_size": cfg.batch_size}


def train_job(out_dir):
    """ZeRO 2 fp32 from random weights on the embedded digits, 60 steps with top-1 at steps 30
    and 60."""
    cfg = finetune_config(out_dir, "z2", batch_size=32, epochs=2, max_steps=60, eval_every=30,
                          stage_blrs=[4e-2],
                          log_every=10, save_every=60, drop_path=0.1)
    trainer = _trainer(cfg, 2, False)
    return {"records": trainer.fit()}


def semi_job(out_dir, init):
    """ZeRO 3 bf16: from ``init`` (an official MoCo v3 file) with its first projector unit, the
    embeddings and block 0 frozen, on a 10% subset, Mixup/CutMix, RandAugment, random erasing,
    label smoothing; 3 steps and the top-1 after them (uneven batches per rank)."""
    cfg = finetune_config(out_dir, "z3", init=init, from_projector_layer=1, pooling="cls",
                          freeze_blocks=1, subset_fraction=0.1, mixup=0.8, cutmix=1.0,
                          smoothing=0.1, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                          drop_path=0.1, max_steps=3, save_every=3)
    ds = ds_config(cfg, 3, True)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every forward gathers
    trainer = Trainer(cfg, ds, build_method(cfg))
    frozen = [n for n, p in trainer.engine.module.named_parameters() if not p.requires_grad]
    before, masters_before = module_weights(trainer.engine), full_master_weights(trainer.engine)
    records = trainer.fit()
    # uneven evaluation: rank 0 holds three batches, rank 1 one (ZeRO 3 needs a forward on every
    # rank while any has a batch; a missing one would hang)
    g = torch.Generator().manual_seed(dist.get_rank())
    sizes = [4, 4, 3] if dist.get_rank() == 0 else [2]
    uneven = [(None, torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,)))
              for n in sizes]
    correct, count = top1(trainer.engine, uneven, trainer.device)
    return {"records": records, "frozen": frozen, "before": before, "uneven": (correct, count),
            "training": trainer.engine.module.training,
            "after": module_weights(trainer.engine), "masters_before": masters_before,
            "masters": full_master_weights(trainer.engine),
            "steps_per_epoch": trainer.steps_per_epoch}


def finetune_job(out_dir, init, x, y):
    torch.manual_seed(0)
    return {"labels": labels_job(out_dir, x, y), "train": train_job(out_dir),
            "semi": semi_job(out_dir, init)}
