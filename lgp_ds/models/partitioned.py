"""Model code that works alike on whole parameters and on ones ``deepspeed.zero.Init`` partitioned.

Under ``zero.Init`` (ZeRO-3 construction, :func:`lgp_ds.engine.construct.build_model`) a
module's own parameters are split across the ranks as soon as its ``__init__`` returns: each rank
keeps one contiguous part of every flattened tensor (``p.ds_tensor``), and ``p`` itself becomes an
empty placeholder. A parent that initialises its children's weights after building them (timm's
ViT, MAE, a classifier's small init) would write into those placeholders, and a loader that
compares shapes would see ``[0]``. The helpers here gather the parameters of one module at a
time for such writes (rank 0's values are kept and re-partitioned), so no rank ever holds the
whole model; on whole parameters they do what the plain code does.
"""
import contextlib

import deepspeed
import torch
import torch.nn as nn

from lgp_ds import dist


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of the whole parameter, partitioned or not."""
    return p.ds_shape if is_partitioned(p) else p.shape


def local_part(p: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(start, values): this rank's part of a partitioned ``p`` flattened, ``values`` a live view
    [numel] of the elements ``[start, start + numel)`` (numel 0 where the padding holds all of
    this rank's part)."""
    size = p.ds_tensor.numel()
    start = dist.get_rank() * size
    return start, p.ds_tensor.narrow(0, 0, max(0, min(size, p.ds_numel - start)))


@contextlib.contextmanager
def writable(params):
    """Collective where any of ``params`` is partitioned: inside, those are whole on every rank;
    on exit rank 0's values are partitioned again (every rank computes the same values here, so
    the choice of rank only fixes which copy is kept)."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        # written on the host, as a whole build is: random initialisers draw from the host's
        # generator, not the device's
        gathered = [p.data for p in params]
        for p in params:
            p.data = p.data.cpu()
        try:
            yield
        finally:
            for p, on_device in zip(params, gathered):
                on_device.copy_(p.data)
                p.data = on_device


def apply_gathered(fn, module: nn.Module) -> None:
    """``module.apply(fn)`` (children first, then the module, as torch's order) with each
    module's own parameters whole while ``fn`` runs on it."""
    for child in module.children():
        apply_gathered(fn, child)
    with writable(module.parameters(recurse=False)):
        fn(module)


@torch.no_grad()
def copy_whole(p: torch.Tensor, value: torch.Tensor) -> None:
    """Set parameter (or buffer) ``p`` from the whole tensor ``value``: a partitioned ``p`` takes
    this rank's part of it, without communication."""
    if not is_partitioned(p):
        p.copy_(value)
        return
    start, part = local_part(p)
    part.copy_(value.reshape(-1)[start:start + part.numel()])


def whole_copies(named: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """{name: a copy of the whole tensor on the host} of ``named``, one tensor gathered at a
    time (collective where they are partitioned); ``keep=False``: this rank takes part in the
    gathers and keeps none."""
    out = {}
    for name, p in named.items():
        with deepspeed.zero.GatheredParameters([p], enabled=is_partitioned(p)):
            if keep:
                out[name] = p.detach().to("cpu", copy=True)
    return out
