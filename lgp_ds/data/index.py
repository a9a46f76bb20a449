"""The index beside a shard set (``index.json``, written last by tools/make_shards.py): how many
samples each shard holds, so that an epoch's size need not be typed, and the class list, so that
evaluation can check that its train and val sets number the classes alike.

Format (JSON object)::

    format        INDEX_FORMAT
    shards        [{"name": "train-000000.tar", "count": samples, "bytes": file size}, ...]
    total         sum of the counts
    classes       class names; a sample's ``cls`` indexes this list (also in classes.txt)
    unreadable    source files left out as no image could be decoded from them
    source, prefix, seed, max_count, max_size, plan_digest: how the set was made

An index covers the shards of its own folder; a run may read some of them (``train-0000{00..49}
.tar``) or shards of several folders, each folder with its index.
"""
import json
import os

from lgp_ds import dist

from .shards import REMOTE_PREFIXES

INDEX_FILE = "index.json"
INDEX_FORMAT = "lgp_ds shards 1"

# Folders whose partial use has been noted in this process: a comparison or a grid reads the
# epoch size of every run it plans, and the trainer again
_NOTED_PARTIAL = set()


class NoIndex(FileNotFoundError):
    """Shards whose folder holds no index (or that are remote): their sample count is unknown."""


def read_index(folder: str) -> dict:
    """The index of the shard set in ``folder``; NoIndex without one, ValueError when it is not an
    index of this format or its counts do not add up."""
    path = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(path):
        raise NoIndex(f"{folder} holds no {INDEX_FILE} (tools/make_shards.py writes one)")
    with open(path) as f:
        index = json.load(f)
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: not a shard index of format {INDEX_FORMAT!r}")
    counted = sum(s["count"] for s in index["shards"])
    if counted != index["total"]:
        raise ValueError(f"{path}: its shards hold {counted} samples but it records a total of "
                         f"{index['total']}: the index is damaged; run tools/make_shards.py again")
    return index


def indexed_samples(urls: list[str]) -> int:
    """Samples in exactly the shards ``urls``, from the index in each shard's folder.

    NoIndex when a shard is remote or its folder has no index. ValueError names a shard that its
    folder's index does not list (the index belongs to another shard set) or whose size on disk
    is not the one indexed (the shard was rewritten since).

    Where ``urls`` take only some of the shards a folder's index lists, a note (rank 0, once per
    folder) says how many: a subset is legitimate (a quick run, a split), but a brace pattern
    narrower than meant would otherwise train on part of the set without a word.
    """
    remote = [u for u in urls if u.startswith(REMOTE_PREFIXES)]
    if remote:
        raise NoIndex(f"remote shards have no index to read (e.g. {remote[0]})")
    by_folder = {}
    for url in urls:
        by_folder.setdefault(os.path.dirname(os.path.abspath(url)), []).append(url)
    total = 0
    for folder, shards in by_folder.items():
        index = read_index(folder)
        listed = {s["name"]: s for s in index["shards"]}
        where = os.path.join(folder, INDEX_FILE)
        unknown = [u for u in shards if os.path.basename(u) not in listed]
        if unknown:
            raise ValueError(f"{len(unknown)} shard(s) not listed in {where}, e.g. {unknown[:3]}: "
                             f"the index belongs to another shard set; run "
                             f"tools/make_shards.py again or give samples_per_epoch=")
        taken = 0  # samples in this folder's shards
        for url in shards:
            entry, size = listed[os.path.basename(url)], os.path.getsize(url)
            if size != entry["bytes"]:
                raise ValueError(f"shard {url} has {size} bytes but {where} records "
                                 f"{entry['bytes']}: it was rewritten after the index; run "
                                 f"tools/make_shards.py again or give samples_per_epoch=")
            taken += entry["count"]
        # expand_shards refuses a shard named twice: fewer names than listed is a subset
        if len(shards) < len(listed) and folder not in _NOTED_PARTIAL:
            _NOTED_PARTIAL.add(folder)
            dist.print_main(f"note: data= takes {len(shards)} of the {len(listed)} shards "
                            f"indexed in {where} ({taken:,} of {index['total']:,} samples)")
        total += taken
    return total


def check_same_classes(train_urls: list[str], val_urls: list[str]) -> None:
    """ValueError naming two folders of the shards ``train_urls`` and ``val_urls`` whose indexes
    give different class lists: a class index would not mean the same class in both (e.g. val
    shards made without the train set's ``--classes``). Folders without an index, and remote
    shards, are not checked."""
    folders = {}  # folder -> its class list (None: no index), train's folders first
    for url in [*train_urls, *val_urls]:
        folder = os.path.dirname(os.path.abspath(url))
        if url.startswith(REMOTE_PREFIXES) or folder in folders:
            continue
        try:
            folders[folder] = read_index(folder)["classes"]
        except NoIndex:
            folders[folder] = None
    indexed = [(folder, classes) for folder, classes in folders.items() if classes is not None]
    for folder, classes in indexed[1:]:
        first, expected = indexed[0]
        if classes != expected:
            at = next((i for i, pair in enumerate(zip(expected, classes)) if pair[0] != pair[1]),
                      min(len(expected), len(classes)))
            raise ValueError(
                f"the shards in {first} and {folder} number their classes differently "
                f"({len(expected)} and {len(classes)} classes; class {at}: "
                f"{_name(expected, at)} and {_name(classes, at)}; see each folder's "
                f"{INDEX_FILE}): make one set again with tools/make_shards.py --classes naming "
                f"the other's classes.txt")


def _name(classes: list[str], i: int) -> str:
    """Class ``i`` of ``classes`` quoted, or 'none' past its end."""
    return repr(classes[i]) if i < len(classes) else "none"
