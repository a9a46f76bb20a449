"""Rank functions for tests/test_methods.py: every method on the embedded data, 2 real ranks."""
import os

import deepspeed
import torch

from jobs import ds_config, full_master_weights, tiny_config
from lgp_ds.engine.trainer import Trainer
from lgp_ds.methods import build_method

DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75)
# Each method's keys on top of jobs.TINY (depth 3: one block per stage). "{mae}" and "{moco}"
# stand for the run folders of the mae and moco runs, which the grafted methods start from.
METHODS = {
    "mae": dict(method="mae", frozen_patch_embed=False, num_stages=1, stage_blrs=[1e-2],
                betas=[0.9, 0.95], **DECODER),
    "moco": dict(method="moco", num_stages=1, stage_blrs=[1e-2]),
    "graft": dict(method="graft", init="{mae}", grad_ckpt="auto"),
    "mtl": dict(method="mtl", frozen_patch_embed=False, num_stages=1, stage_blrs=[1e-2],
                cl_weight=1.0, mim_weight=0.5, **DECODER),
    "mim2cl_frozen": dict(method="mim2cl_frozen", init="{mae}", frozen_stages=2),
    "cl2mim": dict(method="cl2mim", init="{moco}", frozen_stages=2, **DECODER),
    "graft_vicreg": dict(method="graft_vicreg", init="{mae}"),
}


def module_weights(engine) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's module as it computes with it (gathered under ZeRO 3)."""
    out = {}
    for n, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out[n] = p.detach().cpu().clone()
    return out


def _trainer(name, out_dir, stage=2, bf16=False, folder=None, **extra):
    """A trainer of method ``name`` (2 steps, checkpoint at the end) into out_dir/folder."""
    keys = {k: v.format(mae=os.path.join(out_dir, "mae"), moco=os.path.join(out_dir, "moco"))
            if isinstance(v, str) else v for k, v in {**METHODS[name], **extra}.items()}
    cfg = tiny_config(output_dir=os.path.join(out_dir, folder or name), warmup_epochs=0,
                      max_steps=2, save_every=2, **keys)
    return Trainer(cfg, ds_config(cfg, stage, bf16), build_method(cfg))


def _run(trainer) -> dict:
    """Train ``trainer`` to its max_steps on the embedded data; weights before and after."""
    frozen = [n for n, p in trainer.engine.module.named_parameters() if not p.requires_grad]
    before = module_weights(trainer.engine)
    masters_before = full_master_weights(trainer.engine)
    momentum_before = trainer.momentum.state_dict() if trainer.momentum else None
    records = trainer.fit()
    return {"before": before, "after": module_weights(trainer.engine), "frozen": frozen,
            "momentum_before": momentum_before,
            "momentum_after": trainer.momentum.state_dict() if trainer.momentum else None,
            "records": records, "masters_before": masters_before,
            "masters": full_master_weights(trainer.engine),
            "exact_frozen": trainer.frozen}


def methods_job(out_dir):
    """Every method for 2 steps on the embedded data: MAE under ZeRO 3 first (its checkpoint
    folder is the init= of graft, mim2cl_frozen and graft_vicreg), MoCo (for cl2mim), then the
    rest under ZeRO 2. For graft, also the weights it starts from."""
    results = {"mae": _run(_trainer("mae", out_dir, stage=3))}
    for name in ("moco", "graft", "mtl", "mim2cl_frozen", "cl2mim", "graft_vicreg"):
        trainer = _trainer(name, out_dir)
        if name == "graft":
            results["graft_start"] = {"masters": full_master_weights(trainer.engine),
                                      "momentum": trainer.momentum.state_dict()}
        results[name] = _run(trainer)
    return results


def bf16_job(out_dir, mae_dir):
    """In bf16: mim2cl_frozen from ``mae_dir`` under ZeRO 1, 2 and 3, MAE under ZeRO 1 and 2
    (its ZeRO 3 run is methods_job's) and MTL, whose encoder runs twice per step, under ZeRO 3:
    weights before and after."""
    out = {("mim2cl_frozen", stage): _run(_trainer("mim2cl_frozen", out_dir, stage, True,
                                                   f"frozen-z{stage}", init=mae_dir))
           for stage in (1, 2, 3)}
    out.update({("mae", stage): _run(_trainer("mae", out_dir, stage, True, f"mae-z{stage}"))
                for stage in (1, 2)})
    out[("mtl", 3)] = _run(_trainer("mtl", out_dir, 3, True, "mtl-z3"))
    return out


def mask_job(out_dir):
    """MAE with LR 0 (weights never change) fed the same images on every rank and step: its
    losses differ only where the random masks do."""
    cfg = tiny_config(output_dir=out_dir, **{**METHODS["mae"], "stage_blrs": [0.0]})
    trainer = Trainer(cfg, ds_config(cfg, 2, False), build_method(cfg), with_data=False)
    x = torch.randn(4, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    return [trainer.train_step(x)["loss"].item() for _ in range(3)]
