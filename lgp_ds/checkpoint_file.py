"""Reading checkpoint files without running code from them: the one safe loader of lgp_ds.

``.safetensors`` files hold tensors only. Pickle files are read with ``torch.load(
weights_only=True)``, which rebuilds tensors and plain containers (dict, list, str, numbers)
and refuses any other Python object. One such object is allowed: ``argparse.Namespace``, the
``args`` that MAE's training script saves next to its weights (a plain record of values; it runs
no code when rebuilt). Callers may allow further plain record types (DeepSpeed's) through
:func:`allowed_types`. Anything else is a :class:`ValueError` that names the refused object.
"""
import argparse
import contextlib
import hashlib
import os
import re

import torch

ZIP_MAGIC = b"PK\x03\x04"  # how torch.save's zip format starts (a legacy pickle does not)
PLAIN_TYPES = (argparse.Namespace,)  # rebuilt from their attributes alone: no code runs
# torch.load as imported: lgp_ds.convert points torch.load at load() while DeepSpeed's
# zero_to_fp32 reads its files
_TORCH_LOAD = torch.load


@contextlib.contextmanager
def allowed_types(*types):
    """``torch.load(weights_only=True)`` also accepts :data:`PLAIN_TYPES` and ``types`` inside."""
    with torch.serialization.safe_globals([*PLAIN_TYPES, *types]):
        yield


def refusal(path: str, error: Exception) -> ValueError:
    """The one-line ValueError for a file that could not be read or was refused."""
    text = str(error)
    code = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if code:
        return ValueError(f"{path}: refused to load: it pickles the Python global "
                          f"'{code.group(1)}', which could run code when unpickled (accepted: "
                          f"tensors, plain containers and argparse.Namespace)")
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
    if reason:
        reason = reason.group(1)
    else:  # the first line, with the exception type: damaged files raise KeyError('43') ...
        reason = " ".join([f"{type(error).__name__}:", *text.strip().splitlines()[:1]])
    return ValueError(f"{path}: not a readable checkpoint file ({' '.join(reason.split())[:200]})")


def load(path: str, mmap: bool | None = None):
    """The content of a checkpoint file as tensors, plain containers and argparse.Namespace.

    Raises FileNotFoundError for a missing file and ValueError (one line, naming the file) for
    one that holds code, is not a checkpoint or is damaged (whatever the reader raised).
    ``mmap``: map a pickle file's tensors instead of reading them (``torch.load(mmap=True)``);
    None: where the file is in torch.save's zip format (not the legacy one). Mapped, what a
    reader never touches (an MAE file's optimizer state) is never read, and the ranks of a node
    share one copy in the page cache instead of each holding its own. Writes to the tensors
    stay in the process (copy-on-write); a file deleted or replaced by a rename while mapped
    is safe, but one rewritten in place (``torch.save`` to the same path) changes what the
    mapping reads, or ends the process if it shrinks: lgp_ds holds what it maps only while it
    builds the model.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    from safetensors.torch import load_file
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        if mmap is None:
            with open(path, "rb") as f:
                mmap = f.read(4) == ZIP_MAGIC
        with allowed_types():
            return _TORCH_LOAD(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a damaged file raises anything: KeyError, struct.error, ...
        raise refusal(path, e) from e


def safetensors_metadata(path: str) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file ({} when it has none)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) of a state dict's names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
