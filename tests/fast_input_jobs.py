"""Rank functions for tests/test_fast_input.py: training with augment_on=device, 2 real ranks."""
import torch

from jobs import ds_config, tiny_config
from lgp_ds.engine.trainer import Trainer
from lgp_ds.methods import build_method
from method_jobs import METHODS


def device_augment_job(out_dir):
    """MTL (two MoCo views and an MAE view) for 2 steps with augment_on=device on the embedded
    data: its logged records, and its device views of one uint8 batch drawn twice at the same
    micro-batch."""
    cfg = tiny_config(output_dir=out_dir, warmup_epochs=0, max_steps=2, augment_on="device",
                      **METHODS["mtl"])
    trainer = Trainer(cfg, ds_config(cfg, 2, False), build_method(cfg))
    records = trainer.fit()
    x = torch.randint(0, 256, (4, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    views = []
    for _ in range(2):
        with trainer._forward_rng():
            views.append(trainer.method.device_views((x, x, x)))
    return {"records": records, "views": views}
