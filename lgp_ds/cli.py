"""What the entry points (launch/, tools/) share: bad input ends the process with one line.

A user's mistake (an unknown key, a missing shard, a checkpoint that does not fit) is a
ValueError or FileNotFoundError raised on every rank alike before training: it becomes
``error: ...`` (``error on rank R: ...`` once ranks exist) and exit status 2, not a traceback per
rank. Data that turns out hopeless while training (:class:`DataError`, raised in a DataLoader
worker and wrapped in its traceback) becomes one such line and status 1; the launcher then ends
the other ranks. Other exceptions keep their traceback: they are bugs, not input.
"""
import contextlib
import os
import sys

from lgp_ds.data.shards import DataError

BAD_INPUT = (ValueError, FileNotFoundError)


@contextlib.contextmanager
def errors_as_one_line(kinds: tuple = BAD_INPUT, ranks_started: bool = True):
    """Turn the exceptions ``kinds`` raised inside the block into one ``error`` line and an exit.

    Before ranks exist (``ranks_started=False``) every process fails alike and only rank 0
    prints.
    """
    rank = int(os.environ.get("RANK", 0))
    try:
        yield
    except kinds as e:
        message = str(e).strip().splitlines()[-1] if isinstance(e, DataError) else str(e)
        message = message.removeprefix(f"{DataError.__module__}.DataError: ")
        if ranks_started or rank == 0:
            print(f"error{f' on rank {rank}' if ranks_started else ''}: {message}",
                  file=sys.stderr)
        sys.exit(1 if isinstance(e, DataError) else 2)
