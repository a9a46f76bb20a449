"""DeepSpeed checkpoints that are only ever marked newest once every rank finished writing.

``engine.save_checkpoint(save_latest=True)`` lets rank 0 write ``latest`` before the other
ranks are done; a crash then leaves a half-written checkpoint that looks complete. Here every
rank writes, all ranks meet at a barrier, and only then does rank 0 put a completion marker in
the tag folder and atomically replace ``latest``. Resuming accepts marked checkpoints only.

The marker records the world size and what defines the run (:func:`lgp_ds.config.run_identity`),
so a resume that cannot continue the same run (another world size, batch size, schedule,
accumulation or MIM weights) is refused, with the reason, before DeepSpeed reads anything.
"""
import json
import os
import re

from lgp_ds import dist
from lgp_ds.config import MAY_CHANGE_ON_RESUME

COMPLETE_MARKER = "lgp_ds_complete"
LATEST = "latest"
_TAG = re.compile(r"step(\d+)$")


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file: readers see the old or the new file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, save_dir: str, step: int, client_state: dict, run: dict) -> str:
    """Collective: save ``engine`` and ``client_state`` as tag ``step{step:08d}``; return the tag.

    ``run`` (:func:`lgp_ds.config.run_identity`) goes into the completion marker.
    """
    tag = f"step{step:08d}"
    marker = os.path.join(save_dir, tag, COMPLETE_MARKER)
    if dist.is_main() and os.path.exists(marker):
        # The tag exists from before a resume to an earlier step: it is being overwritten, and a
        # crash halfway must not leave old and new shards under the old marker.
        os.remove(marker)
    dist.barrier()
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        record = {"step": step, "world_size": dist.get_world_size(), "run": run}
        write_atomic(marker, json.dumps(record) + "\n")
        write_atomic(os.path.join(save_dir, LATEST), tag)
    dist.barrier()
    return tag


def is_complete(save_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(save_dir, tag, COMPLETE_MARKER))


def newest_complete(save_dir: str) -> tuple[str, str] | None:
    """(save_dir, tag) of the newest complete checkpoint under ``save_dir``, or None."""
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


def find_checkpoint(resume: str, save_dir: str) -> tuple[str, str] | None:
    """(save_dir, tag) to resume from (or to convert).

    ``resume="auto"``: the newest complete checkpoint under ``save_dir`` (None if there is none).
    Otherwise ``resume`` is a tag folder (named ``step*`` or holding DeepSpeed's files), which
    must be complete, or a checkpoints folder, whose newest complete checkpoint is taken.
    """
    if resume == "auto":
        return newest_complete(save_dir)
    folder = os.path.abspath(resume.rstrip("/"))
    parent, tag = os.path.dirname(folder), os.path.basename(folder)
    if is_complete(parent, tag):
        return parent, tag
    if not os.path.isdir(folder) or _TAG.match(tag) or any(
            f.endswith("model_states.pt") for f in os.listdir(folder)):
        raise ValueError(f"{resume}: incomplete checkpoint (no {COMPLETE_MARKER} marker: the save "
                         f"did not finish on every rank)")
    found = newest_complete(folder)
    if found is None:
        raise ValueError(f"{resume}: neither a complete lgp_ds checkpoint nor a folder holding "
                         f"one (step* folders with a {COMPLETE_MARKER} marker)")
    return found


def read_marker(save_dir: str, tag: str) -> dict:
    """The completion record of checkpoint ``tag``; ValueError if it is not one lgp_ds wrote."""
    path = os.path.join(save_dir, tag, COMPLETE_MARKER)
    try:
        with open(path) as f:
            marker = json.load(f)
        if {"world_size", "run"} <= set(marker):
            return marker
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    raise ValueError(f"{path}: not a completion record written by lgp_ds (JSON with world_size "
                     f"and run)")


def check_resumable(save_dir: str, tag: str, run: dict) -> list[str]:
    """Refuse (ValueError) a checkpoint this run cannot continue; return the allowed changes.

    The world size must be the one that wrote it (ZeRO shards load only there), and every key of
    ``run`` (:func:`lgp_ds.config.run_identity`) outside ``MAY_CHANGE_ON_RESUME`` must be
    unchanged: another batch size, schedule, accumulation or model would continue with a wrong
    LR and data position without a word. Returns the changed keys that are allowed, as
    ``"key: old -> new"`` lines.
    """
    where = os.path.join(save_dir, tag)
    marker = read_marker(save_dir, tag)
    if marker["world_size"] != dist.get_world_size():
        raise ValueError(f"{where} was written by {marker['world_size']} ranks and this run has "
                         f"{dist.get_world_size()}: ZeRO shards only load on the world size that "
                         f"wrote them. Resume with {marker['world_size']} ranks, or convert the "
                         f"weights (tools/convert_ckpt.py) and start from them with init=")
    saved = marker["run"]
    changed = {k: (saved[k], v) for k, v in run.items() if k in saved and saved[k] != v}
    # Runs saved before the init= weights' digest defined every run recorded it only with the
    # MIM anchor on (None otherwise): nothing to compare, so such a run continues.
    unrecorded = {"init_digest"} if saved.get("init_digest") is None else set()
    refused = [f"{k}={old!r} -> {new!r}" for k, (old, new) in changed.items()
               if k not in MAY_CHANGE_ON_RESUME | unrecorded]
    if refused:
        raise ValueError(f"{where} belongs to a run with other settings ({', '.join(refused)}): "
                         f"continuing it would silently change its LR schedule, data position or "
                         f"model. Resume with the checkpoint's values, or start a fresh run in a "
                         f"new output_dir (from converted weights with init=)")
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()]


def _local_problem(save_dir: str, tag: str, zero_stage: int) -> str | None:
    """Why this rank cannot read checkpoint ``tag`` (node-local storage, stale caches), or None."""
    folder = os.path.join(save_dir, tag)
    if not is_complete(save_dir, tag):
        return f"{folder} is missing or incomplete here"
    if zero_stage > 0:
        mine = f"zero_pp_rank_{dist.get_rank()}_"
        if not any(mine in f for f in os.listdir(folder)):
            return f"{folder} holds no ZeRO shard of rank {dist.get_rank()} ({mine}*)"
    return None


def choose(resume: str, save_dir: str, zero_stage: int,
           run: dict) -> tuple[tuple[str, str], list[str]] | None:
    """Collective: ((save_dir, tag), allowed config changes) every rank resumes from, or None.

    Rank 0 decides (:func:`find_checkpoint`, :func:`check_resumable`): ranks that picked on
    their own could choose different tags (node-local storage, a stale NFS cache) and then hang
    or diverge. Every rank checks that it can read rank 0's choice. Whatever is wrong raises
    ValueError on every rank alike, naming the ranks and the reason, instead of some hanging.
    """
    choice = None
    if dist.is_main():
        try:
            found = find_checkpoint(resume, save_dir)
            choice = ("ok", found and (found, check_resumable(*found, run)))
        except ValueError as e:
            choice = ("error", str(e))
    status, chosen = dist.broadcast_object(choice)
    if status == "error":
        raise ValueError(chosen)
    if chosen is None:
        return None
    problems = dist.all_gather_object(_local_problem(*chosen[0], zero_stage))
    bad = [f"rank {r}: {p}" for r, p in enumerate(problems) if p]
    if bad:
        raise ValueError(f"rank 0 chose {os.path.join(*chosen[0])} to resume from, but "
                         + "; ".join(bad))
    return chosen


def load(engine, save_dir: str, tag: str) -> dict:
    """Collective: restore ``engine`` (weights, optimizer, LR schedule); return the client state."""
    path, client_state = engine.load_checkpoint(save_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(save_dir, tag)}")
    return client_state
