"""The training entry point (``lgp_ds.launch.main``) with faults injected, for
tests/test_faults.py to launch with the deepspeed launcher. Test-only.

Each fault is ``$LGP_DS_FAULT_<KIND>="RANK:STEP[,STEP...]"``: on rank RANK, during optimizer
step STEP (the step ``engine.global_steps`` will count once it is taken):

- ``NAN``: the method's loss of that step's micro-batches becomes NaN (its gradients follow);
- ``KILL``: at the checkpoint of step STEP the rank writes its files, then SIGKILLs itself,
  so the checkpoint stays incomplete;
- ``HANG``: the rank writes the time to ``$LGP_DS_DUMP/hang_began`` and sleeps for 300 s
  before the step's forward pass;
- ``TERM``: the rank sends SIGTERM to its launcher (what ``scancel`` or SLURM pre-emption do).

Every rank appends ``(step, sum of |weights|)`` after each optimizer step to
``$LGP_DS_DUMP/weights<R>.txt`` (when set), to see which steps changed the weights.
"""
import os
import signal
import time

import torch

import lgp_ds.launch
from lgp_ds import dist
from lgp_ds.engine.trainer import Trainer


def _steps(kind: str) -> set[int]:
    """The steps at which fault ``kind`` hits this rank."""
    rank, _, steps = os.environ.get(f"LGP_DS_FAULT_{kind}", "-1:").partition(":")
    return {int(s) for s in steps.split(",") if s} if int(rank) == dist.get_rank() else set()


class FaultyTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan, self.kill = _steps("NAN"), _steps("KILL")
        self.hang, self.term = _steps("HANG"), _steps("TERM")
        loss = self.method.loss

        def poisoned_loss(*args, **kwargs):
            value, terms = loss(*args, **kwargs)
            if self.engine.global_steps + 1 in self.nan:
                value = value * float("nan")
            return value, terms
        self.method.loss = poisoned_loss
        save_checkpoint = self.engine.save_checkpoint

        def killed_after_writing(*args, **kwargs):
            result = save_checkpoint(*args, **kwargs)
            if self.engine.global_steps in self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        self.engine.save_checkpoint = killed_after_writing

    def train_step(self, *views, labels=None):
        step = self.engine.global_steps + 1
        if step in self.hang:
            with open(os.path.join(os.environ["LGP_DS_DUMP"], "hang_began"), "w") as f:
                f.write(repr(time.time()))
            time.sleep(300)
        if step in self.term:
            self.term.discard(step)
            os.kill(os.getppid(), signal.SIGTERM)
        out = super().train_step(*views, labels=labels)
        if out["boundary"] and os.environ.get("LGP_DS_DUMP"):
            total = sum(float(s.weight.abs().sum()) for s in self.slices)
            with open(os.path.join(os.environ["LGP_DS_DUMP"],
                                   f"weights{dist.get_rank()}.txt"), "a") as f:
                f.write(f"{self.engine.global_steps} {total!r}\n")
        return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    lgp_ds.launch.Trainer = FaultyTrainer  # what lgp_ds.launch.build_trainer builds
    lgp_ds.launch.main()
