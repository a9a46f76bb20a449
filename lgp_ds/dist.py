"""Rank/world helpers and the collectives the objectives and heads need.

Everything here works with and without an initialised process group (world size 1), and on
gloo as well as NCCL: the multi-rank tests run on CPUs.
"""
import contextlib
import importlib.util
import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [N, ...] from every rank along dim 0 -> [world * N, ...]; no gradient."""
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)  # every rank's output depends on every rank's input
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over ranks; the backward pass sums the gradients over ranks as well."""
    if get_world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(out, x)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad)
        n = grad.shape[0] // get_world_size()
        return grad[get_rank() * n:(get_rank() + 1) * n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [N, ...] from every rank along dim 0 -> [world * N, ...], with gradient.

    Every rank must pass the same shape. Rows ``r*N:(r+1)*N`` of the result are rank r's ``x``.
    The backward pass sums the incoming gradient [world * N, ...] over ranks and returns this
    rank's rows [N, ...] (VICReg's FullGatherLayer). Identity on a world of one process.

    Why the sum is right: the losses that use it (VICReg's variance and covariance terms) are
    computed identically on every rank from the gathered batch, so each rank holds a copy of the
    same loss L(x_0, ..., x_{W-1}). Rank r's own backward pass yields dL/dx_s for every rank s,
    but autograd can only deliver it to x_r; summing over ranks hands rank r the contributions of
    all W copies, W * dL/dx_r. DeepSpeed (like DDP) then averages parameter gradients over the W
    ranks: (1/W) * sum_r W * dL/dx_r * dx_r/dtheta = dL/dtheta, the gradient one process would
    get from L on the whole batch. (A term averaged over the local batch alone needs no gather:
    the engine's mean over ranks already makes it the global-batch mean.)
    """
    if get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x.contiguous())


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks without autograd; returns ``x``."""
    if get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def gather_in_order(index: torch.Tensor, *tensors: torch.Tensor, device=None,
                    chunk_rows: int = 1 << 16) -> tuple[torch.Tensor, ...]:
    """Collective: every rank's rows, from all ranks, sorted by ``index``, on every rank.

    ``index`` [n] int64 (distinct over all ranks), each of ``tensors`` [n, ...] (ranks may hold
    different n, 0 included; the trailing shapes and dtypes must agree) -> (index [N], *tensors
    [N, ...]) on the CPU, N = the sum of n, ascending in ``index``. Rows are padded to the
    largest n for the transport only and dropped after, so no row is duplicated; an index seen
    twice is a ValueError. The collectives run on ``device`` (default ``index.device``; NCCL
    needs the GPU), at most ``chunk_rows`` rows per rank at a time.
    """
    parts = (index, *tensors)
    if get_world_size() > 1:
        device = torch.device(device) if device is not None else index.device
        counts = torch.tensor([index.shape[0]], device=device)
        counts = [int(c) for c in all_gather_cat(counts)]
        pieces = [[t[:0].cpu()] for t in parts]  # every rank's rows are empty when all are
        for start in range(0, max(counts), chunk_rows):
            rows = min(chunk_rows, max(counts) - start)
            for j, t in enumerate(parts):
                mine = t[start:start + rows]
                padded = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=device)
                padded[:mine.shape[0]] = mine.to(device)
                gathered = all_gather_cat(padded).cpu().split(rows)
                pieces[j] += [g[:max(0, min(rows, n - start))] for g, n in zip(gathered, counts)]
        parts = tuple(torch.cat(p) for p in pieces)
    parts = tuple(t.cpu() for t in parts)
    order = parts[0].argsort()
    if order.numel() > 1 and bool((parts[0][order][1:] == parts[0][order][:-1]).any()):
        raise ValueError("gather_in_order: an index appears more than once over the ranks")
    return tuple(t[order] for t in parts)


def in_lockstep(items, device=None, size_of=None):
    """Collective: (item, size) for this rank's ``items``, then (None, size) until every rank has
    run out, so that all ranks loop the same number of times (a ZeRO-3 forward gathers
    parameters collectively: a rank out of batches runs a dummy one of ``size`` and drops it).
    ``size_of(item)`` -> list of ints (e.g. an image batch's shape); ``size``: its largest
    values over the ranks that hold an item this round ([] without ``size_of``).

    An exception from ``items`` (e.g. a corrupt shard) on any rank ends every rank's loop: that
    rank re-raises it, the others raise a RuntimeError pointing to it, so none waits forever
    in a collective. Costs one small all-reduce per item.
    """
    end = object()
    items = iter(items)
    width = None
    while True:
        error = None
        try:
            item = next(items, end)
        except Exception as e:
            item, error = end, e
        size = list(size_of(item)) if size_of is not None and item is not end else None
        if width is None:  # every rank must send as many numbers: agree on how many, once
            width = int(all_reduce_max(torch.tensor([len(size or [])], device=device)).item())
        flags = torch.tensor([item is not end, error is not None, *(size or [0] * width)],
                             dtype=torch.int64, device=device)
        flags = all_reduce_max(flags)
        if error is not None:
            raise error
        if flags[1]:
            raise RuntimeError(f"rank {get_rank()} stops: another rank failed reading its data "
                               f"(its error says why)")
        if not flags[0]:
            return
        yield (None if item is end else item), [int(v) for v in flags[2:]]


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks, in place (no gradient); ``x`` itself with one rank."""
    if get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def print_main(*args) -> None:
    """print() on rank 0 only, flushed."""
    if is_main():
        print(*args, flush=True)


def init_process_group(timeout_s: float | None = None) -> None:
    """Join the world the launcher describes in the environment (gloo on CPUs, else NCCL).

    Without a launcher (``python launch/graft.py``) the world is this one process.
    ``timeout_s``: how long any collective waits for the other ranks before it fails (None:
    DeepSpeed's default, 10 minutes or ``$DEEPSPEED_TIMEOUT`` minutes). gloo raises an error on
    the waiting ranks; NCCL's watchdog aborts the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``,
    default 3: log the timed-out collective and end the process), so on GPUs too every survivor
    ends, and the launcher then ends the rest.
    """
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator
    if "RANK" not in os.environ and not _started_by_mpi():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    cpu = get_accelerator().device_name() == "cpu"
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend="gloo" if cpu else None, **timeout)
    if cpu:
        _unlink_shm_buffer()


# Set where the launcher starts every rank itself and sets no RANK or WORLD_SIZE (deepspeed
# --launcher openmpi / mvapich / mpich / impi through MPI, slurm through srun): DeepSpeed then
# finds the world through mpi4py (its mpi_discovery).
MPI_WORLD_SIZE = ("OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE",
                  "SLURM_STEP_NUM_TASKS")


def _mpi_world_size_variable() -> str | None:
    """The variable of :data:`MPI_WORLD_SIZE` an MPI (or srun) start of several processes set,
    where no RANK is set (one task, as ``srun python ...`` gives, is a one-process run)."""
    if "RANK" in os.environ:
        return None
    return next((n for n in MPI_WORLD_SIZE if int(os.environ.get(n, "1")) > 1), None)


def launched_world_size() -> int:
    """The world size the launcher describes, known before the process group exists (the batch
    split is resolved from it): ``WORLD_SIZE`` (deepspeed's and torchrun's launchers), else the
    MPI launcher's, else 1."""
    name = "WORLD_SIZE" if "WORLD_SIZE" in os.environ else _mpi_world_size_variable()
    return int(os.environ[name]) if name else 1


def _started_by_mpi() -> bool:
    """Whether an MPI launcher (or srun) started this process: then it has no RANK, and DeepSpeed
    finds the world through mpi4py rather than this being a one-process run."""
    name = _mpi_world_size_variable()
    if name is None:
        return False
    if importlib.util.find_spec("mpi4py") is None:
        raise RuntimeError(f"started by an MPI launcher ({name}={os.environ[name]}), which sets no "
                           f"RANK: DeepSpeed finds the ranks through mpi4py, which is not "
                           f"installed: pip install mpi4py")
    return True


def _unlink_shm_buffer() -> None:
    """Remove the name of this rank's DeepSpeed shared-memory all-reduce buffer.

    On a CPU machine whose ranks are all local, DeepSpeed creates a 66 MB file per rank in
    /dev/shm and never removes it: every run leaks them until reboot (hundreds of test runs
    filled a 24 GB machine). Every rank maps every buffer while joining the world; after a
    barrier the names can go, and the mappings stay valid until the processes end.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{get_rank()}")
    barrier()
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join("/dev/shm", name))
