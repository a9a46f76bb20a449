"""Throughput of a method's training step with the real trainer, or of the input pipeline.

    deepspeed --num_gpus N tools/bench.py --deepspeed_config ds_configs/zero2_bf16.json \
        [--config RECIPE] [--steps 20] [--warmup 5] [--peak_tflops 989] [--data_only] [key=value ...]

The step benchmark feeds synthetic views already on the device, so it measures model,
optimizer, momentum encoder, MIM anchor, communication and, with ``augment_on=device``, the
device's part of the views. Recipes run as shipped, but for ``init=``: unless given on the
command line, the model starts from a stand-in written from its own initial weights (the step
costs the same whatever the weights; the MIM anchor pulls towards them, and a grafting method
freezes them). FLOPs come from fvcore's counter on the method's model: one image costs 3 forward
passes (forward + backward) of the model on its views plus, with a momentum encoder, one forward
of it on each contrastive view.

``--data_only`` measures the input pipeline of this rank alone (shards -> decode -> views ->
batches, with ``num_workers`` DataLoader workers) for MoCo v3's two views and MAE's one, each
made by torchvision on the CPU (``augment_on=cpu``) and as crops on the CPU (``augment_on=device``,
whose photometric part is timed apart on the device) and, where NVIDIA DALI is installed, as
crops by DALI (``input_backend=dali``: nvJPEG on a GPU, its CPU decoder without one): images/s
in total and per worker (DALI: per thread), and the ratio to torchvision's. It reads ``data=``'s
shards, else ``--images`` photo-like JPEGs of ImageNet's size (:mod:`lgp_ds.data.photos`) that
it writes. Each run writes into a fresh temporary folder, removed at the end.

``--scaling`` prints, without a GPU, the grafting step's communication per ZeRO stage, memory,
predicted step time and scaling efficiency on many GPUs and the ZeRO stage to pick
(:mod:`lgp_ds.scaling`; docs/scaling.md):

    python tools/bench.py --scaling [--img_per_s 364] [--gpus 8,64,512] [--nics_per_node 8]
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

from lgp_ds import dist, scaling
from lgp_ds.cli import BAD_INPUT, errors_as_one_line
from lgp_ds.config import dali_installed, load_run_config
from lgp_ds.data.photos import write_photo_shards
from lgp_ds.data.pipeline import build_train_data
from lgp_ds.data.shards import DataError
from lgp_ds.engine.trainer import Trainer
from lgp_ds.methods import build_method
from lgp_ds.models.vit import MAE_ONLY_PREFIXES


def sample_views(method, img_size: int) -> tuple[torch.Tensor, ...]:
    """The views the method's transform makes of one (blank) image: their number and dtype."""
    return method.transform()(Image.new("RGB", (img_size, img_size)))


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
                  for _ in sample_views(method, cfg.img_size))

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


def device_name() -> str:
    device = get_accelerator().device_name()
    return torch.cuda.get_device_name() if device == "cuda" else device


def bench_step(trainer, steps: int, warmup: int) -> float:
    cfg, acc = trainer.cfg, get_accelerator()
    n, shape = trainer.engine.train_micro_batch_size_per_gpu(), (cfg.img_size, cfg.img_size)
    # as the transform makes them: float views, or uint8 crops (augment_on=device)
    views = [torch.randint(0, 256, (n, 3, *shape), dtype=torch.uint8, device=trainer.device)
             if v.dtype == torch.uint8 else torch.randn(n, 3, *shape, device=trainer.device)
             for v in sample_views(trainer.method, cfg.img_size)]
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
    p.add_argument("--data_only", action="store_true", help="the input pipeline alone")
    p.add_argument("--images", type=int, default=256,
                   help="--data_only without data=: photo-like JPEGs to write and read")
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("overrides", nargs="*")
    scaling.add_arguments(p)
    p = deepspeed.add_config_arguments(p)
    args = p.parse_intermixed_args()
    if args.scaling:  # on paper: no process group, no device
        with errors_as_one_line(ranks_started=False):
            print(scaling.report(scaling.inputs_from_args(args)))
        return
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
        if args.data_only:
            with errors_as_one_line(BAD_INPUT + (DataError,)):
                bench_data(cfg, ds_config["train_micro_batch_size_per_gpu"], args, folder)
            return
        method = build_method(cfg)
        if not given_init:
            write_stand_in(method, cfg, stand_in)
        with errors_as_one_line():
            trainer = Trainer(cfg, ds_config, method)
        run(args, trainer)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args, trainer) -> None:
    cfg = trainer.cfg
    world, n = dist.get_world_size(), trainer.engine.train_micro_batch_size_per_gpu()
    device = device_name()
    seconds = bench_step(trainer, args.steps, args.warmup)
    img_s = world * n / seconds
    tflops = flops_per_image(trainer.method, cfg) * n / seconds / 1e12  # per device
    line = (f"{cfg.method} {cfg.arch} {cfg.img_size}px batch {n}/rank x {world} rank(s) on {device}: "
            f"{img_s:.1f} img/s, {seconds * 1e3:.1f} ms/step, {tflops:.2f} TFLOP/s per device")
    if args.peak_tflops:
        line += f", MFU {100 * tflops / args.peak_tflops:.1f}%"
    dist.print_main(line)


def pipeline_rate(cfg, method, batch: int, warmup: int, steps: int):
    """(images/s, the last batch's views) of this rank's input pipeline for ``method`` as
    ``cfg`` builds it (shards, workers, ``augment_on``, ``input_backend``), over ``steps``
    batches after ``warmup``."""
    batches = build_train_data(cfg, batch, method).batches(0, warmup + steps)
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for *views, _, _ in batches:
        pass
    get_accelerator().synchronize()  # DALI's views may be on the GPU
    return steps * batch / (time.perf_counter() - start), views


def device_rate(method, views: list[torch.Tensor], warmup: int, steps: int) -> float:
    """Images/s of ``method.device_views`` on ``views`` (a batch of crops) on the device."""
    acc = get_accelerator()
    views = tuple(v.to(acc.current_device_name()) for v in views)
    for _ in range(warmup):
        method.device_views(views)
    acc.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        method.device_views(views)
    acc.synchronize()
    return steps * views[0].shape[0] / (time.perf_counter() - start)


def bench_data(cfg, batch: int, args, folder: str) -> None:
    """Print the input pipeline's table (see the module) for MoCo v3's and MAE's views."""
    source = f"data={cfg.data}"
    if cfg.data is None:
        cfg.data = [write_photo_shards(folder, args.images, max(8, cfg.num_workers))]
        source = f"{args.images} photo-like 500x375 JPEGs (lgp_ds.data.photos)"
    device = device_name()
    workers = max(1, cfg.num_workers)  # without workers, this process is the one
    lines = [f"input pipeline of one rank: {source}, {cfg.img_size} px views, batches of {batch}, "
             f"{cfg.num_workers} DataLoader workers on {len(os.sched_getaffinity(0))} CPU "
             f"cores; device part on {device}",
             "| views | made by | img/s | img/s per worker | vs torchvision |",
             "|---|---|---:|---:|---:|"]
    for name, views in (("moco", "MoCo v3, 2 views"), ("mae", "MAE, 1 view")):
        plain, fast = (cfg.model_copy(update={"method": name, "augment_on": where})
                       for where in ("cpu", "device"))
        method = build_method(fast)  # its views; its transform is the crops
        base, _ = pipeline_rate(plain, build_method(plain), batch, args.warmup, args.steps)
        rate, crops = pipeline_rate(fast, method, batch, args.warmup, args.steps)
        on_device = device_rate(method, crops, args.warmup, args.steps)
        lines += [f"| {views} | torchvision (CPU) | {base:.1f} | {base / workers:.1f} | 1.00x |",
                  f"| {views} | crops (CPU) | {rate:.1f} | {rate / workers:.1f} | "
                  f"{rate / base:.2f}x |",
                  f"| {views} | + the rest ({device}) | {on_device:.1f} | | |"]
        if dali_installed():  # its crops, made where input_backend=dali makes them
            dali = fast.model_copy(update={"input_backend": "dali"})
            rate, _ = pipeline_rate(dali, method, batch, args.warmup, args.steps)
            where = "nvJPEG, GPU" if torch.cuda.is_available() else "CPU"
            lines.append(f"| {views} | DALI crops ({where}) | {rate:.1f} | {rate / workers:.1f} | "
                         f"{rate / base:.2f}x |")
    dist.print_main("\n".join(lines))


if __name__ == "__main__":
    main()
