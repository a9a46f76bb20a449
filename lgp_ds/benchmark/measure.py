"""Timing a step on the device: warm-up, synchronised timers, peak memory, and the matmul peak
that MFU is measured against in the same run."""
import time
from collections.abc import Callable

import torch
from deepspeed.accelerator import get_accelerator

from lgp_ds import dist


def device_name() -> str:
    """The card's name (``NVIDIA H100 80GB HBM3``), else the accelerator's (``cpu``)."""
    device = get_accelerator().device_name()
    return torch.cuda.get_device_name() if device == "cuda" else device


def time_step(step: Callable[[], object], steps: int, warmup: int) -> dict:
    """{"seconds": per step, "peak_memory_gib"} of ``step()`` run ``steps`` times after ``warmup``
    calls, timed between device synchronisations (a collective where ranks step together).

    Peak memory is the accelerator's ``max_memory_allocated`` over warm-up and timed steps: on a
    GPU, the tensors' peak; on the CPU accelerator, the process's resident memory."""
    acc = get_accelerator()
    acc.empty_cache()
    acc.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    acc.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    acc.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"seconds": seconds, "peak_memory_gib": acc.max_memory_allocated() / 2 ** 30}


def matmul_peak_tflops(dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> float:
    """TFLOP/s of a large square matmul in ``dtype`` on this device: the attainable peak that
    MFU divides by (a datasheet's figure is not reached by any kernel). 8192 wide on a GPU; 1024
    on the CPU, where a wider one takes seconds."""
    acc = get_accelerator()
    n = 8192 if acc.device_name() == "cuda" else 1024
    a = torch.randn(n, n, device=acc.current_device_name(), dtype=dtype)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    acc.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    acc.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12
