"""Throughput of a method's training step (and of the input pipeline) with the real trainer.

    deepspeed --num_gpus N tools/bench.py --deepspeed_config ds_configs/zero2_bf16.json \
        [--config RECIPE] [--steps 20] [--warmup 5] [--peak_tflops 989] [--data_only] [key=value ...]

The step benchmark feeds synthetic images already on the device, so it measures model,
optimizer, momentum encoder, MIM anchor and communication; ``--data_only`` measures the
WebDataset pipeline (decode + the method's views) of this rank alone. Recipes run as shipped,
but for ``init=``: unless given on the command line, the model starts from a stand-in written
from its own initial weights (the step costs the same whatever the weights; the MIM anchor pulls
towards them, and a grafting method freezes them). Each run writes into a fresh temporary folder, removed at the end. FLOPs come
from fvcore's counter on the method's model: one image costs 3 forward passes (forward +
backward) of the model on its views plus, with a momentum encoder, one forward of it on each
contrastive view.
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
from PIL import Image
from timm.models.vision_transformer import Attention

from lgp_ds import dist
from lgp_ds.cli import errors_as_one_line
from lgp_ds.config import load_run_config
from lgp_ds.data.shards import DataError
from lgp_ds.engine.trainer import Trainer
from lgp_ds.methods import build_method
from lgp_ds.models.vit import MAE_ONLY_PREFIXES


def num_views(method, img_size: int) -> int:
    """How many views the method makes of one image."""
    return len(method.transform()(Image.new("RGB", (img_size, img_size))))


def flops_per_image(method, cfg) -> float:
    """Training FLOPs of one image: 3 x forward of the method's model on its views, plus a
    forward of the momentum encoder on each of the two contrastive views."""
    torch.manual_seed(cfg.seed)
    model = method.build_model().eval()  # eval: BatchNorm without cross-rank statistics
    for m in model.modules():
        if isinstance(m, Attention):  # fvcore counts explicit matmuls, not fused SDPA
            m.fused_attn = False
        if hasattr(m, "set_grad_checkpointing"):
            m.set_grad_checkpointing(False)
    views = tuple(torch.zeros(2, 3, cfg.img_size, cfg.img_size)
                  for _ in range(num_views(method, cfg.img_size)))

    def count(module, inputs) -> float:  # fvcore counts multiply-adds; per image
        return 2 * FlopCountAnalysis(module, inputs).unsupported_ops_warnings(False).total() / 2

    flops = 3 * count(model, views)
    if method.momentum_encoder:
        flops += 2 * count(model.base_encoder, views[0])
    return flops


def write_stand_in(method, cfg, path: str) -> None:
    """Write the encoder's initial weights (what ``cfg.seed`` gives) as an MAE file."""
    torch.manual_seed(cfg.seed)
    encoder = method.encoder(method.build_model())
    torch.save({"model": {k: v for k, v in encoder.state_dict().items()
                          if not k.startswith(("head.",) + MAE_ONLY_PREFIXES)}}, path)


def bench_step(trainer, steps: int, warmup: int) -> float:
    cfg, acc = trainer.cfg, get_accelerator()
    n = trainer.engine.train_micro_batch_size_per_gpu()
    views = [torch.randn(n, 3, cfg.img_size, cfg.img_size, device=trainer.device)
             for _ in range(num_views(trainer.method, cfg.img_size))]
    # labels, which fine-tuning trains on (pre-training ignores them)
    labels = torch.randint(0, cfg.num_classes, (n,), device=trainer.device)
    for _ in range(warmup):
        trainer.train_step(*views, labels=labels)
    acc.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(*views, labels=labels)
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
    folder = tempfile.mkdtemp(prefix="lgp_ds_bench_")  # per rank: node-local /tmp is fine
    try:
        # The step costs the same whatever the weights: unless init= is given here, the run
        # starts from a stand-in (the model's own initial weights), not the recipe's init=.
        given_init = any(o.startswith("init=") for o in args.overrides)
        stand_in = os.path.join(folder, "init_stand_in.pth")
        overrides = args.overrides + ([] if given_init else [f"init={stand_in}"])
        with errors_as_one_line(ranks_started=False):
            cfg, ds_config = load_run_config(args.config, overrides, args.deepspeed_config)
        dist.init_process_group()
        cfg.output_dir = os.path.join(folder, "run")
        method = build_method(cfg)
        if not given_init:
            write_stand_in(method, cfg, stand_in)
        with errors_as_one_line():
            trainer = Trainer(cfg, ds_config, method, with_data=args.data_only)
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
                        f"({cfg.img_size}px, {cfg.method}'s views) on {device}")
        return
    seconds = bench_step(trainer, args.steps, args.warmup)
    img_s = world * n / seconds
    tflops = flops_per_image(trainer.method, cfg) * n / seconds / 1e12  # per device
    line = (f"{cfg.method} {cfg.arch} {cfg.img_size}px batch {n}/rank x {world} rank(s) on {device}: "
            f"{img_s:.1f} img/s, {seconds * 1e3:.1f} ms/step, {tflops:.2f} TFLOP/s per device")
    if args.peak_tflops:
        line += f", MFU {100 * tflops / args.peak_tflops:.1f}%"
    dist.print_main(line)


if __name__ == "__main__":
    main()
