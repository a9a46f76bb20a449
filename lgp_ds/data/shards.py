"""WebDataset shards -> fixed-size batches of augmented views, the same number on every rank.

Flow (per rank): shard list, shuffled by the epoch's seed -> split by node -> split by worker (each
reader, i.e. rank x DataLoader worker, keeps its shards for the epoch) -> the reader's shards in a
new seeded order each pass, forever -> tar samples -> shuffle buffer -> decode + the method's views
(corrupt samples skipped and counted) -> batches of ``batch_per_rank``. Every rank takes exactly
``steps`` batches per epoch, so an uneven shard split never leaves a rank short of a batch (which
would hang the next collective).

Bad data that would make a reader loop forever without yielding stops it with a DataError
naming the shards: a pass over its shards that gives no sample, or ``max_corrupt_run``
undecodable samples in a row. Raised in a DataLoader worker, the message reaches the main process.
"""
import glob
import itertools
import logging
import os
import random
from functools import partial

import torch
import webdataset as wds
from braceexpand import braceexpand

log = logging.getLogger(__name__)

# Sample keys (file extensions) that hold the image, matched in any case. Pillow decodes them all.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://")
_decode_image = wds.imagehandler("pil", IMAGE_KEYS)  # (key, bytes) -> fully decoded RGB PIL image


class DataError(RuntimeError):
    """Data that can never give this reader a batch; the message names the shards."""


def expand_shards(patterns: list[str]) -> list[str]:
    """Shard URLs from brace (``train-{000..099}.tar``) and glob patterns.

    A local pattern that matches no file, or a brace pattern with missing files, raises
    FileNotFoundError naming them; a shard named twice (overlapping patterns) raises ValueError,
    as two readers would feed the same images to different ranks. Remote URLs are passed through
    unchecked.
    """
    urls = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if url.startswith(_REMOTE):
                urls.append(url)
            elif any(c in url for c in "*?["):
                found = sorted(glob.glob(url))
                if not found:
                    raise FileNotFoundError(f"data pattern {pattern!r}: {url!r} matches no file")
                urls += found
            elif not os.path.isfile(url):
                missing = [u for u in braceexpand(pattern) if not os.path.isfile(u)]
                raise FileNotFoundError(f"data pattern {pattern!r}: {len(missing)} shard(s) missing, "
                                        f"e.g. {missing[:3]}")
            else:
                urls.append(url)
    if not urls:
        raise FileNotFoundError(f"data={patterns}: no shards")
    seen, twice = set(), []
    for url in urls:
        key = url if url.startswith(_REMOTE) else os.path.realpath(url)
        if key in seen:
            twice.append(url)
        seen.add(key)
    if twice:
        raise ValueError(f"data={patterns}: {len(twice)} shard(s) named twice, e.g. {twice[:3]}: "
                         f"each shard must appear once, or ranks would train on the same images")
    return urls


def check_readers(urls: list[str], world_size: int, num_workers: int) -> None:
    """Raise ValueError (naming the shards) unless every rank x worker gets a shard of its own."""
    readers = world_size * max(1, num_workers)
    if len(urls) < readers:
        raise ValueError(f"{len(urls)} shard(s) ({_listed(urls)}) cannot give each of "
                         f"{world_size} rank(s) x {max(1, num_workers)} worker(s) its own shards: "
                         f"use more shards or fewer num_workers")


def _listed(items: list[str], n: int = 5) -> str:
    """The first ``n`` items, comma-separated, and how many more there are."""
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _describe(exn: Exception) -> str:
    """``TypeName: message``. webdataset appends the stream and URL to ``args``, so a string first
    argument is the message on its own."""
    first = exn.args[0] if exn.args else ""
    return f"{type(exn).__name__}: {first if isinstance(first, str) else exn}"


def _shuffled(items: list[str], seed: int) -> list[str]:
    """A copy of ``items`` in the order ``seed`` gives, the same in every process."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order


def _skip_shard_data(url: str, problems: dict, exn: Exception) -> bool:
    """Tar handler: warn, note what was wrong with shard ``url`` in ``problems``, keep going."""
    problems[url] = _describe(exn)
    log.warning("skipping unreadable data in shard %s: %s", url, problems[url])
    return True


def image_name(name: str) -> str:
    """What a sample key and a subset file's line are matched on: the base name up to its first
    dot (``train/n01440764_10026`` and ``n01440764_10026.JPEG`` -> ``n01440764_10026``)."""
    return os.path.basename(name).split(".", 1)[0]


def _reader_samples(urls: list[str], rank: int, world_size: int, seed: int,
                    subset: frozenset | None = None):
    """Source stage: tar samples (dicts: ``__key__``, ``__url__``, one bytes value per file) of
    this reader's shards, a new seeded order each pass, forever; with ``subset`` (a set of
    :func:`image_name` values) only the samples it names, skipped before they are decoded.

    Unreadable shard data is skipped with a warning. A whole pass that yields no sample raises
    DataError naming the shards and what was wrong with them: the reader would otherwise loop
    over them forever without yielding, and its rank would wait forever for the batch.
    """
    mine = list(wds.split_by_worker(_shuffled(urls, seed)[rank::world_size]))
    for n in itertools.count():
        problems, found = {}, 0
        for url in _shuffled(mine, seed * 1_000_003 + n):
            for sample in wds.tarfile_samples([{"url": url}],
                                              handler=partial(_skip_shard_data, url, problems)):
                if subset is not None and image_name(sample.get("__key__", "")) not in subset:
                    continue
                found += 1
                yield sample
        if not found:
            worker = wds.utils.pytorch_worker_info()[2]
            none = ("no samples of the subset (its names, e.g. "
                    f"{sorted(subset)[:2]}, are matched on the sample keys)" if subset is not None
                    else "no samples (empty, or no files named KEY.EXT)")
            what = [f"{u}: {problems.get(u, none)}" for u in mine]
            raise DataError(f"no sample in a whole pass over the {len(mine)} shard(s) of rank "
                            f"{rank}, DataLoader worker {worker}: {_listed(what)}")


class _NoImage(ValueError):
    """A tar sample without an image key; the message lists the keys it has."""


def _image_and_label(sample: dict):
    """Tar sample -> (RGB PIL image, label: the integer in ``cls``, or -1 without one).

    The image is the first key in IMAGE_KEYS, any case; _NoImage when the sample has none. A
    ``cls`` that is not an integer (a class name) gives -1: pre-training needs no labels.
    """
    key = next((k for k in sample if k.lower() in IMAGE_KEYS), None)
    if key is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        raise _NoImage(f"has no image (keys found: {found}; image keys: "
                       f"{', '.join(IMAGE_KEYS)}, any case)")
    label = sample.get("cls", b"-1").strip()
    return _decode_image(key, sample[key]), int(label) if label.lstrip(b"-").isdigit() else -1


def _decode_views(samples, transform, max_corrupt_run: int):
    """Tar samples -> (view_1 [3,H,W], ..., view_k, label, skipped): the views ``transform``
    makes, label an int (-1: none) and skipped the number of corrupt samples dropped just before
    this one.

    Isolated corrupt samples are skipped with a warning. ``max_corrupt_run`` in a row raise
    DataError naming their shards and the last one's problem: data this reader can never
    decode (e.g. no image key) would otherwise be skipped forever without a batch.
    """
    run = []  # shard URLs of the corrupt samples since the last good one
    for sample in samples:
        try:
            img, label = _image_and_label(sample)
            views = transform(img)
        except Exception as exn:  # a corrupt or incomplete sample: count it and go on
            key, url = sample.get("__key__"), sample.get("__url__")
            problem = (str(exn) if isinstance(exn, _NoImage)
                       else f"could not be decoded: {_describe(exn)}")
            log.warning("skipping corrupt sample %s in %s: %s", key, url, problem)
            run.append(url)
            if len(run) >= max_corrupt_run:
                raise DataError(
                    f"{len(run)} samples in a row could not be used (max_corrupt_run="
                    f"{max_corrupt_run}): the last, {key!r} in {url}, {problem}; shard(s) of "
                    f"the run: {_listed(list(dict.fromkeys(run)))}") from None
            continue
        yield *views, label, len(run)
        run = []


def train_batches(urls: list[str], transform, batch_per_rank: int, steps: int, rank: int,
                  world_size: int, num_workers: int, seed: int, epoch: int,
                  shuffle_buffer: int = 5000, max_corrupt_run: int = 100,
                  subset: frozenset | None = None):
    """Iterator over exactly ``steps`` batches of this rank for ``epoch``.

    Each batch is (view_1 [B,3,H,W], ..., view_k, labels [B], skipped [B]) where
    ``skipped.sum()`` counts corrupt samples dropped while it was assembled. The order is a
    function of (seed, epoch, rank), so a resumed run sees the same batches. ``subset``: read only
    the samples whose :func:`image_name` it holds (SimCLR-style label subsets). Raises ValueError
    when there are fewer shards than readers, DataError (see the module) on hopeless data.
    """
    check_readers(urls, world_size, num_workers)
    epoch_seed = seed * 10_007 + epoch
    pipeline = wds.DataPipeline(
        # partials, not lambdas: DataLoader workers started by spawn receive the pipeline pickled
        partial(_reader_samples, urls, rank, world_size, epoch_seed, subset=subset),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 1000),
                    seed=epoch_seed * 1_000 + rank),
        partial(_decode_views, transform=transform, max_corrupt_run=max_corrupt_run),
        wds.batched(batch_per_rank, partial=False),
    )
    generator = torch.Generator().manual_seed(epoch_seed * 1_000 + rank)
    if num_workers == 0:  # the transforms draw from the global RNGs of this process
        torch.manual_seed(epoch_seed * 1_000 + rank)
        random.seed(epoch_seed * 1_000 + rank)
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers,
                           generator=generator, persistent_workers=False,
                           prefetch_factor=4 if num_workers else None)
    return itertools.islice(iter(loader), steps)
