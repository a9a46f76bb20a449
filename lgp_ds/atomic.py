"""Files that appear whole or not at all: written under a temporary name beside their place,
synced, then renamed over it (one rename: readers see the old file or the new one, never half
of one; a writer that dies leaves only ``NAME.tmp.<pid>``)."""
import os
from typing import Callable


def temporary(path: str) -> str:
    """The name ``path`` is written under until it is whole (``NAME.tmp.<pid>``)."""
    return f"{path}.tmp.{os.getpid()}"


def write_file(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the file at :func:`temporary` ``(path)``, which then replaces
    ``path``; removed instead where ``write`` fails."""
    tmp = temporary(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """``text`` as the content of ``path``, whole or not at all."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    write_file(path, write)
