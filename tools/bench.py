"""Throughput of a method's training step with the real trainer, or of the input pipeline.

    deepspeed --num_gpus N tools/bench.py --deepspeed_config ds_configs/zero2_bf16.json \
        [--config RECIPE] [--steps 20] [--warmup 5] [--no_reference] [--json OUT.json] \
        [--profile DIR] [--data_only] [key=value ...]

The step benchmark feeds synthetic views already on the device, so it measures model,
optimizer, momentum encoder, MIM anchor, communication and, with ``augment_on=device``, the
device's part of the views. Recipes run as shipped, but for ``init=``: unless given on the
command line, the model starts from a stand-in written from its own initial weights (the step
costs the same whatever the weights; the MIM anchor pulls towards them, and a grafting method
freezes them). In the same run, first, the same method's step written the official code's way
(fp16 autocast, unfused attention, torch AdamW, a plain module: :mod:`lgp_ds.benchmark.reference`)
is timed on the same batch, so every speed-up is a same-run ratio. Each row gives img/s, ms/step,
TFLOP/s per device (:mod:`lgp_ds.benchmark.flops` states the counting rule), MFU against a bf16
matmul peak measured in the same run, and peak memory; ``--json`` writes them with the device,
versions and command.

``--profile DIR``, after the timed steps (so their figures are the same), runs lgp_ds's step 3
more times (whole optimizer steps) after one more under ``torch.profiler``, writes
``DIR/trace_rank{R}.json`` (a Chrome trace; open it in Perfetto) and prints the top ops by self
device time and, per step, the wall time, the time the device was busy and idle, and the host's
waits for the device (:func:`lgp_ds.benchmark.measure.profile_step`); ``--json`` holds these
under ``"profile"``.

``--data_only`` measures the input pipeline of this rank alone (shards -> decode -> views ->
batches, with ``num_workers`` DataLoader workers) for MoCo v3's two views and MAE's one, made by
torchvision, as crops whose rest runs on the device, and by DALI where it is installed
(:mod:`lgp_ds.benchmark.pipeline`). It reads ``data=``'s shards, else ``--images`` photo-like
JPEGs of ImageNet's size that it writes; ``--json`` writes its rows. Each run writes into a
fresh temporary folder, removed at the end, also when stopped by SIGTERM (``timeout``, a job
scheduler): SIGTERM exits as an error would, with status 143.

``--scaling`` prints, without a GPU, the grafting step's communication per ZeRO stage, memory,
predicted step time and scaling efficiency on many GPUs and the ZeRO stage to pick
(:mod:`lgp_ds.scaling`; docs/scaling.md):

    python tools/bench.py --scaling [--img_per_s 364] [--gpus 8,64,512] [--nics_per_node 8]
"""
import argparse
import json
import os
import shutil
import signal
import sys
import tempfile

import deepspeed
import timm
import torch

from lgp_ds import dist, scaling
from lgp_ds.benchmark.flops import flops_per_image
from lgp_ds.benchmark.measure import device_name, matmul_peak_tflops, profile_step
from lgp_ds.benchmark.pipeline import pipeline_table
from lgp_ds.benchmark.step import (row, synthetic_batch, table, time_reference, time_trainer,
                                   write_stand_in)
from lgp_ds.cli import BAD_INPUT, errors_as_one_line
from lgp_ds.data.shards import DataError
from lgp_ds.ds_config import load_run_config, precision
from lgp_ds.engine.trainer import Trainer
from lgp_ds.methods import build_method


def _at_least(low: int):
    """An argparse type: an integer of at least ``low``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    parse.__name__ = f"integer >= {low}"  # argparse names the type in its message
    return parse


def _stop_on_sigterm(signum, frame) -> None:
    """SIGTERM as an exit, so that ``finally`` blocks run (the temporary folder, with a
    stand-in init= of 1.2 GB for ViT-L, is removed)."""
    raise SystemExit(128 + signum)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--steps", type=_at_least(1), default=20)
    p.add_argument("--warmup", type=_at_least(0), default=5)
    p.add_argument("--no_reference", action="store_true",
                   help="leave out the official-style step (its model is a second copy in memory)")
    p.add_argument("--json", help="also write the results to this file (rank 0; its folder is "
                   "created)")
    p.add_argument("--profile", metavar="DIR",
                   help="then profile lgp_ds's step: a Chrome trace per rank in DIR, a report")
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
    if args.data_only and args.profile:
        p.error("--profile profiles the training step, which --data_only leaves out: give one")
    if args.json:  # before any model is built
        with errors_as_one_line((OSError,), ranks_started=False):
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
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
        batch = ds_config["train_micro_batch_size_per_gpu"]
        if args.data_only:
            with errors_as_one_line(BAD_INPUT + (DataError,)):
                text, rows = pipeline_table(cfg, batch, args.images, args.warmup, args.steps,
                                            folder)
            dist.print_main(text)
            write_json(args.json, {"data_only": True, "batch_per_rank": batch, "rows": rows})
            return
        method = build_method(cfg)
        if not given_init:
            write_stand_in(method, cfg, stand_in)
        bench_step(args, cfg, ds_config, method)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_step(args, cfg, ds_config: dict, method) -> None:
    """Time the official-style step, then lgp_ds's (and profile it with ``--profile``); print
    the table and write ``--json``."""
    batch, stage = ds_config["train_micro_batch_size_per_gpu"], \
        ds_config.get("zero_optimization", {}).get("stage", 0)
    # whole optimizer steps: both steps update at their accumulation boundary only
    gas = ds_config["gradient_accumulation_steps"]
    steps, warmup = (-(-n // gas) * gas for n in (args.steps, args.warmup))
    device = torch.device(deepspeed.get_accelerator().current_device_name())
    peak = matmul_peak_tflops()
    rows = []
    with errors_as_one_line():  # what the model refuses of the config, as the Trainer's below
        flops = flops_per_image(method, cfg)
        views, labels = synthetic_batch(method, cfg, batch, device)
        if not args.no_reference:
            with torch.no_grad():  # the float views the model takes, made once
                float_views = method.device_views(tuple(views))
            rows.append(row("official style (fp16 autocast, unfused attention, torch AdamW)",
                            time_reference(cfg, float_views, labels, steps, warmup, gas),
                            batch, flops, peak))
    with errors_as_one_line():
        trainer = Trainer(cfg, ds_config, method, with_data=False)
    rows.insert(0, row(f"lgp_ds (ZeRO {stage}, {precision(ds_config)}, {cfg.optimizer})",
                       time_trainer(trainer, views, labels, steps, warmup),
                       batch, flops, peak))
    profile, report = None, ""
    if args.profile:  # after the timed steps; a profiled step is a whole optimizer step
        def optimizer_step():
            for _ in range(gas):
                trainer.train_step(*views, labels=labels)
        profile, report = profile_step(optimizer_step, args.profile, steps=3, warmup=1)
    world = dist.get_world_size()
    head = (f"{cfg.method} {cfg.arch} {cfg.img_size}px batch {batch}/rank x {world} rank(s) on "
            f"{device_name()}; bf16 matmul peak {peak:.1f} TFLOP/s (measured), "
            f"{flops / 1e9:.3g} GFLOP per image; {steps} timed micro-batches after {warmup}, "
            f"accumulation {gas}")
    dist.print_main(head + "\n" + table(rows) + ("\n\n" + report if report else ""))
    write_json(args.json, {"method": cfg.method, "arch": cfg.arch, "img_size": cfg.img_size,
                           "batch_per_rank": batch, "zero_stage": stage,
                           "precision": precision(ds_config), "bf16_matmul_peak_tflops": peak,
                           "flops_per_image": flops, "micro_batches": steps, "warmup": warmup,
                           "gradient_accumulation_steps": gas, "rows": rows, "profile": profile})


def write_json(path: str | None, results: dict) -> None:
    """Write ``results`` to ``path`` (rank 0; none without ``--json``) with the command, device,
    ranks and versions."""
    if path and dist.is_main():
        record = {"command": sys.argv, "device": device_name(), "ranks": dist.get_world_size(),
                  "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                  "timm": timm.__version__, **results}
        with open(path, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
