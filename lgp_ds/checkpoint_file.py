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
import os
import pickle
import re

import torch

PLAIN_TYPES = (argparse.Namespace,)  # rebuilt from their attributes alone: no code runs


@contextlib.contextmanager
def allowed_types(*types):
    """``torch.load(weights_only=True)`` also accepts :data:`PLAIN_TYPES` and ``types`` inside."""
    with torch.serialization.safe_globals([*PLAIN_TYPES, *types]):
        yield


def refusal(path: str, error: Exception) -> ValueError:
    """The one-line ValueError for a file that ``torch.load(weights_only=True)`` refused."""
    text = str(error)
    code = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if code:
        return ValueError(f"{path}: refused to load: it pickles the Python global "
                          f"'{code.group(1)}', which could run code when unpickled (accepted: "
                          f"tensors, plain containers and argparse.Namespace)")
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
    reason = reason.group(1) if reason else text.strip().splitlines()[0] if text.strip() else \
        type(error).__name__
    return ValueError(f"{path}: not a readable checkpoint file ({' '.join(reason.split())[:200]})")


def load(path: str):
    """The content of a checkpoint file as tensors, plain containers and argparse.Namespace.

    Raises FileNotFoundError for a missing file and ValueError (one line, naming the file) for
    one that holds code or is not a checkpoint.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        with allowed_types():
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise refusal(path, e) from e


def safetensors_metadata(path: str) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file ({} when it has none)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})
