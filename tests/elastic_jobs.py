"""Rank functions of the resume-on-another-world-size tests (``test_elastic.py``): a run saved by
2 ranks, resumed on 1 or 4; each returns the full state DeepSpeed holds, read through its own API
(the fp32 masters) and the torch optimizer's state (Adam's moments and step)."""
import math
import os

import torch
from deepspeed.utils import safe_get_full_fp32_param

from lgp_ds import dist
from lgp_ds.engine.trainer import Trainer
from lgp_ds.methods import build_method

import jobs

# 3 steps an epoch (24 samples, batch 8): the checkpoint at step 2 is in the middle of epoch 0
RUN = dict(samples_per_epoch=24, save_every=2, seed=5)


def _full_state(trainer) -> dict:
    """Full fp32 masters, Adam's exp_avg / exp_avg_sq [numel] and step of every trainable
    parameter, the momentum encoder, each group's LR and weight decay (collective)."""
    named = [(n, p) for n, p in trainer.engine.module.named_parameters() if p.requires_grad]
    optimizer = trainer.engine.optimizer
    out = {"weights": {n: safe_get_full_fp32_param(p).cpu().clone() for n, p in named},
           "momentum": trainer.momentum.state_dict(),
           "groups": [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups],
           "adam_steps": {float(s["step"]) for s in optimizer.optimizer.state.values()
                          if "step" in s},
           "position": (trainer.step, trainer.epoch, trainer.batch_in_epoch)}
    for key in ("exp_avg", "exp_avg_sq"):
        slices = dist.all_gather_object({n: (start, v.cpu()) for n, (start, v)
                                         in jobs.local_optimizer_state(trainer, key).items()})
        out[key] = {}
        for n, p in named:
            full = torch.full((getattr(p, "ds_numel", p.numel()),), math.nan)
            for rank_slices in slices:  # each element has one owner
                if n in rank_slices:
                    start, values = rank_slices[n]
                    full[start:start + values.numel()] = values
            out[key][n] = full
    return out


def _trainer(stage: int, bf16: bool, output_dir: str, **keys) -> Trainer:
    cfg = jobs.tiny_config(output_dir=output_dir, **RUN, **keys)
    return Trainer(cfg, jobs.ds_config(cfg, stage, bf16), build_method(cfg))


def save_job(cases, out_dir):
    """Per (zero stage, bf16): 2 steps saved at step 2; the state saved."""
    results = {}
    for stage, bf16 in cases:
        trainer = _trainer(stage, bf16, os.path.join(out_dir, f"z{stage}{bf16}"), max_steps=2)
        trainer.fit()
        results[(stage, bf16)] = _full_state(trainer)
    return results


def resume_job(cases, resume, out_dir):
    """Per (zero stage, bf16): a resume from ``resume`` (a folder per case; ``"auto"``: the
    case's run folder under ``out_dir``) on this world size, its state as loaded, then 2 more
    steps: the records of those steps."""
    results = {}
    for stage, bf16 in cases:
        case = f"z{stage}{bf16}"
        trainer = _trainer(stage, bf16, os.path.join(out_dir, case), max_steps=4,
                           resume=resume if resume == "auto"
                           else os.path.join(resume, case, "checkpoints"))
        loaded = _full_state(trainer)
        records = trainer.fit()
        results[(stage, bf16)] = {"loaded": loaded, "records": records,
                                  "end": (trainer.step, trainer.epoch, trainer.batch_in_epoch)}
    return results
