"""Throughput of the grafting step (and of the input pipeline) with the real trainer.

    deepspeed --num_gpus N tools/bench.py --deepspeed_config ds_configs/zero2_bf16.json \
        [--config RECIPE] [--steps 20] [--warmup 5] [--peak_tflops 989] [--data_only] [key=value ...]

The step benchmark feeds synthetic images already on the device, so it measures model,
optimizer, momentum encoder, MIM anchor and communication; ``--data_only`` measures the
WebDataset pipeline (decode + two MoCo views) of this rank alone. Recipes run as shipped: one with
the MIM anchor but no ``init=`` takes the model's own initial weights as its MIM weights (the
anchor costs the same whatever they are). Each run writes into a fresh temporary folder, removed
at the end. FLOPs come from fvcore's counter on the encoder and projector: one image costs 3
forward passes (forward + backward) of the base encoder on each of two views plus one forward of
the momentum encoder on each view.
"""
import argparse
import os
import shutil
import tempfile
import time

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from fvcore.nn import FlopCountAnalysis

from lgp_ds import dist
from lgp_ds.cli import errors_as_one_line
from lgp_ds.config import load_run_config
from lgp_ds.data.shards import DataError
from lgp_ds.engine.trainer import GraftTrainer
from lgp_ds.models.moco import build_graft_model


def forward_flops(cfg) -> float:
    """FLOPs of one forward pass of encoder + projector + predictor on one image."""
    model = build_graft_model(cfg, cross_rank_bn=False).eval()
    for blk in model.base_encoder.blocks:  # fvcore counts explicit matmuls, not fused SDPA
        blk.attn.fused_attn = False
    model.base_encoder.set_grad_checkpointing(False)
    x = torch.zeros(2, 3, cfg.img_size, cfg.img_size)
    counter = FlopCountAnalysis(model, (x, x)).unsupported_ops_warnings(False)
    return 2 * counter.total() / 4  # fvcore counts multiply-adds; 2 images x 2 views


def stand_in_mim_weights(cfg, folder: str) -> str:
    """Write the encoder's initial weights (what ``cfg.seed`` gives) as an MAE file; its path."""
    torch.manual_seed(cfg.seed)
    encoder = build_graft_model(cfg, cross_rank_bn=False).base_encoder
    path = os.path.join(folder, "mim_stand_in.pth")
    torch.save({"model": {k: v for k, v in encoder.state_dict().items()
                          if not k.startswith("head.")}}, path)
    return path


def bench_step(trainer, steps: int, warmup: int) -> float:
    cfg, acc = trainer.cfg, get_accelerator()
    n = trainer.engine.train_micro_batch_size_per_gpu()
    x1 = torch.randn(n, 3, cfg.img_size, cfg.img_size, device=trainer.device)
    x2 = torch.randn_like(x1)
    for _ in range(warmup):
        trainer.train_step(x1, x2)
    acc.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x1, x2)
    acc.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak_tflops", type=float, help="per-device peak, for MFU")
    p.add_argument("--data_only", action="store_true")
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("overrides", nargs="*")
    p = deepspeed.add_config_arguments(p)
    args = p.parse_intermixed_args()
    with errors_as_one_line(ranks_started=False):
        cfg, ds_config = load_run_config(args.config, args.overrides, args.deepspeed_config)
    dist.init_process_group()
    folder = tempfile.mkdtemp(prefix="lgp_ds_bench_")  # per rank: node-local /tmp is fine
    try:
        cfg.output_dir = os.path.join(folder, "run")
        if cfg.anchor_weight > 0 and cfg.init is None:
            cfg.init = stand_in_mim_weights(cfg, folder)
        with errors_as_one_line():
            trainer = GraftTrainer(cfg, ds_config, with_data=args.data_only)
        with errors_as_one_line((DataError,)):
            run(args, trainer)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args, trainer) -> None:
    cfg = trainer.cfg
    world, n = dist.get_world_size(), trainer.engine.train_micro_batch_size_per_gpu()
    device = get_accelerator().device_name()
    if device == "cuda":
        device = torch.cuda.get_device_name()
    if args.data_only:
        batches = trainer.data.batches(0, args.warmup + args.steps)
        for _ in range(args.warmup):
            next(batches)
        start = time.perf_counter()
        for _ in batches:
            pass
        rate = args.steps * n / (time.perf_counter() - start)
        dist.print_main(f"data: {rate:.1f} img/s per rank with {cfg.num_workers} workers "
                        f"({cfg.img_size}px, two views) on {device}")
        return
    seconds = bench_step(trainer, args.steps, args.warmup)
    img_s = world * n / seconds
    tflops = 8 * forward_flops(cfg) * n / seconds / 1e12  # per device: 2 views x (3 + 1)
    line = (f"{cfg.arch} {cfg.img_size}px batch {n}/rank x {world} rank(s) on {device}: "
            f"{img_s:.1f} img/s, {seconds * 1e3:.1f} ms/step, {tflops:.2f} TFLOP/s per device")
    if args.peak_tflops:
        line += f", MFU {100 * tflops / args.peak_tflops:.1f}%"
    dist.print_main(line)


if __name__ == "__main__":
    main()
