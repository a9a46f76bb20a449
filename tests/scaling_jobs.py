"""Runs on real ranks: every collective one steady-state grafting step issues, as DeepSpeed and
lgp_ds call them, for lgp_ds.scaling's counts to be checked against."""
import os
import sys

import deepspeed.comm.comm as ds_comm
import torch
import torch.distributed as tdist

import jobs
from lgp_ds.ds_config import resolve_ds_config
from lgp_ds.engine.trainer import Trainer
from lgp_ds.methods import build_method

SCALARS = 2  # elements: fault flags and gradient checks, which the counts leave out


def _issuer() -> str:
    """Whose code issued the collective being recorded: "lgp_ds" or "deepspeed" (the first
    frame up the stack in either package, past DeepSpeed's communication layer)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "/lgp_ds/" in path:
            return "lgp_ds"
        if "/deepspeed/" in path and "/deepspeed/comm/" not in path:
            return "deepspeed"
        frame = frame.f_back
    return "?"


def _recorder(log: list):
    """Wrap the collectives in place; each call appends (op, dtype, elements of the whole
    result, :func:`_issuer`) to ``log`` while ``log.on`` is set."""
    world = tdist.get_world_size()

    def record(op, t: torch.Tensor, elements: int):
        if log.on and elements > SCALARS:
            log.append((op, str(t.dtype).removeprefix("torch."), elements, _issuer()))

    all_reduce, all_gather = tdist.all_reduce, tdist.all_gather
    backend = ds_comm.cdb  # DeepSpeed keeps its own references to these two
    gather_into, scatter = backend.all_gather_function, backend.reduce_scatter_function

    def all_reduce_(tensor, *args, **kwargs):
        record("all-reduce", tensor, tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    def all_gather_(tensor_list, tensor, *args, **kwargs):
        record("all-gather", tensor, tensor.numel() * world)
        return all_gather(tensor_list, tensor, *args, **kwargs)

    def gather_into_(*args, **kwargs):
        out = kwargs["output_tensor"] if "output_tensor" in kwargs else args[0]
        record("all-gather", out, out.numel())
        return gather_into(*args, **kwargs)

    def scatter_(output, input, *args, **kwargs):
        record("reduce-scatter", input, input.numel())
        return scatter(output, input, *args, **kwargs)

    tdist.all_reduce, tdist.all_gather = all_reduce_, all_gather_
    backend.all_gather_function, backend.reduce_scatter_function = gather_into_, scatter_


class _Log(list):
    on = False


def step_collectives_job(cases, out_dir: str, warmup: int = 1):
    """{name: [(op, dtype, elements, issuer), one a call]} of one training step after ``warmup`` ones,
    for each (name, DeepSpeed config, config keys) in ``cases``: the tiny config with those
    keys."""
    log = _Log()
    _recorder(log)
    out = {}
    for name, ds, keys in cases:
        cfg = jobs.tiny_config(output_dir=os.path.join(out_dir, name), **keys)
        trainer = Trainer(cfg, resolve_ds_config(ds, cfg, tdist.get_world_size()),
                          build_method(cfg), with_data=False)
        n = cfg.batch_size // tdist.get_world_size()
        views = [torch.randn(n, 3, cfg.img_size, cfg.img_size) for _ in range(2)]
        for _ in range(warmup):
            trainer.train_step(*views)
        log.clear()
        log.on = True
        trainer.train_step(*views)
        log.on = False
        out[name] = list(log)
    return out
