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
- ``PREFIX-000000.tar`` ...: each shard is written as ``NAME.tmp`` and renamed when whole, so a
  file under a shard's own name is always complete;
- ``index.json`` (lgp_ds.data.index), written last, only when every shard is complete.

Run again with the same arguments over the same files, it keeps the complete shards and writes
the others; other arguments or changed files give another digest and are refused. Images that
PIL cannot decode are left out, reported, and listed in the index.
"""
import hashlib
import io
import json
import multiprocessing
import os
import random
import tarfile
import warnings
from contextlib import nullcontext
from functools import partial

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .index import INDEX_FILE, INDEX_FORMAT
from .shards import image_name
from .sources import Source, extension

PLAN_FILE, CLASSES_FILE = "plan.json", "classes.txt"
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


def _write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file: never half a file."""
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def _start(out: str, plan: dict) -> None:
    """Check that ``out`` is empty of shards or holds this plan's; write the plan (if new) and
    the class list. ValueError says what differs from the plan found there."""
    path = os.path.join(out, PLAN_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("digest") != plan["digest"]:
            raise ValueError(f"{out} holds a shard set made with other arguments or files "
                             f"({_what_changed(old, plan)}): write to another folder, or delete "
                             f"{out} to make it anew")
    else:
        os.makedirs(out, exist_ok=True)
        ours = [n for n in os.listdir(out) if n.endswith((".tar", ".tar.tmp")) or n == INDEX_FILE]
        if ours:
            raise ValueError(f"{out} holds shards or an index but no {PLAN_FILE} (e.g. "
                             f"{sorted(ours)[0]}): not a folder this tool can resume; write to "
                             f"another folder")
        _write_text(path, json.dumps(plan))
    _write_text(os.path.join(out, CLASSES_FILE), "".join(name + "\n" for name in plan["classes"]))


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


def _write_shard(path: str, root: str, samples: list) -> dict[str, str]:
    """Write the shard ``path`` (through ``path.tmp``); {source path: why} of the images left
    out as PIL cannot decode them.

    The tarfile module rather than webdataset's writers: ShardWriter names and opens shards
    itself as they fill (no temporary name, no plan to resume from), and TarWriter's encoder
    would have to be bypassed to keep the bytes as they are; tarfile writes exactly them.
    """
    left_out = {}
    with open(f"{path}.tmp", "wb") as f:
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
    os.replace(f"{path}.tmp", path)
    return left_out


def _complete_shard(out: str, root: str, shard: dict) -> tuple[dict, list[str], dict[str, str]]:
    """Write ``shard`` unless it is complete; (its index entry, the planned images it lacks,
    {image: why} of those left out in this call). The entry comes from the tar as written, so
    the index counts what the shards hold, whichever run wrote them."""
    path = os.path.join(out, shard["name"])
    why = {} if os.path.isfile(path) else _write_shard(path, root, shard["samples"])
    members = _members(path)
    planned = {image_name(f): sorted([extension(f), "cls"]) for f, *_ in shard["samples"]}
    foreign = [key for key, exts in members.items() if sorted(exts) != planned.get(key)]
    if foreign:
        raise ValueError(f"shard {path} does not hold what {PLAN_FILE} puts in it (e.g. sample "
                         f"{foreign[0]!r}): not written by this tool for this plan; delete it and "
                         f"run again")
    lacks = [file for file, *_ in shard["samples"] if image_name(file) not in members]
    entry = {"name": shard["name"], "count": len(members), "bytes": os.path.getsize(path)}
    return entry, lacks, why


def _members(path: str) -> dict[str, list[str]]:
    """{sample key: its extensions} of the tar ``path``; ValueError names a shard that cannot be
    read."""
    members = {}
    try:
        with tarfile.open(path) as tar:
            for name in tar.getnames():
                key, ext = name.split(".", 1)
                members.setdefault(key, []).append(ext)
    except (tarfile.TarError, ValueError) as exn:  # ValueError: a member name without a dot
        raise ValueError(f"shard {path} cannot be read ({type(exn).__name__}: {exn}): delete it "
                         f"and run again") from None
    return members


def make_shards(source: Source, out: str, prefix: str = "train", seed: int = 0,
                max_count: int = 1000, max_size: int = 10 ** 9, workers: int = 1,
                progress: bool = True) -> dict:
    """Write (or complete) the shard set of ``source`` in ``out`` and return its index.

    ``workers`` processes write one shard each at a time (1: in this process). The unreadable
    images are printed as they are found and listed in the index.
    """
    plan = make_plan(source, prefix, seed, max_count, max_size)
    _start(out, plan)
    names = [s["name"] for s in plan["shards"]]
    kept = sum(os.path.isfile(os.path.join(out, name)) for name in names)
    if kept < len(names):
        if os.path.isfile(os.path.join(out, INDEX_FILE)):
            os.remove(os.path.join(out, INDEX_FILE))  # shards are missing: not complete
        if kept and progress:
            print(f"{out}: {kept} of {len(names)} shards complete from an earlier run; writing "
                  f"the others")
    task = partial(_complete_shard, out, source.root)
    entries, lacking = {}, []
    with (multiprocessing.Pool(workers) if workers > 1 else nullcontext()) as pool, \
            tqdm(total=len(names), unit="shard", disable=not progress) as bar:
        for entry, lacks, why in (pool.imap_unordered(task, plan["shards"]) if pool
                                  else map(task, plan["shards"])):
            for file, reason in why.items():
                tqdm.write(f"unreadable, left out: {os.path.join(source.root, file)}: {reason}")
            entries[entry["name"]] = entry
            lacking += lacks
            bar.update()
    shards = [entries[name] for name in names]
    index = {"format": INDEX_FORMAT, **plan["settings"], "plan_digest": plan["digest"],
             "classes": plan["classes"], "shards": shards,
             "total": sum(s["count"] for s in shards), "unreadable": sorted(lacking)}
    _write_text(os.path.join(out, INDEX_FILE), json.dumps(index))
    return index
