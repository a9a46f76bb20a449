"""DeepSpeed checkpoints that are only ever marked newest once every rank finished writing.

``engine.save_checkpoint(save_latest=True)`` lets rank 0 write ``latest`` before the other
ranks are done; a crash then leaves a half-written checkpoint that looks complete. Here every
rank writes, all ranks meet at a barrier, and only then does rank 0 put a completion marker in
the tag folder and atomically replace ``latest``. Resuming accepts marked checkpoints only.

The marker records the size of every file of the checkpoint, so that one damaged since (a
truncated copy, a full disk during a later rsync) is named before DeepSpeed reads it, the world
size, and what defines the run (:func:`lgp_ds.ds_config.run_identity`),
so a resume that cannot continue the same run (another batch size, schedule, accumulation or MIM
weights) is refused, with the reason, before DeepSpeed reads anything. A resume on another world
size keeps the global batch (the micro-batch, or the accumulation the DeepSpeed config states,
changes) and loads the ZeRO shards through a universal checkpoint (:mod:`.universal`), converted
once by rank 0.
"""
import glob
import json
import os
import re
import shutil

from lgp_ds import dist
from lgp_ds.atomic import write_text
from lgp_ds.config import MAY_CHANGE_ON_RESUME
from lgp_ds.ds_config import MAY_CHANGE_WITH_WORLD_SIZE

from . import universal

COMPLETE_MARKER = "lgp_ds_complete"
LATEST = "latest"
_TAG = re.compile(r"step(\d+)$")


def save(engine, save_dir: str, step: int, client_state: dict, run: dict, keep: int = 0) -> str:
    """Collective: save ``engine`` and ``client_state`` as tag ``step{step:08d}``; return the tag.

    ``run`` (:func:`lgp_ds.ds_config.run_identity`) goes into the completion marker. ``keep`` > 0:
    then only the newest ``keep`` complete checkpoints stay (:func:`prune`).
    """
    tag = f"step{step:08d}"
    marker = os.path.join(save_dir, tag, COMPLETE_MARKER)
    if dist.is_main() and os.path.isdir(os.path.join(save_dir, tag)):
        # The tag exists from before a resume to an earlier step (complete, or cut short by a
        # crash): it is being overwritten. A crash halfway must not leave old and new shards
        # under the old marker, and none of its files may outlive the save: shards of ranks this
        # world size lacks would make its next conversion for another world size fail.
        _remove(save_dir, tag)
    dist.barrier()
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's shards are on disk
    # Each rank's view of the folder: node-local storage holds each node's files alone.
    views = dist.all_gather_object(_sizes(os.path.join(save_dir, tag)))
    if dist.is_main():
        # rank 0's view wins where an attribute cache lags elsewhere
        files = {name: size for view in reversed(views) for name, size in view.items()}
        record = {"step": step, "world_size": dist.get_world_size(), "run": run, "files": files}
        write_text(marker, json.dumps(record) + "\n")
        write_text(os.path.join(save_dir, LATEST), tag)
        if keep:
            prune(save_dir, tag, keep)
    dist.barrier()
    return tag


def prune(save_dir: str, newest: str, keep: int) -> list[str]:
    """Delete the checkpoints older than the complete one ``newest`` beyond the ``keep`` newest
    complete ones (``newest`` included), and every incomplete one older than ``newest``; return
    the deleted tags. Tags of later steps (left by a resume from an earlier checkpoint) stay.

    A checkpoint loses its completion marker before its files (:func:`_remove`): a delete cut
    short leaves an incomplete folder, which no resume takes and the next prune removes.
    """
    if keep < 1 or not is_complete(save_dir, newest):
        raise ValueError(f"prune: keep={keep} must be >= 1 and {newest} complete")
    limit = int(_TAG.match(newest).group(1))
    older = sorted(((int(m.group(1)), t) for t in os.listdir(save_dir)
                    if (m := _TAG.match(t)) and int(m.group(1)) < limit), reverse=True)
    kept_complete = [t for _, t in older if is_complete(save_dir, t)][:keep - 1]
    doomed = [t for _, t in older if t not in kept_complete]
    for tag in doomed:
        _remove(save_dir, tag)
    return doomed


def _remove(save_dir: str, tag: str) -> None:
    """Delete checkpoint ``tag``, its completion marker first (a delete cut short leaves an
    incomplete folder), and what a conversion of it that died left beside it."""
    marker = os.path.join(save_dir, tag, COMPLETE_MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
    for stale in universal.leftovers(save_dir, tag):
        shutil.rmtree(stale, ignore_errors=True)


def _sizes(folder: str) -> dict[str, int]:
    """{file name: bytes} of the files in ``folder`` (the completion marker aside)."""
    return {e.name: e.stat().st_size for e in os.scandir(folder)
            if e.is_file() and e.name != COMPLETE_MARKER}


_SHARD_OWNER = re.compile(r"zero_pp_rank_(\d+)_")


def _damage(save_dir: str, tag: str, rank: int | None = None) -> str | None:
    """Why the files of checkpoint ``tag`` here are not those its save recorded, or None: a file
    of another size, or (``rank`` given) one that rank needs missing: its own ZeRO shards and the
    files of no rank in particular. Shards of other ranks may be on other nodes' storage.
    Checkpoints saved before the marker recorded the files are not checked."""
    folder = os.path.join(save_dir, tag)
    files = read_marker(save_dir, tag).get("files", {})
    for name, size in files.items():
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.path.getsize(path) != size:
            return (f"{path} has {os.path.getsize(path)} bytes, but its save wrote {size}: it was "
                    f"damaged or replaced since; restore it, or resume from another checkpoint "
                    f"(resume=<its step folder>)")
    if rank is not None:
        needed = [n for n in files if (m := _SHARD_OWNER.match(n)) is None or int(m[1]) == rank]
        missing = [n for n in needed if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            return (f"{folder} lacks {', '.join(missing)}, which its save wrote and rank {rank} "
                    f"reads")
    return None


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


_ACCUMULATION = "deepspeed.gradient_accumulation_steps"


def check_resumable(save_dir: str, tag: str, run: dict) -> list[str]:
    """Refuse (ValueError) a checkpoint this run cannot continue; return the allowed changes.

    Every key of ``run`` (:func:`lgp_ds.ds_config.run_identity`) outside ``MAY_CHANGE_ON_RESUME``
    must be unchanged: another batch size, schedule, accumulation or model would continue with a
    wrong LR and data position without a word. On another world size the global batch is kept
    and the accumulation may change (:data:`MAY_CHANGE_WITH_WORLD_SIZE`); the first line
    returned then says how the batch is split. Returns the changed keys that are allowed, as
    ``"key: old -> new"`` lines.
    """
    where = os.path.join(save_dir, tag)
    marker = read_marker(save_dir, tag)
    damage = _damage(save_dir, tag)
    if damage:
        raise ValueError(damage)
    saved = marker["run"]
    changed = {k: (saved[k], v) for k, v in run.items() if k in saved and saved[k] != v}
    world = (marker["world_size"], dist.get_world_size())
    allowed = set(MAY_CHANGE_ON_RESUME)
    # Runs saved before the init= weights' digest defined every run recorded it only with the
    # MIM anchor on (None otherwise): nothing to compare, so such a run continues.
    if saved.get("init_digest") is None:
        allowed.add("init_digest")
    lines = []
    if world[0] != world[1]:
        allowed |= MAY_CHANGE_WITH_WORLD_SIZE
        batch, gas = run["batch_size"], (saved.get(_ACCUMULATION, 1), run[_ACCUMULATION])
        lines.append(f"world size {world[0]} -> {world[1]}: global batch {batch} kept, "
                     f"micro-batch {batch // (world[0] * gas[0])} -> {batch // (world[1] * gas[1])}"
                     f", accumulation {gas[0]}" + (f" -> {gas[1]}" if gas[0] != gas[1] else ""))
        changed.pop(_ACCUMULATION, None)
    refused = [f"{k}={old!r} -> {new!r}" for k, (old, new) in changed.items() if k not in allowed]
    if refused:
        raise ValueError(f"{where} belongs to a run with other settings ({', '.join(refused)}): "
                         f"continuing it would silently change its LR schedule, data position or "
                         f"model. Resume with the checkpoint's values, or start a fresh run in a "
                         f"new output_dir (from converted weights with init=)")
    return lines + [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()]


def needs_universal(save_dir: str, tag: str) -> bool:
    """Whether checkpoint ``tag`` cannot load on this world size as it is: written by another
    and holding per-rank optimizer partitions (ZeRO 1-3, or the BF16 optimizer of ZeRO 0; a
    plain ZeRO-0 optimizer saves its whole state with the model, which loads anywhere)."""
    return (read_marker(save_dir, tag)["world_size"] != dist.get_world_size()
            and bool(glob.glob(os.path.join(save_dir, tag, "*optim_states.pt"))))


def _local_problem(save_dir: str, tag: str, zero_stage: int) -> str | None:
    """Why this rank cannot read checkpoint ``tag`` (node-local storage, stale caches), or None."""
    folder = os.path.join(save_dir, tag)
    if not is_complete(save_dir, tag):
        return f"{folder} is missing or incomplete here"
    same_world = not needs_universal(save_dir, tag)  # else rank 0 read it all to convert it
    damage = _damage(save_dir, tag, dist.get_rank() if same_world else None)
    if damage:
        return damage
    if not same_world:
        if not universal.is_converted(save_dir, tag):
            return f"{universal.folder(save_dir, tag)} (converted by rank 0) is missing here"
    elif zero_stage > 0:
        mine = f"zero_pp_rank_{dist.get_rank()}_"
        if not any(mine in f for f in os.listdir(folder)):
            return f"{folder} holds no ZeRO shard of rank {dist.get_rank()} ({mine}*)"
    return None


def choose(resume: str, save_dir: str, zero_stage: int,
           run: dict) -> tuple[tuple[str, str], list[str]] | None:
    """Collective: ((save_dir, tag), allowed config changes) every rank resumes from, or None.

    Rank 0 decides (:func:`find_checkpoint`, :func:`check_resumable`) and converts a checkpoint
    of another world size (:func:`universal.convert`, once): ranks that picked on
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
        if choice[0] == "ok" and choice[1] and needs_universal(*found):
            try:
                universal.convert(*found, read_marker(*found)["world_size"])
            except Exception as e:  # DeepSpeed's converter fails with errors of any type
                choice = ("error", f"{os.path.join(*found)}: converting it to a universal "
                                   f"checkpoint for another world size failed: "
                                   f"{type(e).__name__}: {e}")
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
    """Collective: restore ``engine`` (weights, optimizer, LR schedule); return the client state.

    A checkpoint of another world size loads from its universal form (:func:`choose` made it)."""
    if needs_universal(save_dir, tag):
        return universal.load(engine, save_dir, tag)
    try:
        path, client_state = engine.load_checkpoint(save_dir, tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    except Exception as e:  # a damaged file raises anything: RuntimeError, EOFError, KeyError ...
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise ValueError(f"rank {dist.get_rank()} could not read checkpoint "
                         f"{os.path.join(save_dir, tag)} ({reason}); its files have the sizes "
                         f"its save recorded, so one was damaged in place: restore it, or resume "
                         f"from another checkpoint (resume=<its step folder>)") from e
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(save_dir, tag)}")
    return client_state
