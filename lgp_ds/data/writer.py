"""WebDataset shards from a :class:`~lgp_ds.data.sources.Source`, written by several processes,
resumable after an interruption.

A sample is ``KEY.EXT``, the image file's bytes as they are (never re-encoded; EXT its
extension in lower case), and ``KEY.cls``, the class index as text; KEY is the file's
:func:`~lgp_ds.data.shards.image_name`, so SimCLR-style subset files name samples. Samples are
shuffled across shards with a seed; a shard closes at ``max_count`` samples or before it would
pass ``max_size`` bytes.

The output folder holds one shard set:

- ``plan.json``, written first: the settings, the class list and which image goes into which
  shard, a deterministic function of the sorted source list (paths, labels, file sizes), the
  seed and the size limits, with a digest of it all;
- ``classes.txt``: one class name a line; a sample's ``cls`` is its line number from 0;
- ``PREFIX-000000.tar`` ...: each shard is written as ``NAME.tmp.<pid>`` and renamed when whole;
- ``NAME.left_out.json`` beside a shard that lacks planned images as PIL cannot decode them:
  {source path: why}, written before the shard's rename, so that a shard lacking an image this
  record does not name is known to be damaged rather than taken as complete;
- ``index.json`` (lgp_ds.data.index), written last, only when every shard is verified;
- ``.lock``: held (flock) by the run writing the folder, so that two runs never write it at once.

Run again with the same arguments over the same files, it keeps the shards that hold exactly
what the plan puts in them and writes the others, damaged ones included (cut short, zeroed,
members missing: a shard is checked by its tar headers and end, not its image bytes); other
arguments or changed files give another digest and are refused. Images that PIL cannot decode
are left out, reported, and listed in the index.
"""
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import tarfile
import warnings
from contextlib import contextmanager, nullcontext
from functools import partial

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from lgp_ds.atomic import temporary, write_text

from .index import INDEX_FILE, INDEX_FORMAT
from .shards import image_name
from .sources import Source, extension

PLAN_FILE, CLASSES_FILE, LOCK_FILE = "plan.json", "classes.txt", ".lock"
LEFT_OUT = ".left_out.json"  # a shard's record of its undecodable images: NAME + LEFT_OUT
PLAN_FORMAT = "lgp_ds shard plan 1"
TAR_BLOCK = 512


def _member_bytes(size: int) -> int:
    """Bytes a file of ``size`` takes in a tar: a header block and the data padded to blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def _digest(plan: dict) -> str:
    body = {k: v for k, v in plan.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def make_plan(source: Source, prefix: str, seed: int, max_count: int, max_size: int) -> dict:
    """Which image goes into which shard: {format, settings, classes, shards: [{name, samples:
    [[path, class index, file size], ...]}], digest}. Two images with one sample key are
    refused (their samples would merge)."""
    if max_count < 1 or max_size < 1:
        raise ValueError(f"max_count={max_count} and max_size={max_size} must be positive")
    first = {}
    for path, _ in source.images:
        other = first.setdefault(image_name(path), path)
        if other != path:
            raise ValueError(f"{other} and {path} in {source.root} give the same sample key "
                             f"{image_name(path)!r} (the base name up to its first dot)")
    samples = [[path, label, os.path.getsize(os.path.join(source.root, path))]
               for path, label in source.images]
    random.Random(seed).shuffle(samples)
    shards, size = [[]], 0
    for sample in samples:
        cost = _member_bytes(sample[2]) + _member_bytes(len(str(sample[1])))
        if shards[-1] and (len(shards[-1]) == max_count or size + cost > max_size):
            shards.append([])
            size = 0
        shards[-1].append(sample)
        size += cost
    plan = {"format": PLAN_FORMAT,
            "settings": {"source": source.describe(), "prefix": prefix, "seed": seed,
                         "max_count": max_count, "max_size": max_size},
            "classes": source.classes,
            "shards": [{"name": f"{prefix}-{i:06d}.tar", "samples": s}
                       for i, s in enumerate(shards)]}
    return {**plan, "digest": _digest(plan)}


def _what_changed(old: dict, new: dict) -> str:
    """How the plan in a folder differs from this run's, in words."""
    if old.get("format") != new["format"]:
        return f"plan format {old.get('format')!r}, not {new['format']!r}"
    changes = [f"{key} {old['settings'].get(key)!r} -> {value!r}"
               for key, value in new["settings"].items() if old["settings"].get(key) != value]
    if old["classes"] != new["classes"]:
        changes.append("the class list")
    before, now = ({tuple(s) for shard in plan["shards"] for s in shard["samples"]}
                   for plan in (old, new))
    if before != now:
        changed = sorted(before ^ now)
        changes.append(f"the source: {len(before - now)} image(s) gone or changed, "
                       f"{len(now - before)} new or changed (path, class, size), e.g. "
                       f"{list(changed[0])}")
    return "; ".join(changes) or "the plan was edited"


@contextmanager
def _locked(out: str):
    """Hold ``out/.lock`` (created with ``out``) for the block; a folder that another run holds
    is refused at once. flock: the kernel releases it when the holder dies, so a killed run
    leaves no lock behind."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOCK_FILE), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockingIOError(f"{out} is being written by another make_shards run (it holds "
                                  f"{os.path.join(out, LOCK_FILE)}): wait for it to end, or "
                                  f"write to another folder") from None
        yield  # closing the file releases the lock


def _start(out: str, plan: dict) -> None:
    """With ``out`` locked: check that it is empty of shards or holds this plan's; write the
    plan (if new) and the class list; remove the temporary files of runs that died. ValueError
    says what differs from the plan found there."""
    path = os.path.join(out, PLAN_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("digest") != plan["digest"]:
            raise ValueError(f"{out} holds a shard set made with other arguments or files "
                             f"({_what_changed(old, plan)}): write to another folder, or delete "
                             f"{out} to make it anew")
    else:
        ours = [n for n in os.listdir(out)
                if n.endswith(".tar") or ".tar." in n or n == INDEX_FILE]
        if ours:
            raise ValueError(f"{out} holds shards or an index but no {PLAN_FILE} (e.g. "
                             f"{sorted(ours)[0]}): not a folder this tool can resume; write to "
                             f"another folder")
        write_text(path, json.dumps(plan))
    # Any run that could be writing these is dead: the lock is ours.
    names = {PLAN_FILE, CLASSES_FILE, INDEX_FILE}
    names.update(name for s in plan["shards"] for name in (s["name"], s["name"] + LEFT_OUT))
    for name in os.listdir(out):
        stem = re.fullmatch(r"(.+)\.tmp(\.\d+)?", name)
        if stem and stem.group(1) in names:
            os.remove(os.path.join(out, name))
    write_text(os.path.join(out, CLASSES_FILE), "".join(name + "\n" for name in plan["classes"]))


def _undecodable(data: bytes) -> str | None:
    """None if PIL decodes the whole image, else why not. A full decode, not just a header
    check: a truncated file opens, but stops evaluation, which refuses corrupt samples."""
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as img:
            warnings.simplefilter("ignore")  # EXIF and palette notes of images that do decode
            img.load()
    except UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        return "UnidentifiedImageError: not an image format PIL knows"
    except Exception as exn:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        return f"{type(exn).__name__}: {exn}"
    return None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (time, owner): a shard's bytes depend on the plan alone, so a resumed run
    # writes the very files an uninterrupted one would.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def _left_out_record(path: str) -> dict[str, str]:
    """The left-out record beside the shard ``path`` ({} without one)."""
    if not os.path.isfile(path + LEFT_OUT):
        return {}
    with open(path + LEFT_OUT) as f:
        return json.load(f)


def _write_shard(path: str, root: str, samples: list) -> dict[str, str]:
    """Write the shard ``path`` (through a temporary file, checked with :func:`_damage` before
    it is renamed) and its left-out record; {source path: why} of the images left out as PIL
    cannot decode them. ValueError when the shard as written is not the planned one (a source
    image changed during the run).

    The tarfile module rather than webdataset's writers: ShardWriter names and opens shards
    itself as they fill (no temporary name, no plan to resume from), and TarWriter's encoder
    would have to be bypassed to keep the bytes as they are; tarfile writes exactly them.
    """
    left_out = {}
    with open(temporary(path), "wb") as f:
        with tarfile.open(fileobj=f, mode="w") as tar:
            for file, label, _ in samples:
                with open(os.path.join(root, file), "rb") as image:
                    data = image.read()
                why = _undecodable(data)
                if why:
                    left_out[file] = why
                    continue
                _add(tar, f"{image_name(file)}.{extension(file)}", data)
                _add(tar, f"{image_name(file)}.cls", str(label).encode())
        f.flush()
        os.fsync(f.fileno())  # the data is on disk before the name says the shard is complete
    problem = _damage(temporary(path), samples, left_out)
    if problem:
        os.remove(temporary(path))
        raise ValueError(f"shard {path} as just written {problem}: did images in {root} change "
                         f"during the run?")
    # The record before the rename: a shard under its name always has its record beside it.
    if left_out:
        write_text(path + LEFT_OUT, json.dumps(left_out, sort_keys=True))
    elif os.path.isfile(path + LEFT_OUT):
        os.remove(path + LEFT_OUT)  # a damaged shard's, were the images decodable now
    os.replace(temporary(path), path)
    return left_out


def _damage(path: str, samples: list, left_out: dict) -> str | None:
    """Why the tar ``path`` is not the shard of the planned ``samples`` less ``left_out``, or
    None if it is: its members are the planned ones in order with their planned sizes, then
    tar's end-of-archive blocks and the padding tarfile writes, nothing else. Headers and the
    end only, not the image bytes: a shard cut short, zeroed over a header or lacking members
    is caught, bytes altered inside an image are not."""
    stray = sorted(set(left_out) - {file for file, *_ in samples})
    if stray:
        return f"has a record of left-out images that names images not planned for it: {stray[0]}"
    planned = []
    for file, label, size in samples:
        if file not in left_out:
            key = image_name(file)
            planned += [(f"{key}.{extension(file)}", size), (f"{key}.cls", len(str(label)))]
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            found = [(m.name, m.size) for m in tar.getmembers()]
            end = tar.offset  # where tarfile met the end-of-archive blocks, or the file's end
            if found != planned:
                return _difference(found, planned)
            size = os.fstat(f.fileno()).st_size
            # what tarfile writes after the last member: two zero blocks, zeros to a record
            whole = -(-(end + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
            f.seek(end)
            if size != whole or f.read().strip(b"\0"):  # no more than a record to read
                return (f"does not end with tar's end-of-archive blocks after its "
                        f"{len(found) // 2} samples ({size} bytes, not {whole})")
    except (tarfile.TarError, OSError) as exn:
        return f"cannot be read whole ({type(exn).__name__}: {exn})"
    return None


def _difference(found: list, planned: list) -> str:
    """Where the members ``found`` first differ from those ``planned`` ((name, size) lists), in
    words."""
    i = next((i for i, (a, b) in enumerate(zip(found, planned)) if a != b),
             min(len(found), len(planned)))
    if i == len(found):
        return (f"holds {len(found)} of the {len(planned)} members planned: {planned[i][0]} and "
                f"the rest are missing")
    if i == len(planned):
        return f"holds {len(found) - i} member(s) more than planned, e.g. {found[i][0]}"
    return (f"has {found[i][0]} ({found[i][1]} bytes) as member {i + 1} where {planned[i][0]} "
            f"({planned[i][1]} bytes) is planned")


def _kept_shard(out: str, shard: dict) -> tuple[str, str | None, dict]:
    """(name, why the file under the shard's name is damaged or None, its left-out record)."""
    path = os.path.join(out, shard["name"])
    try:
        left_out = _left_out_record(path)
    except ValueError as exn:  # a JSON error: the record was not written by this tool
        return shard["name"], f"has a record {path + LEFT_OUT} that is not JSON ({exn})", {}
    return shard["name"], _damage(path, shard["samples"], left_out), left_out


def _new_shard(out: str, root: str, shard: dict) -> tuple[str, dict]:
    """(name, {image: why} left out) of the shard, written."""
    return shard["name"], _write_shard(os.path.join(out, shard["name"]), root, shard["samples"])


def make_shards(source: Source, out: str, prefix: str = "train", seed: int = 0,
                max_count: int = 1000, max_size: int = 10 ** 9, workers: int = 1,
                progress: bool = True) -> dict:
    """Write (or complete) the shard set of ``source`` in ``out`` and return its index.

    ``workers`` processes check or write one shard each at a time (1: in this process). Shards
    of an earlier run are checked (:func:`_damage`); damaged ones are reported and written
    again. The unreadable images are printed as they are found and listed in the index, which
    counts the samples of checked shards. BlockingIOError when another run holds ``out``.
    """
    plan = make_plan(source, prefix, seed, max_count, max_size)
    shard = {s["name"]: s for s in plan["shards"]}
    with _locked(out):
        _start(out, plan)
        existing, todo = [], []  # shards on disk, to check; shards to write
        for s in plan["shards"]:
            (existing if os.path.isfile(os.path.join(out, s["name"])) else todo).append(s)
        left_out = {}  # shard name -> {image: why}, of verified shards
        with (multiprocessing.Pool(workers) if workers > 1 else nullcontext()) as pool, \
                tqdm(total=len(shard), unit="shard", disable=not progress) as bar:
            run = pool.imap_unordered if pool else map
            for name, damage, record in run(partial(_kept_shard, out), existing):
                if damage:
                    tqdm.write(f"damaged shard {os.path.join(out, name)} {damage}: writing it "
                               f"again")
                    todo.append(shard[name])
                else:
                    left_out[name] = record
                    bar.update()
            if todo and os.path.isfile(os.path.join(out, INDEX_FILE)):
                os.remove(os.path.join(out, INDEX_FILE))  # shards are missing: not complete
            if todo and left_out and progress:
                tqdm.write(f"{out}: {len(left_out)} of {len(shard)} shards complete from an "
                           f"earlier run; writing the others")
            for name, why in run(partial(_new_shard, out, source.root), todo):
                for file, reason in why.items():
                    tqdm.write(f"unreadable, left out: {os.path.join(source.root, file)}: "
                               f"{reason}")
                left_out[name] = why
                bar.update()
        shards = [{"name": s["name"], "count": len(s["samples"]) - len(left_out[s["name"]]),
                   "bytes": os.path.getsize(os.path.join(out, s["name"]))}
                  for s in plan["shards"]]
        index = {"format": INDEX_FORMAT, **plan["settings"], "plan_digest": plan["digest"],
                 "classes": plan["classes"], "shards": shards,
                 "total": sum(s["count"] for s in shards),
                 "unreadable": sorted(f for why in left_out.values() for f in why)}
        write_text(os.path.join(out, INDEX_FILE), json.dumps(index))
    return index
