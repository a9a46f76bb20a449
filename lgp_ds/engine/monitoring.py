"""What a run reports besides ``metrics.jsonl``: DeepSpeed's monitors, memory, a progress bar.

- DeepSpeed's monitor (``engine.monitor``, a ``deepspeed.monitor.monitor.MonitorMaster`` that the
  engine builds from the DeepSpeed config's ``tensorboard``, ``wandb``, ``csv_monitor`` and
  ``comet`` sections and that writes on global rank 0 only) receives every metrics record as
  ``(name, value, samples)`` events: training values as ``Train/<key>``, evaluations as
  ``Eval/<key>``, nested values flattened (``Train/lr/stage3``), all at the samples trained on
  so far, the x axis of DeepSpeed's own events (``Train/Samples/lr``): W&B refuses a step
  lower than one already logged, so the two must share it.
- Peak accelerator memory since the previous record, through DeepSpeed's accelerator.
- A tqdm bar of the optimizer steps on rank 0 when its output is a terminal; the log lines then
  print above it. Piped to a file there is no bar, only the log lines.
- :class:`Meter`: the mean loss and throughput between two log lines, kept on the device.
"""
import importlib.util
import sys
import time

import torch
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from lgp_ds import dist

# DeepSpeed config section -> the package its monitor imports (deepspeed/monitor/*.py)
MONITOR_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet": "comet_ml"}


def check_monitor_packages(ds_config: dict) -> None:
    """Raise ValueError naming the package that an enabled monitor of ``ds_config`` lacks.

    DeepSpeed would raise ImportError on rank 0 alone, while building the engine, with a
    traceback; this fails every rank alike before anything is built."""
    for section, package in MONITOR_PACKAGES.items():
        if ds_config.get(section, {}).get("enabled") and importlib.util.find_spec(package) is None:
            raise ValueError(f"DeepSpeed config section {section!r} is enabled but the package "
                             f"{package!r} is not installed: pip install {package}, or remove the "
                             f"section")


def monitor_events(record: dict, samples: int, evaluated=()) -> list[tuple[str, float, int]]:
    """The ``(name, value, samples)`` events of a metrics ``record`` for DeepSpeed's monitor.

    Keys named in ``evaluated`` become ``Eval/<key>``, the others ``Train/<key>``; dict values
    (the per-group ``lr``) give one event per entry (``Train/lr/stage3``); ``step`` is an event
    like the others; values that are not numbers are left out."""
    def events(prefix: str, value) -> list:
        if isinstance(value, dict):
            return [e for k, v in value.items() for e in events(f"{prefix}/{k}", v)]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [(prefix, value, samples)]
        return []

    return [e for key, value in record.items()
            for e in events(f"{'Eval' if key in evaluated else 'Train'}/{key}", value)]


def peak_memory_gib(device) -> float:
    """Collective: the most memory allocated on the accelerator since the previous call (since
    the start at the first), max over ranks, in GiB; the peak counter is reset.

    On GPUs torch's ``max_memory_allocated`` (tensors only, not the allocator's cache). DeepSpeed's
    CPU accelerator answers with the process's resident memory, sampled when asked."""
    accelerator = get_accelerator()
    peak = torch.tensor([accelerator.max_memory_allocated() / 2 ** 30], device=device)
    accelerator.reset_peak_memory_stats()
    return float(dist.all_reduce_max(peak).item())


class Progress:
    """Rank 0's view of the optimizer steps: a tqdm bar on a terminal, nothing otherwise.

    :meth:`line` prints a log line (above the bar where there is one); :meth:`update` moves the
    bar to a step. Other ranks print nothing."""

    def __init__(self, step: int, last_step: int):
        self.main = dist.is_main()
        self.bar = (tqdm(total=last_step, initial=step, unit="step", dynamic_ncols=True,
                         file=sys.stdout) if self.main and sys.stdout.isatty() else None)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        elif self.main:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Meter:
    """Mean loss (and loss terms) and throughput over the micro-batches since the last log line.

    Sums stay on the device: nothing waits for the GPU until a line is logged."""

    def __init__(self):
        self.start, self.sums, self.n, self.images = time.perf_counter(), {}, 0, 0

    def add(self, out: dict, batch: int) -> None:
        for name, value in {"loss": out["loss"], **out["terms"]}.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.float()
        self.n, self.images = self.n + 1, self.images + batch

    def pop(self) -> dict:
        now = time.perf_counter()
        window = {"means": {n: s / self.n for n, s in self.sums.items()}, "images": self.images,
                  "seconds": max(now - self.start, 1e-9)}
        self.start, self.sums, self.n, self.images = now, {}, 0, 0
        return window
