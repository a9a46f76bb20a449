"""A run's folder: ``config.yaml``, ``ds_config.json``, ``metrics.jsonl`` and ``checkpoints/``.

One folder holds one run. A second run started into it without ``resume=``, or resuming another
folder's checkpoint, is refused (it would append to the first run's metrics and mix its
checkpoints with them); a resumed run keeps one metrics record per step by dropping the records
logged after the checkpoint it resumes from.
"""
import json
import os

import yaml

from lgp_ds import dist
from lgp_ds.atomic import write_text

from .monitoring import monitor_events

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def _previous_run(output_dir: str) -> list[str]:
    """What in ``output_dir`` shows that a run already wrote there."""
    found = []
    if os.path.isfile(os.path.join(output_dir, METRICS)):
        found.append(METRICS)
    ckpts = os.path.join(output_dir, CHECKPOINTS)
    if os.path.isdir(ckpts) and os.listdir(ckpts):
        found.append(CHECKPOINTS + "/")
    return found


def _own_checkpoint(resume: str, output_dir: str) -> bool:
    """Whether ``resume`` names ``output_dir``'s own checkpoints (or is ``auto``)."""
    if resume == "auto":
        return True
    own = os.path.realpath(os.path.join(output_dir, CHECKPOINTS))
    return os.path.commonpath([os.path.realpath(resume), own]) == own


def _problem(cfg) -> str | None:
    """Why ``cfg.output_dir`` cannot take this run, or None (then it exists)."""
    found = _previous_run(cfg.output_dir)
    if found and cfg.resume is None:
        return (f"output_dir={cfg.output_dir} already holds a run ({', '.join(found)}): continue "
                f"it with resume=auto, or give a new output_dir")
    if found and not _own_checkpoint(cfg.resume, cfg.output_dir):
        return (f"output_dir={cfg.output_dir} already holds a run ({', '.join(found)}), and "
                f"resume={cfg.resume} is another run's checkpoint: continuing it here would mix "
                f"the two runs' records and checkpoints; give a new output_dir")
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
    except OSError as e:
        return f"output_dir={cfg.output_dir}: cannot create it ({e.strerror})"
    return None


def prepare(cfg) -> None:
    """Collective: make sure ``cfg.output_dir`` exists and may take this run.

    Raises ValueError on every rank when the folder already holds a run that this one does not
    resume, or cannot be created.
    """
    problem = dist.broadcast_object(_problem(cfg) if dist.is_main() else None)
    if problem:
        raise ValueError(problem)


def write_configs(cfg, ds_config: dict) -> None:
    """Rank 0: the resolved ``config.yaml`` and ``ds_config.json`` (once the run is accepted:
    a refused resume leaves the run's files as they were)."""
    if dist.is_main():
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        with open(os.path.join(cfg.output_dir, "ds_config.json"), "w") as f:
            json.dump(ds_config, f, indent=2)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step, written by rank 0; and the same
    values to DeepSpeed's ``monitor`` (the engine's MonitorMaster: TensorBoard, W&B, CSV, Comet
    as the DeepSpeed config enables them), where there is one."""

    def __init__(self, output_dir: str, monitor=None):
        self.path = os.path.join(output_dir, METRICS)
        self.monitor = monitor

    def append(self, record: dict, samples: int, evaluated=()) -> None:
        """Log ``record``, made after ``samples`` samples of training; its keys named in
        ``evaluated`` go to the monitor as evaluations."""
        if not dist.is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.monitor is not None and self.monitor.enabled:
            self.monitor.write_events(monitor_events(record, samples, evaluated))

    def has(self, step: int) -> bool:
        """Collective: whether a record of ``step`` was logged (rank 0 reads the file)."""
        found = None
        if dist.is_main() and os.path.isfile(self.path):
            with open(self.path) as f:
                found = any(_step(line) == step for line in f)
        return bool(dist.broadcast_object(found))

    def truncate(self, last_step: int) -> None:
        """Drop the records after ``last_step`` (logged by an interrupted run after its last
        checkpoint, and about to be logged again by the resumed run)."""
        if not dist.is_main() or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if _step(line) is not None and _step(line) <= last_step]
        write_text(self.path, "".join(kept))


def _step(line: str) -> int | None:
    """The step of a metrics line; None for a line torn by a crash while it was written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
