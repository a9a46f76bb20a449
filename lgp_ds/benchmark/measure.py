"""Timing a step on the device: warm-up, synchronised timers, peak memory, the matmul peak
that MFU is measured against in the same run, and a profile of the step (where its time goes)."""
import json
import os
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function
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


# Host calls that wait for the device. cudaMemcpy blocks whatever its direction; a
# cudaMemcpyAsync is counted when its copy goes from the device to pageable host memory (the
# host waits for what it reads), not to pinned memory (a non_blocking copy, read after an event).
# The fault check's one cudaEventSynchronize per optimizer step (lgp_ds.engine.faults) is a wait
# by design, placed where the device has long passed it.
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy")
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # the trace's categories of device time
STEP_LABEL = "lgp_ds step"


def profile_step(step: Callable[[], object], folder: str, steps: int = 3,
                 warmup: int = 1) -> tuple[dict, str]:
    """Run ``step()`` ``warmup`` times, then ``steps`` times under ``torch.profiler`` (CPU, and
    CUDA where there is a GPU); write the Chrome trace ``folder/trace_rank{R}.json`` and return
    ({"steps", "wall_ms", "device_busy_ms", "syncs", "syncs_by_call", "trace"}, a report).

    Per step: ``wall_ms``, host time between device synchronisations around the profiled steps
    (the profiler's overhead included: the timed figure is the one without it); from the trace,
    ``device_busy_ms``, the union of the intervals of kernels, copies and memsets on the device
    (overlapping ones, e.g. on two streams, count once; a collective's kernel counts while it
    waits for the other ranks), so that wall - busy is the time the device sat idle, waiting for
    the host; ``syncs``, the host calls inside the steps that wait for the device
    (:data:`HOST_WAITS`, cudaMemcpyAsync to pageable memory): each stalls the host until the device
    drains, so the next kernels are launched late. A blocking ``.item()`` is one DtoH copy plus
    the cudaStreamSynchronize that waits for it: it counts twice, which ``syncs_by_call`` shows.
    Without a GPU the device figures are None. The report: the top 15 ops by self device time
    (self CPU time without a GPU) and the per-step line."""
    acc = get_accelerator()
    gpu = torch.cuda.is_available()
    for _ in range(warmup):
        step()
    acc.synchronize()
    dist.barrier()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        start = time.perf_counter()
        for i in range(steps):
            with record_function(f"{STEP_LABEL} {i}"):
                step()
        acc.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - start) / steps
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"trace_rank{dist.get_rank()}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    summary = {"steps": steps, "wall_ms": wall_ms, "device_busy_ms": None, "syncs": None,
               "syncs_by_call": None, "trace": path}
    if gpu:
        summary["device_busy_ms"] = busy_us(events) / 1e3 / steps
        by_call = host_waits(events)
        summary["syncs_by_call"] = {k: v / steps for k, v in by_call.items()}
        summary["syncs"] = sum(by_call.values()) / steps
    sort_by, by = ("self_device_time_total", "device") if gpu else ("self_cpu_time_total", "CPU")
    lines = [f"profile of lgp_ds's step: {steps} steps after {warmup} under torch.profiler; "
             f"the top 15 ops by self {by} time (all steps); trace {path}",
             prof.key_averages().table(sort_by=sort_by, row_limit=15)]
    if gpu:
        calls = ", ".join(f"{k} {v:.1f}" for k, v in summary["syncs_by_call"].items())
        lines.append(f"per step: wall {wall_ms:.1f} ms, device busy "
                     f"{summary['device_busy_ms']:.1f} ms (kernels, copies, memsets; overlaps "
                     f"merged), idle {wall_ms - summary['device_busy_ms']:.1f} ms; host waits "
                     f"for the device {summary['syncs']:.1f} ({calls or 'none'}; a blocking "
                     f".item() is one DtoH copy and one stream sync)")
    else:
        lines.append(f"per step: wall {wall_ms:.1f} ms (device busy time and host-device "
                     f"synchronisations are counted on a GPU only)")
    return summary, "\n".join(lines)


def busy_us(events: list[dict]) -> float:
    """Microseconds in which the device ran at least one kernel, copy or memset: the union of
    the trace's device intervals."""
    busy, end = 0.0, float("-inf")
    for ts, dur in sorted((e["ts"], e["dur"]) for e in events if e.get("cat") in DEVICE_WORK):
        busy += max(0.0, ts + dur - max(ts, end))
        end = max(end, ts + dur)
    return busy


def host_waits(events: list[dict]) -> dict[str, int]:
    """{call: count} of the host calls inside the steps' spans that wait for the device (the
    window's own closing synchronisation is outside them). A cudaMemcpyAsync's direction and
    host memory are its device-side copy's, matched by correlation id."""
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events
             if e.get("cat") == "user_annotation" and e["name"].startswith(STEP_LABEL)]
    dtoh = {e.get("args", {}).get("correlation") for e in events  # "(Device -> Pageable)"
            if e.get("cat") == "gpu_memcpy" and "DtoH" in e["name"] and "Pageable" in e["name"]}
    counts: dict[str, int] = {}
    for e in events:
        name = e["name"]
        if name == "cudaMemcpyAsync" and e.get("args", {}).get("correlation") in dtoh:
            name = "cudaMemcpyAsync DtoH"
        elif name not in HOST_WAITS:
            continue
        if any(a <= e["ts"] <= b for a, b in spans):
            counts[name] = counts.get(name, 0) + 1
    return counts
