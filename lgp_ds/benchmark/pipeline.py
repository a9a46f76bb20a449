"""Throughput of this rank's input pipeline (``tools/bench.py --data_only``): shards -> decode ->
views -> batches, for MoCo v3's two views and MAE's one, made by torchvision on the CPU, as crops
on the CPU whose photometric rest runs on the device (``augment_on=device``), and by DALI where it
is installed (``input_backend=dali``)."""
import os
import time

import torch
from deepspeed.accelerator import get_accelerator

from lgp_ds.config import dali_installed
from lgp_ds.data.photos import write_photo_shards
from lgp_ds.data.pipeline import build_train_data
from lgp_ds.methods import build_method

from .measure import device_name


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


def _row(views: str, made_by: str, rate: float, base: float | None, workers: int) -> dict:
    """One row: the rate, and where DataLoader workers made it (``base`` given) per worker and
    as a multiple of torchvision's ``base``."""
    return {"views": views, "made_by": made_by, "img_per_s": rate,
            "img_per_s_per_worker": None if base is None else rate / workers,
            "vs_torchvision": None if base is None else rate / base}


def _line(r: dict) -> str:
    worker, vs = r["img_per_s_per_worker"], r["vs_torchvision"]
    return (f"| {r['views']} | {r['made_by']} | {r['img_per_s']:.1f} | "
            + ("| |" if vs is None else f"{worker:.1f} | {vs:.2f}x |"))


def pipeline_table(cfg, batch: int, images: int, warmup: int, steps: int,
                   folder: str) -> tuple[str, list[dict]]:
    """The input pipeline's table (Markdown, see the module) for MoCo v3's and MAE's views, from
    ``cfg.data``'s shards or ``images`` photo-like JPEGs written into ``folder``, and its rows."""
    source = f"data={cfg.data}"
    if cfg.data is None:
        cfg.data = [write_photo_shards(folder, images, max(8, cfg.num_workers))]
        source = f"{images} photo-like 500x375 JPEGs (lgp_ds.data.photos)"
    device = device_name()
    workers = max(1, cfg.num_workers)  # without workers, this process is the one
    rows = []
    for name, views in (("moco", "MoCo v3, 2 views"), ("mae", "MAE, 1 view")):
        plain, fast = (cfg.model_copy(update={"method": name, "augment_on": where})
                       for where in ("cpu", "device"))
        method = build_method(fast)  # its views; its transform is the crops
        base, _ = pipeline_rate(plain, build_method(plain), batch, warmup, steps)
        rate, crops = pipeline_rate(fast, method, batch, warmup, steps)
        on_device = device_rate(method, crops, warmup, steps)
        rows += [_row(views, "torchvision (CPU)", base, base, workers),
                 _row(views, "crops (CPU)", rate, base, workers),
                 _row(views, f"+ the rest ({device})", on_device, None, workers)]
        if dali_installed():  # its crops, made where input_backend=dali makes them
            dali = fast.model_copy(update={"input_backend": "dali"})
            rate, _ = pipeline_rate(dali, method, batch, warmup, steps)
            where = "nvJPEG, GPU" if torch.cuda.is_available() else "CPU"
            rows.append(_row(views, f"DALI crops ({where})", rate, base, workers))
    lines = [f"input pipeline of one rank: {source}, {cfg.img_size} px views, batches of {batch}, "
             f"{cfg.num_workers} DataLoader workers on {len(os.sched_getaffinity(0))} CPU "
             f"cores; device part on {device}",
             "| views | made by | img/s | img/s per worker | vs torchvision |",
             "|---|---|---:|---:|---:|"] + [_line(r) for r in rows]
    return "\n".join(lines), rows
