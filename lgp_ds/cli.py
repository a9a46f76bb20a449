"""What the entry points (launch/, tools/) share: bad input ends the process with one line.

A user's mistake (an unknown key, a missing shard, a checkpoint that does not fit) is a
ValueError or FileNotFoundError raised on every rank alike before training: it becomes
``error: ...`` (``error on rank R: ...`` once ranks exist) and exit status 2, not a traceback per
rank. Data that turns out hopeless while training (:class:`DataError`, raised in a DataLoader
worker and wrapped in its traceback) becomes one such line and status 1; the launcher then ends
the other ranks. So do the other failures a run ends with on purpose (non-finite steps, a failed
collective: lgp_ds.engine.faults). Other exceptions keep their traceback: they are bugs, not input.
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
        sys.exit(2 if isinstance(e, BAD_INPUT) else 1)


def add_eval_arguments(parser) -> None:
    """The frozen-feature protocols' options (launch/evaluate.py, launch/compare.py)."""
    from lgp_ds.eval.protocols import PROTOCOLS, EvalSettings
    d = EvalSettings()
    g = parser.add_argument_group("evaluation")
    g.add_argument("--train_data", help="labelled training shards (default: the embedded set's "
                   "train split)")
    g.add_argument("--val_data", help="held-out labelled shards (default: the embedded set's "
                   "val split)")
    g.add_argument("--protocols", default=",".join(d.protocols),
                   help=f"comma-separated, of {','.join(PROTOCOLS)}")
    g.add_argument("--subset", help="SimCLR-style subset file (1percent.txt) of the labelled "
                   "images for logistic regression")
    g.add_argument("--fraction", type=float, default=d.fraction, help="without --subset: a "
                   "class-balanced share of the training images for logistic regression")
    g.add_argument("--knn_k", type=int, default=d.knn_k)
    g.add_argument("--knn_t", type=float, default=d.knn_t)
    g.add_argument("--linear_epochs", type=int, default=d.linear_epochs)
    g.add_argument("--linear_batch_size", type=int, default=d.linear_batch_size)
    g.add_argument("--batch_size", type=int, default=d.batch_size,
                   help="feature extraction batch per rank")
    g.add_argument("--num_workers", type=int, default=d.num_workers)
    g.add_argument("--seed", type=int, default=d.seed)


def eval_settings(args, **extra):
    """:class:`EvalSettings` from the options of :func:`add_eval_arguments`, checked."""
    from lgp_ds.eval.protocols import EvalSettings
    settings = EvalSettings(
        protocols=tuple(p.strip() for p in args.protocols.split(",") if p.strip()),
        fraction=args.fraction, subset=args.subset, knn_k=args.knn_k, knn_t=args.knn_t,
        linear_epochs=args.linear_epochs, linear_batch_size=args.linear_batch_size,
        batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed, **extra)
    settings.check()
    return settings
