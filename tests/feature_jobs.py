"""Rank functions for tests/test_features.py (2 real ranks): feature extraction, the cache, the
init= path with official 12-head files, and the kNN monitor under ZeRO 3."""
import os

import torch

from jobs import full_master_weights, read_metrics, tiny_config
from lgp_ds import dist
from lgp_ds.data.transforms import eval_transform
from lgp_ds.ds_config import resolve_ds_config
from lgp_ds.engine.trainer import Trainer
from lgp_ds.eval import features, monitor
from lgp_ds.launch import build_trainer
from lgp_ds.methods import build_method

IMG = 16  # the size the tar test images are read at (eval_transform resizes and crops)


def ds_config(cfg, stage: int, bf16: bool) -> dict:
    """ZeRO ``stage``; under ZeRO 3 every parameter partitioned (the tiny model's would all stay
    whole under DeepSpeed's default persistence threshold)."""
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    return resolve_ds_config({"zero_optimization": zero, "bf16": {"enabled": bf16},
                              "steps_per_print": 10 ** 9}, cfg, dist.get_world_size())


def live_features(trainer, x: torch.Tensor) -> torch.Tensor:
    """The class token of the trainer's current base encoder for ``x`` (every rank alike)."""
    encoder = trainer.method.encoder(trainer.engine.module)
    encoder.eval()
    with torch.no_grad(), monitor.own_parameters_gathered(encoder):
        out = monitor.backbone_features(encoder, x).float().cpu()
    encoder.train()
    return out


def extraction_job(checkpoint: str, uneven: str, one_shard: str, cache_dir: str,
                   corrupt: str) -> dict:
    """extract_features over shards the ranks hold unequal numbers of images of (one rank none
    at all with ``one_shard``), and cached_features twice (the second must not extract); over
    ``corrupt`` (rank 1's shard holds a corrupt sample): each rank's error."""
    out = {}
    try:
        features.extract_features(features.load_encoder(checkpoint), corrupt,
                                  eval_transform(IMG), 2)
    except Exception as e:
        out["corrupt"] = f"{type(e).__name__}: {e}"
    for name, kwargs in (("cls", {}), ("mean", {"pooling": "mean"}),
                         ("proj1", {"projector_layers": 1})):
        encoder = features.load_encoder(checkpoint, **kwargs)
        out[name] = features.extract_features(encoder, uneven, eval_transform(IMG), 2)
    encoder = features.load_encoder(checkpoint)
    out["one_shard"] = features.extract_features(encoder, one_shard, eval_transform(IMG), 2)
    out["cached_first"] = features.cached_features(cache_dir, encoder, uneven,
                                                   eval_transform(IMG), 2)
    original = features.extract_features

    def must_not_run(*args, **kwargs):
        raise AssertionError("cached_features extracted again")

    features.extract_features = must_not_run
    try:
        out["cached_second"] = features.cached_features(cache_dir, encoder, uneven,
                                                        eval_transform(IMG), 2)
    finally:
        features.extract_features = original
    return out


def init_job(files: dict, out_dir: str, x: torch.Tensor) -> dict:
    """A MoCo trainer started from each official 12-head file (init=, num_heads=12): the class
    token its engine's base encoder computes for ``x``."""
    out = {}
    for name, (arch, path) in files.items():
        cfg = tiny_config(arch=arch, img_size=32, patch_size=None, embed_dim=None, depth=1,
                          num_heads=12, method="moco", num_stages=1, stage_blrs=[1e-2],
                          init=path, output_dir=os.path.join(out_dir, name))
        trainer = Trainer(cfg, ds_config(cfg, 0, False), build_method(cfg), with_data=False)
        out[name] = live_features(trainer, x)
    return out


def monitor_job(out_dir: str, knn_train: str, knn_val: str, x: torch.Tensor) -> dict:
    """Graft-style MoCo under ZeRO 3 (fp32, every parameter partitioned) for 2 steps on the
    embedded data, with the kNN monitor every step on the uneven shards and without it; MAE in
    bf16 under ZeRO 3 with the monitor on the embedded train / val split at its last step."""
    common = dict(method="moco", num_stages=1, stage_blrs=[1e-2], warmup_epochs=0, max_steps=2,
                  save_every=2)
    out = {}
    for name, keys in (("monitor", dict(knn_every=1, knn_k=3, knn_train_data=[knn_train],
                                        knn_val_data=[knn_val])),
                       ("plain", {})):
        cfg = tiny_config(output_dir=os.path.join(out_dir, name), **common, **keys)
        trainer = build_trainer(cfg, ds_config(cfg, 3, False))
        trainer.fit()
        out[name] = {"metrics": read_metrics(cfg.output_dir),
                     "masters": full_master_weights(trainer.engine),
                     "momentum": trainer.momentum.state_dict(),
                     "features": live_features(trainer, x)}
    cfg = tiny_config(output_dir=os.path.join(out_dir, "mae"), method="mae",
                      frozen_patch_embed=False, num_stages=1, stage_blrs=[1e-2],
                      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                      warmup_epochs=0, max_steps=2, save_every=2, knn_every=2)
    trainer = build_trainer(cfg, ds_config(cfg, 3, True))
    trainer.fit()
    out["mae"] = {"metrics": read_metrics(cfg.output_dir)}
    return out


def all_jobs(extraction: tuple, init: tuple, monitor: tuple) -> dict:
    """The three jobs in one world (one start-up of the ranks)."""
    return {"extraction": extraction_job(*extraction), "init": init_job(*init),
            "monitor": monitor_job(*monitor)}
