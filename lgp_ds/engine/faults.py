"""What ends a run on a cluster, and how lgp_ds makes each end cleanly.

- A non-finite loss (any micro-batch, any rank) or non-finite gradients: the optimizer step is
  skipped on every rank alike (no update, no LR step, no momentum EMA; ``skipped_steps`` as for
  DeepSpeed's own skips) and counted (``nonfinite_steps``); no checkpoint is written while such
  steps run in a row (the newest checkpoint, which ``resume=auto`` takes, stays one from
  before), and after more than ``max_nonfinite_steps`` in a row the run stops with
  :class:`NonFiniteError`. The skipped steps' forward passes still update BatchNorm running
  statistics (only eval mode reads them). fp16 loss-scale overflows with a finite loss are
  DeepSpeed's own business, not counted here. Who finds non-finite gradients:

  - DeepSpeed in fp16 (its loss scaler), under ZeRO 3 and under ZeRO 0 in bf16 (through the
    gradient norm), in its BF16_Optimizer (bf16 ZeRO 1 with fp32 accumulation), and under ZeRO
    1/2 while its config asks it to (``bf16.check_grad_overflow``; outside bf16,
    ``zero_optimization.compute_grad_norm``), with several kernels per tensor and a wait;
  - lgp_ds where a ZeRO 1/2 config turns both off, as the shipped ones do, and under fp32
    ZeRO 0, where DeepSpeed steps the torch optimizer without a look at the gradients
    (:func:`lgp_ds_checks_gradients`), with one fused norm over the rank's gradients; ZeRO 1/2
    with ``offload_optimizer`` and DeepSpeed's check off would be unchecked, and is refused.
- SIGTERM (SLURM pre-emption, ``scancel``, the deepspeed launcher ending its children): the
  handler only sets a flag; every rank learns of it at the next optimizer step through the same
  all-reduce, so all stop at the same step, save a checkpoint and exit with status 0.
- A rank that dies or hangs: the others fail in their next collective (a closed connection at
  once, a hang after ``collective_timeout_s``); :func:`collective_errors` turns that into
  :class:`CollectiveError`, naming the collective and the timeout.

Each optimizer step costs one all-reduce of two numbers, started after the boundary
micro-batch's forward pass, and one wait for its result on the host after the backward pass is
queued, when the device has long finished the forward: the device never idles for it. Checking
gradients costs one more all-reduce (of one number) and a wait for the end of the backward
pass, which DeepSpeed's ZeRO 1/2 (with ``overlap_comm``) waits for anyway.
"""
import contextlib
import os
import signal
import sys
import threading
import traceback

import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from lgp_ds import dist


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class CollectiveError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or lost its connection."""


@contextlib.contextmanager
def collective_errors(timeout_s: float):
    """Re-raise a lost peer or a timeout of a torch.distributed collective inside the block as
    :class:`CollectiveError` naming the collective (gloo raises a bare RuntimeError from its
    transport, NCCL a DistBackendError). Other errors (a bug) keep their traceback."""
    try:
        yield
    except RuntimeError as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if f"torch{os.sep}distributed{os.sep}" in f.filename]
        transport = isinstance(e, torch.distributed.DistError) or "gloo/transport" in str(e)
        if not (frames and transport):
            raise
        where = next((f.name for f in reversed(frames) if f.name != "wrapper"), "collective")
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveError(
            f"collective {where} failed on rank {dist.get_rank()}: another rank died, hung for "
            f"more than collective_timeout_s={timeout_s:g} s or lost its connection (its log "
            f"says which; continue with resume=auto): {message}") from e


def lgp_ds_checks_gradients(optimizer) -> bool:
    """Whether lgp_ds must find non-finite gradients itself under the DeepSpeed engine's
    ``optimizer`` (``engine.optimizer``): the torch optimizer itself (fp32 ZeRO 0, where no
    DeepSpeed wrapper looks at the gradients), or a ZeRO 1/2 optimizer on the device whose own
    checks are off. That one checks them when ``check_grad_overflow`` is on (bf16 by the config,
    fp16 always) and, outside bf16, through the gradient norm it computes unless
    ``compute_grad_norm`` is off. The gradients are :func:`lgp_ds.engine.master.step_gradients`."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return True
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    return not (optimizer.check_grad_overflow
                or optimizer.compute_grad_norm and optimizer.dtype != torch.bfloat16)


class FaultGuard:
    """Per optimizer step: the non-finite check, the skip, and the stop request, for all ranks.

    Use: :meth:`watch` each micro-batch's loss before its backward pass; at the accumulation
    boundary, after the backward pass, ``bad, stop = guard.flags()`` (and, where lgp_ds checks
    gradients, :meth:`nonfinite_gradients`), ``with guard.skip_if(bad, engine): engine.step()``,
    then :meth:`count`.
    """

    def __init__(self, max_nonfinite_steps: int, stop_grace_s: float, device):
        self.max_nonfinite_steps = max_nonfinite_steps
        self.stop_grace_s = stop_grace_s  # how long a process asked to stop may take to end
        self.device = torch.device(device)
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=device)  # since the last step
        self._flags = None  # this step's [bad, stop] on the host, once watch() saw its boundary
        self._flags_copied = None  # on a GPU: the event of their copy to the host
        self._pinned = {}  # on a GPU: name -> (pinned host buffer, event of the copy into it)
        self.nonfinite_steps = 0  # over the whole run
        self.nonfinite_in_a_row = 0
        self.stop_requested = False  # this process got SIGTERM
        self._previous = None  # the SIGTERM handler before install()
        self._deadline = None  # the timer that ends a process asked to stop that does not

    # -- SIGTERM -------------------------------------------------------------------------------
    def install(self) -> None:
        """Catch SIGTERM until :meth:`uninstall` (Python lets the main thread only do so)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def uninstall(self) -> None:
        """Put the previous SIGTERM handler back and cancel the stop's deadline: the run ended
        (stopped with its checkpoint, or finished) and the process may go on."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:
            return
        self.stop_requested = True
        print(f"rank {dist.get_rank()}: got {signal.Signals(signum).name}: stopping after this "
              f"step with a checkpoint (or in {self.stop_grace_s:g} s regardless)",
              file=sys.stderr, flush=True)
        # A rank stuck in Python code (a peer that hung, data that never comes) must not outlive
        # its job. Ends with status 1; the launchers kill it after their own grace anyway.
        self._deadline = threading.Timer(self.stop_grace_s, lambda: os._exit(1))
        self._deadline.daemon = True
        self._deadline.start()

    # -- non-finite steps ----------------------------------------------------------------------
    def watch(self, loss: torch.Tensor, boundary: bool) -> None:
        """Note whether this micro-batch's loss (a scalar) is finite; at the accumulation
        ``boundary`` (collective) start reducing the step's flags over the ranks. Call it before
        the backward pass: nothing here waits for the device, and :meth:`flags` finds the result
        ready once the backward pass is queued."""
        self.bad_loss |= ~torch.isfinite(loss.detach())
        if not boundary:
            return
        # torch.full, not torch.tensor: a copy from the host would wait for the device
        stop = torch.full((), int(self.stop_requested), dtype=torch.int64, device=self.device)
        local = dist.all_reduce_max(torch.stack([self.bad_loss.to(torch.int64), stop]))
        self.bad_loss = torch.zeros_like(self.bad_loss)
        self._flags, self._flags_copied = self._copy_to_host("flags", local)

    def _copy_to_host(self, name: str, values: torch.Tensor):
        """(host tensor, event or None): ``values`` copied to the host behind the work queued so
        far, without waiting: on a GPU into a pinned buffer kept under ``name``, whose event
        tells when the copy is done (waiting on it does not wait for later work, as
        ``.item()`` would)."""
        if self.device.type != "cuda":
            return values, None
        if name not in self._pinned:
            self._pinned[name] = (torch.empty(values.shape, dtype=values.dtype, pin_memory=True),
                                  torch.cuda.Event())
        host, copied = self._pinned[name]
        host.copy_(values, non_blocking=True)
        copied.record()
        return host, copied

    def flags(self) -> tuple[bool, bool]:
        """At the accumulation boundary, after :meth:`watch` of its micro-batch: (some rank's loss
        of this step was not finite, some rank was asked to stop), the same on every rank."""
        if self._flags_copied is not None:
            self._flags_copied.synchronize()
        bad, stop = (bool(v) for v in self._flags.tolist())
        return bad, stop

    @torch.no_grad()
    def nonfinite_gradients(self, gradients: list[torch.Tensor]) -> bool:
        """Collective, at the accumulation boundary after the backward pass: whether some rank's
        ``gradients`` (its shards) hold a NaN or an infinity. One fused norm over them all
        (torch's get_total_norm: a few kernels), one all-reduce and one wait for the device. A
        norm beyond fp32's range (entries near 1e19) counts as non-finite too: no step survives
        such gradients either."""
        if gradients:
            norm = torch.nn.utils.get_total_norm(gradients).to(self.device)
        else:  # a rank may own no gradient of any group
            norm = torch.zeros((), device=self.device)
        bad = dist.all_reduce_max((~torch.isfinite(norm)).to(torch.int64).reshape(1))
        host, copied = self._copy_to_host("gradients", bad)
        if copied is not None:
            copied.synchronize()
        return bool(host[0])

    @contextlib.contextmanager
    def skip_if(self, bad: bool, engine):
        """Around ``engine.step()``: with ``bad``, the step leaves the weights, optimizer state
        and LR schedule as they were and counts as skipped (``engine.skipped_steps``,
        ``was_step_applied() == False``), as DeepSpeed's own overflow skip does. DeepSpeed's
        optimizer wrappers (ZeRO, bf16/fp16) still run around a no-op update of the torch
        optimizer, so their gradient buffers are cleared as after any step."""
        if not bad:
            yield
            return
        optimizer, wrapper = engine.basic_optimizer, engine.optimizer
        scheduler = engine.lr_scheduler
        schedule, lrs = scheduler.state_dict(), [g["lr"] for g in scheduler.optimizer.param_groups]
        # The LR scheduler's own wrapper of step() on the instance, if any, comes back after.
        own_step = optimizer.__dict__.get("step")
        # DeepSpeed's ZeRO 1/2 and BF16 optimizers link their state to the parameters once, at
        # the first step that runs the torch optimizer: before a first real step, the no-op one
        # would link an empty state for good.
        linked = getattr(wrapper, "_hp_optimizer_states_linked", None)

        def no_update(*args, **kwargs):  # shadows the class's step for this call
            optimizer._opt_called = True  # as torch's LR-scheduler wrapper of step() records
        no_update._wrapped_by_lr_sched = True  # what that wrapper carries (else: a warning)
        optimizer.step = no_update
        try:
            yield
        finally:
            if own_step is None:
                del optimizer.step
            else:
                optimizer.step = own_step
            if linked is not None:
                wrapper._hp_optimizer_states_linked = linked
        if engine.was_step_applied():  # DeepSpeed did not see it (fp32, bf16 without the check)
            engine.skipped_steps += 1
            engine._step_applied = False  # what was_step_applied() reports
            scheduler.load_state_dict(schedule)
            for group, lr in zip(scheduler.optimizer.param_groups, lrs):
                group["lr"] = lr

    def count(self, bad: bool, bad_gradients: bool, step: int) -> None:
        """Count the step just taken; NonFiniteError once more than ``max_nonfinite_steps`` in a
        row were non-finite (``bad``: the loss; ``bad_gradients``: the gradients, as lgp_ds or
        DeepSpeed outside fp16 found them)."""
        if not (bad or bad_gradients):
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        dist.print_main(f"step {step}: non-finite {'loss' if bad else 'gradient'}, step skipped "
                        f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_steps} in all)")
        if self.nonfinite_in_a_row > self.max_nonfinite_steps:
            raise NonFiniteError(
                f"step {step}: {self.nonfinite_in_a_row} optimizer steps in a row had a "
                f"non-finite loss or gradient (more than max_nonfinite_steps="
                f"{self.max_nonfinite_steps}): the run stops without saving; the last checkpoint "
                f"holds the state before them (lower the LR or check the data, then resume=auto)")

    def state_dict(self) -> dict:
        return {"nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict | None) -> None:
        self.nonfinite_steps = (state or {}).get("nonfinite_steps", 0)

