"""Run a function on N real ranks (separate processes, gloo on the CPU) and collect results."""
import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free right now on this machine (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        from lgp_ds.dist import init_process_group
        init_process_group()  # gloo on the CPU
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Leave the world explicitly: a process group torn down by interpreter exit (its gloo
        # threads still joinable) sometimes aborts the process ("terminate called without an
        # active exception") after its result is written, failing the run.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _each(calls):
    return [fn(*args) for fn, args in calls]


def run_ranks_each(calls, world: int = 2) -> list[list]:
    """Each ``(fn, args)`` of ``calls`` in turn, in one start of the ranks (a start costs seconds):
    for each call, its per-rank return values."""
    per_rank = run_ranks(_each, calls, world=world)
    return [[rank[i] for rank in per_rank] for i in range(len(calls))]


def run_ranks(fn, *args, world: int = 2) -> list:
    """``fn(*args)`` on ``world`` ranks with torch.distributed initialised; per-rank return values."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_entry, args=(world, free_port(), out_dir, fn, args), nprocs=world)
        except Exception as e:
            errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir))
                      if f.endswith(".err")]
            raise RuntimeError("a rank failed:\n" + "\n".join(errors)) from e
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]
