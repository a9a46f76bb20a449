"""Resuming a checkpoint on another world size, through DeepSpeed's universal checkpoint.

ZeRO 1-3 save each rank's partition of the fp32 master weights and of Adam's moments
(``*optim_states.pt``, a file a rank); those files load only on the world size that wrote them
(ZeRO 0 without them keeps its whole optimizer state with the model, which loads on any).
DeepSpeed's ``ds_to_universal`` consolidates them into one folder per parameter
(``zero/NAME/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt`` and the step) that its optimizers
re-partition for any world size on load (``"checkpoint": {"load_universal": true}``). Here:

- :func:`convert` runs it once, on rank 0, into ``checkpoints/stepN/universal`` (written under a
  temporary name beside the tag and renamed into place with its own completion marker, so a
  crash leaves nothing half-written that looks usable; the next resume reuses it). The original
  files are never touched.
- :func:`load` loads that folder into a built engine and puts back what DeepSpeed's universal
  load leaves out or gets wrong for this trainer: the per-group hyperparameters (ZeRO 3 copies
  group 0's LR and weight decay into every group), the LR the scheduler gives the saved step,
  and the module's buffers (BatchNorm running statistics), which it does not load at all.

Frozen parameters are not in the optimizer: the engine built for the resume already holds them
(they come from the seed and the ``init=`` weights, which a resume must match).
"""
import argparse
import contextlib
import glob
import io
import json
import os
import shutil

import torch

UNIVERSAL = "universal"
MARKER = "lgp_ds_universal"


def folder(save_dir: str, tag: str) -> str:
    return os.path.join(save_dir, tag, UNIVERSAL)


def is_converted(save_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(folder(save_dir, tag), MARKER))


def leftovers(save_dir: str, tag: str) -> list[str]:
    """The working folders of conversions of ``tag`` that died before renaming theirs."""
    return glob.glob(os.path.join(save_dir, f".{tag}.{UNIVERSAL}.tmp*"))


def convert(save_dir: str, tag: str, world_size: int) -> str:
    """Rank 0 only: checkpoint ``tag`` (written by ``world_size`` ranks) as a universal
    checkpoint in ``save_dir/tag/universal``, unless it is there already; return that folder.

    DeepSpeed's converter also writes ``latest_universal`` beside its output folder: it works in
    a temporary folder next to the tag, so that file never lands in the checkpoint folder.
    """
    from deepspeed.checkpoint import ds_to_universal

    out = folder(save_dir, tag)
    if is_converted(save_dir, tag):
        return out
    for stale in leftovers(save_dir, tag):  # a conversion that died midway
        shutil.rmtree(stale, ignore_errors=True)
    work = os.path.join(save_dir, f".{tag}.{UNIVERSAL}.tmp{os.getpid()}")
    converted = os.path.join(work, tag)
    args = argparse.Namespace(input_folder=os.path.join(save_dir, tag), output_folder=converted,
                              num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    print(f"resume: converting {os.path.join(save_dir, tag)} ({world_size} ranks) to a "
          f"universal checkpoint in {out}", flush=True)
    # its progress lines and bars, one per parameter; failures are exceptions
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    with open(os.path.join(converted, MARKER), "w") as f:
        json.dump({"world_size": world_size}, f)
    os.rename(converted, out)  # the folder appears whole, marker included
    shutil.rmtree(work, ignore_errors=True)
    return out


def load(engine, save_dir: str, tag: str) -> dict:
    """Collective: restore ``engine`` (fp32 masters, Adam state, step, LR schedule, buffers) from
    the universal form of checkpoint ``tag`` (:func:`convert`); return the client state."""
    optimizer = engine.optimizer
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    # DeepSpeed reads the flag from its config when loading only; set for this load alone, as
    # the config key would make every later load (same world size) expect a universal folder
    engine._config.load_universal_checkpoint = True
    try:
        path, client_state = engine.load_checkpoint(os.path.join(save_dir, tag), tag=UNIVERSAL,
                                                    load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {folder(save_dir, tag)}")
    scheduler = engine.lr_scheduler
    for group, saved, base, factor in zip(optimizer.param_groups, hyper, scheduler.base_lrs,
                                          scheduler.lr_lambdas):
        group.update({k: v for k, v in saved.items() if k != "lr"},
                     lr=base * factor(scheduler.last_epoch))
    _load_buffers(engine.module, folder(save_dir, tag))
    return client_state


def _load_buffers(module: torch.nn.Module, universal: str) -> None:
    """The module's buffers from the model states DeepSpeed saved (buffers are never
    partitioned: every rank's file holds them whole)."""
    states = sorted(glob.glob(os.path.join(universal, "*model_states.pt")))
    saved = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in saved:
                buffer.copy_(saved[name])
