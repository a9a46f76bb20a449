"""DeepSpeed checkpoints that are only ever marked newest once every rank finished writing.

``engine.save_checkpoint(save_latest=True)`` lets rank 0 write ``latest`` before the other
ranks are done; a crash then leaves a half-written checkpoint that looks complete. Here every
rank writes, all ranks meet at a barrier, and only then does rank 0 put a completion marker in
the tag folder and atomically replace ``latest``. Resuming accepts marked checkpoints only.
"""
import json
import os
import re

from lgp_ds import dist

COMPLETE_MARKER = "lgp_ds_complete"
LATEST = "latest"
_TAG = re.compile(r"step(\d+)$")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, save_dir: str, step: int, client_state: dict) -> str:
    """Collective: save ``engine`` and ``client_state`` as tag ``step{step:08d}``; return the tag."""
    tag = f"step{step:08d}"
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        record = {"step": step, "world_size": dist.get_world_size()}
        _write_atomic(os.path.join(save_dir, tag, COMPLETE_MARKER), json.dumps(record) + "\n")
        _write_atomic(os.path.join(save_dir, LATEST), tag)
    dist.barrier()
    return tag


def is_complete(save_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(save_dir, tag, COMPLETE_MARKER))


def find_checkpoint(resume: str, save_dir: str) -> tuple[str, str] | None:
    """(save_dir, tag) to resume from.

    ``resume="auto"``: the newest complete checkpoint under ``save_dir`` (None if there is none).
    Otherwise ``resume`` is a tag folder, which must be complete.
    """
    if resume != "auto":
        folder = os.path.abspath(resume.rstrip("/"))
        parent, tag = os.path.dirname(folder), os.path.basename(folder)
        if not is_complete(parent, tag):
            raise ValueError(f"resume={resume}: not a complete lgp_ds checkpoint (no "
                             f"{COMPLETE_MARKER} marker: the save did not finish on every rank)")
        return parent, tag
    if not os.path.isdir(save_dir):
        return None
    latest = os.path.join(save_dir, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if is_complete(save_dir, tag):
            return save_dir, tag
    tags = sorted((int(m.group(1)), t) for t in os.listdir(save_dir)
                  if (m := _TAG.match(t)) and is_complete(save_dir, t))
    return (save_dir, tags[-1][1]) if tags else None


def load(engine, save_dir: str, tag: str) -> dict:
    """Collective: restore ``engine`` (weights, optimizer, LR schedule); return the client state."""
    with open(os.path.join(save_dir, tag, COMPLETE_MARKER)) as f:
        saved_world = json.load(f)["world_size"]
    if saved_world != dist.get_world_size():
        raise ValueError(f"{os.path.join(save_dir, tag)} was written by {saved_world} ranks and "
                         f"this run has {dist.get_world_size()}: ZeRO shards only load on the "
                         f"world size that wrote them. Resume with {saved_world} ranks, or convert "
                         f"the weights (tools/convert_ckpt.py) and start from them with init=")
    path, client_state = engine.load_checkpoint(save_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(save_dir, tag)}")
    return client_state
