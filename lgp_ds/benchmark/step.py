"""The training step benchmark: lgp_ds's real trainer step and the official-style baseline
(:mod:`.reference`) on the same synthetic, device-resident batch, as rows of one table."""
import gc
from functools import partial

import torch
from deepspeed.accelerator import get_accelerator

from lgp_ds import dist
from lgp_ds.models.vit import MAE_ONLY_PREFIXES

from .flops import sample_views
from .measure import time_step
from .reference import OfficialStyleStep


def synthetic_batch(method, cfg, n: int, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(views, labels) of ``n`` random images as ``method``'s transform makes them (float views,
    or uint8 crops with ``augment_on=device``) on ``device``, and random labels [n] (fine-tuning
    trains on them; pre-training ignores them) on the host, where the loader gives them (the
    trainer checks them there)."""
    shape = (n, 3, cfg.img_size, cfg.img_size)
    views = [torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
             if v.dtype == torch.uint8 else torch.randn(shape, device=device)
             for v in sample_views(method, cfg.img_size)]
    return views, torch.randint(0, cfg.num_classes, (n,))


def write_stand_in(method, cfg, path: str) -> None:
    """Write the encoder's initial weights (what ``cfg.seed`` gives) as an MAE file: the ``init=``
    of a benchmark (the step costs the same whatever the weights)."""
    torch.manual_seed(cfg.seed)
    encoder = method.encoder(method.build_model())
    torch.save({"model": {k: v for k, v in encoder.state_dict().items()
                          if not k.startswith(("head.",) + MAE_ONLY_PREFIXES)}}, path)


def row(name: str, timing: dict, batch: int, flops_per_image: float,
        peak_tflops: float) -> dict:
    """One table row from :func:`lgp_ds.benchmark.measure.time_step`'s timing of a step of
    ``batch`` images per device (img/s summed over ranks)."""
    tflops = flops_per_image * batch / timing["seconds"] / 1e12
    return {"name": name, "img_per_s": dist.get_world_size() * batch / timing["seconds"],
            "ms_per_step": 1e3 * timing["seconds"], "tflops_per_device": tflops,
            "mfu_percent": 100 * tflops / peak_tflops,
            "peak_memory_gib": timing["peak_memory_gib"]}


def time_reference(cfg, views, labels, steps: int, warmup: int, accumulation: int) -> dict:
    """Timing of the official-style step on float ``views`` with lgp_ds's ``accumulation``; its
    model is freed afterwards, so that lgp_ds's step measured next has the device to itself."""
    reference = OfficialStyleStep(cfg, get_accelerator().current_device_name(), accumulation)
    timing = time_step(partial(reference.step, views, labels), steps, warmup)
    del reference
    gc.collect()
    get_accelerator().empty_cache()
    return timing


def time_trainer(trainer, views, labels, steps: int, warmup: int) -> dict:
    """Timing of :meth:`Trainer.train_step` (views as the transform makes them)."""
    return time_step(lambda: trainer.train_step(*views, labels=labels), steps, warmup)


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table, each with its speed as a multiple of the last row's."""
    base = rows[-1]["img_per_s"]
    lines = ["| step | img/s | ms/step | TFLOP/s per device | MFU | peak memory | "
             "vs the last row |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['img_per_s']:.1f} | {r['ms_per_step']:.1f} | "
              f"{r['tflops_per_device']:.2f} | {r['mfu_percent']:.1f}% | "
              f"{r['peak_memory_gib']:.2f} GiB | {r['img_per_s'] / base:.2f}x |" for r in rows]
    return "\n".join(lines)
