"""WebDataset shards -> fixed-size batches of augmented views, the same number on every rank.

Flow (per rank): shard list, shuffled by the epoch's seed -> split by node -> split by worker (each
reader, i.e. rank x DataLoader worker, keeps its shards for the epoch) -> the reader's shards in a
new seeded order each pass, forever -> tar samples -> shuffle buffer -> decode + the method's views
(corrupt samples skipped and counted) -> batches of ``batch_per_rank``. Every rank takes exactly
``steps`` batches per epoch, so an uneven shard split never leaves a rank short of a batch (which
would hang the next collective). With ``resampled`` (more readers than shards) every reader
instead draws shards from the whole list with replacement, forever.

Determinism: every random choice is seeded, the deal of shards to ranks from (seed, epoch), a
reader's shard order, shuffle buffer and the views of the n-th sample leaving that buffer from
(seed, epoch, rank, reader) (and n), so a sample's views do not depend on whether the samples
before it were decoded. The DataLoader takes batches from its workers in turn, so batch j of an
epoch comes from reader j % readers. A stream resumed from a :class:`StreamPosition` (the raw
samples each reader gave for the batches taken) drops those samples as bytes, before decoding,
and goes on exactly as the uninterrupted stream.

Bad data that would make a reader loop forever without yielding stops it with a DataError
naming the shards: all its shards read without a sample, or ``max_corrupt_run`` undecodable
samples in a row. Raised in a DataLoader worker, the message reaches the main process.
"""
import glob
import hashlib
import io
import itertools
import logging
import os
import random
import signal
import threading
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

log = logging.getLogger(__name__)

# Sample keys (file extensions) that hold the image, matched in any case. Pillow decodes them all.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


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
            if url.startswith(REMOTE_PREFIXES):
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
        key = url if url.startswith(REMOTE_PREFIXES) else os.path.realpath(url)
        if key in seen:
            twice.append(url)
        seen.add(key)
    if twice:
        raise ValueError(f"data={patterns}: {len(twice)} shard(s) named twice, e.g. {twice[:3]}: "
                         f"each shard must appear once, or ranks would train on the same images")
    return urls


def check_readers(urls: list[str], world_size: int, num_workers: int,
                  resampled: bool = False) -> None:
    """Raise ValueError (naming the shards) unless every rank x worker gets a shard of its own,
    or ``resampled`` (every reader draws from all shards)."""
    readers = world_size * max(1, num_workers)
    if not resampled and len(urls) < readers:
        raise ValueError(f"{len(urls)} shard(s) ({shortlist(urls)}) cannot give each of "
                         f"{world_size} rank(s) x {max(1, num_workers)} worker(s) its own shards: "
                         f"use more shards or fewer num_workers, or resampled_shards=true")


def shortlist(items: list[str], n: int = 5) -> str:
    """The first ``n`` items, comma-separated, and how many more there are."""
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def describe_error(exn: Exception) -> str:
    """``TypeName: message``. webdataset appends the stream and URL to ``args``, so a string first
    argument is the message on its own."""
    first = exn.args[0] if exn.args else ""
    return f"{type(exn).__name__}: {first if isinstance(first, str) else exn}"


def _shuffled(items: list[str], seed: int) -> list[str]:
    """A copy of ``items`` in the order ``seed`` gives, the same in every process."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order


def shard_set(urls: list[str]) -> str:
    """What a stream position refers to: the shards in order, by file name and size (a remote
    one by its URL), as ``"<count> shards, <digest>"``. Other shards, the same ones in another
    order or rewritten, or the same set moved to another folder: another string but for the
    last."""
    digest = hashlib.sha256()
    for url in urls:
        local = not url.startswith(REMOTE_PREFIXES)
        digest.update(f"{os.path.basename(url) if local else url}:"
                      f"{os.path.getsize(url) if local else ''};".encode())
    return f"{len(urls)} shards, {digest.hexdigest()[:12]}"


def rank_shards(urls: list[str], seed: int, epoch: int, rank: int, world_size: int) -> list[str]:
    """The shards ``rank`` reads in ``epoch``: its share of the epoch's seeded order of ``urls``,
    every ``world_size``-th from its place (dealt anew each epoch, so unequal shards even out)."""
    return _shuffled(urls, stable_seed(seed, epoch))[rank::world_size]


def stable_seed(*parts) -> int:
    """A seed in [0, 2**63) from ``parts`` (ints and tags): the same in every process (Python's
    ``hash`` of a string is not) and unrelated for different parts (sums of multiples such as
    ``seed * 10_007 + epoch`` collide)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _skip_shard_data(url: str, problems: dict, exn: Exception) -> bool:
    """Tar handler: warn, note what was wrong with shard ``url`` in ``problems``, keep going."""
    problems[url] = describe_error(exn)
    log.warning("skipping unreadable data in shard %s: %s", url, problems[url])
    return True


def image_name(name: str) -> str:
    """What a sample key and a subset file's line are matched on: the base name up to its first
    dot (``train/n01440764_10026`` and ``n01440764_10026.JPEG`` -> ``n01440764_10026``)."""
    return os.path.basename(name).split(".", 1)[0]


def _reader_samples(shards: list[str], rng: random.Random, resampled: bool,
                    subset: frozenset | None, where: str):
    """Source stage of one reader (``where`` names it): tar samples (dicts: ``__key__``,
    ``__url__``, one bytes value per file) of ``shards`` (distinct URLs), forever: a pass over
    them in a new order that ``rng`` draws each time, or with ``resampled`` shard after shard
    drawn from them with replacement. With ``subset`` (a set of :func:`image_name` values) only
    the samples it names, skipped before they are decoded.

    Unreadable shard data is skipped with a warning. Once every shard was read since the last
    sample without giving one (a whole pass), DataError names them and what was wrong with them:
    the reader would otherwise loop over them forever without yielding, and its rank would wait
    forever for the batch. (Counting distinct shards rather than reads: with replacement, a few
    draws in a row can miss the good shards.)
    """
    problems, barren = {}, set()  # what was wrong with a shard; shards without a sample since
    while True:                   # the last one
        for url in [rng.choice(shards)] if resampled else rng.sample(shards, len(shards)):
            found = False
            for sample in wds.tarfile_samples([{"url": url}],
                                              handler=partial(_skip_shard_data, url, problems)):
                if subset is not None and image_name(sample.get("__key__", "")) not in subset:
                    continue
                found = True
                yield sample
            barren = set() if found else barren | {url}
            if len(barren) == len(shards):
                none = ("no samples of the subset (its names, e.g. "
                        f"{sorted(subset)[:2]}, are matched on the sample keys)"
                        if subset is not None else "no samples (empty, or no files named KEY.EXT)")
                what = [f"{u}: {problems.get(u, none)}" for u in sorted(shards)]
                hint = ("; a subset whose images lie in a few shards leaves readers of the others "
                        "without any: use fewer num_workers, or resampled_shards=true"
                        if subset is not None else "")
                raise DataError(f"no sample in a whole pass over the {len(shards)} shard(s) of "
                                f"{where}: {shortlist(what)}{hint}")


class _NoImage(ValueError):
    """A tar sample without an image key; the message lists the keys it has."""


def _open_image(data: bytes) -> Image.Image:
    """An RGB PIL image of the file ``data``. An RGB one (nearly every JPEG) is only opened:
    PIL knows its size and decodes its pixels on first use, so a transform can still ask for a
    reduced decode (:mod:`lgp_ds.data.crops`); another mode is decoded and converted here."""
    img = Image.open(io.BytesIO(data))
    return img if img.mode == "RGB" else img.convert("RGB")


def image_and_label(sample: dict):
    """Tar sample -> (RGB PIL image, see :func:`_open_image`; label: the integer in ``cls``, or
    -1 without one).

    The image is the first key in IMAGE_KEYS, any case; _NoImage when the sample has none. A
    ``cls`` that is not an integer (a class name) gives -1: pre-training needs no labels. Data
    that is no image fails here; a truncated RGB file fails when the transform decodes it.
    """
    key = next((k for k in sample if k.lower() in IMAGE_KEYS), None)
    if key is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        raise _NoImage(f"has no image (keys found: {found}; image keys: "
                       f"{', '.join(IMAGE_KEYS)}, any case)")
    return _open_image(sample[key]), label_of(sample.get("cls", b""))


def label_of(cls: bytes) -> int:
    """A sample's label from its ``cls`` file: the integer it holds, else -1 (none, empty, or
    a class name: pre-training needs no labels)."""
    cls = cls.strip()
    return int(cls) if cls.lstrip(b"-").isdigit() else -1


class _NoLabel(ValueError):
    """A tar sample without an integer ``cls`` where the run trains on labels."""


def _seed_global_rngs(seed: int) -> None:
    """Seed the global RNGs that image transforms draw from: torch's CPU generator
    (torchvision), Python's ``random`` (timm's RandAugment and random erasing) and numpy's
    (RandAugment's choice of operations). About 8 us, against milliseconds to decode and augment
    an image; ``torch.manual_seed`` would also seed every CUDA device (about 100 us)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


def _decode_views(numbered, transform, max_corrupt_run: int, seed: int, labelled: bool = False):
    """(n, tar sample) pairs, n the sample's number in its reader's stream -> (view_1 [3,H,W],
    ..., view_k, label, skipped): the views ``transform`` makes, label an int (-1: none) and
    skipped the number of corrupt samples dropped just before this one.

    Before each sample the global RNGs are seeded from (``seed``, n) (:func:`_seed_global_rngs`),
    so its views do not depend on which samples before it were decoded: a resume that drops
    them undecoded makes the same views. In a DataLoader worker nothing else draws from those
    RNGs; without workers this process's are left as the last sample seeded them (the trainer's
    forward pass draws from an RNG of its own). With ``labelled`` (the run trains on labels) a
    sample without an integer ``cls`` is corrupt.

    Isolated corrupt samples are skipped with a warning. ``max_corrupt_run`` in a row raise
    DataError naming their shards and the last one's problem: data this reader can never
    decode (e.g. no image key) would otherwise be skipped forever without a batch.
    """
    run = []  # shard URLs of the corrupt samples since the last good one
    for n, sample in numbered:
        _seed_global_rngs(stable_seed(seed, n))
        try:
            img, label = image_and_label(sample)
            if labelled and label < 0:
                raise _NoLabel(f"has no integer class label (cls: {sample.get('cls')!r})")
            views = transform(img)
        except Exception as exn:  # a corrupt or incomplete sample: count it and go on
            key, url = sample.get("__key__"), sample.get("__url__")
            problem = (str(exn) if isinstance(exn, (_NoImage, _NoLabel))
                       else f"could not be decoded: {describe_error(exn)}")
            log.warning("skipping corrupt sample %s in %s: %s", key, url, problem)
            run.append(url)
            if len(run) >= max_corrupt_run:
                raise DataError(
                    f"{len(run)} samples in a row could not be used (max_corrupt_run="
                    f"{max_corrupt_run}): the last, {key!r} in {url}, {problem}; shard(s) of "
                    f"the run: {shortlist(list(dict.fromkeys(run)))}") from None
            continue
        yield *views, label, len(run)
        run = []


@dataclass
class StreamPosition:
    """How far a rank's stream of an epoch has gone: ``batches`` taken, and ``samples[r]`` the
    raw samples (used or corrupt) that reader r gave for them, counted from the head of its
    stream. There is a reader per DataLoader worker (one without workers), and batch j of an
    epoch comes from reader j % readers."""
    batches: int
    samples: list[int]

    @classmethod
    def head(cls, readers: int, batches: int = 0) -> "StreamPosition":
        """Batch ``batches`` of an epoch with every reader at the head of its stream."""
        return cls(batches, [0] * readers)


def _reader_batches(urls: list[str], transform, batch_per_rank: int, rank: int, world_size: int,
                    readers: int, seed: int, epoch: int, first: int, consumed: tuple[int, ...],
                    shuffle_buffer: int, max_corrupt_run: int, subset: frozenset | None,
                    resampled: bool, labelled: bool):
    """In a DataLoader worker (or this process, without workers): the batches of the reader whose
    turn this worker's batches are, from the epoch's batch ``first`` on, at which the readers had
    given ``consumed`` raw samples. Its samples -> seeded shuffle buffer -> the first
    ``consumed[reader]`` dropped, undecoded -> views seeded per sample -> batches."""
    info = torch.utils.data.get_worker_info()
    worker = 0 if info is None else info.id
    # The loader takes its t-th batch from worker t % readers; that batch is the epoch's batch
    # first + t, which reader (first + t) % readers gives.
    reader = (worker + first) % readers
    key = (seed, epoch, rank, reader)
    # without resampling: the rank's share of the epoch's shard order, and the reader's of that
    shards = (urls if resampled
              else rank_shards(urls, seed, epoch, rank, world_size)[reader::readers])
    samples = _reader_samples(shards, random.Random(stable_seed(*key, "shards")), resampled, subset,
                              f"rank {rank}, DataLoader worker {worker}")
    samples = wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 1000),
                          seed=stable_seed(*key, "buffer"))(samples)
    numbered = itertools.islice(enumerate(samples), consumed[reader], None)
    views = _decode_views(numbered, transform, max_corrupt_run, stable_seed(*key, "views"),
                          labelled)
    return wds.batched(batch_per_rank, partial=False)(views)


def train_batches(urls: list[str], transform, batch_per_rank: int, steps: int, rank: int,
                  world_size: int, num_workers: int, seed: int, epoch: int,
                  shuffle_buffer: int = 5000, max_corrupt_run: int = 100,
                  subset: frozenset | None = None, resampled: bool = False,
                  labelled: bool = False, position: StreamPosition | None = None):
    """Iterator over this rank's batches of ``epoch`` from ``position`` (default: the head of
    the stream) up to batch ``steps``; it advances ``position`` as it yields each batch, so a
    checkpoint can record where the stream is.

    Each batch is (view_1 [B,3,H,W], ..., view_k, labels [B], skipped [B]) where
    ``skipped.sum()`` counts corrupt samples dropped while it was assembled. The stream is a
    function of (seed, epoch, rank, num_workers); from a position, the readers drop the samples
    they gave for the batches taken before decoding them, and the batches are exactly those of
    the uninterrupted stream. ``subset``: read only the samples whose :func:`image_name` it holds
    (SimCLR-style label subsets). ``resampled``: every reader draws shards from all of ``urls``
    with replacement. ``labelled``: a sample without a label is corrupt. Raises ValueError when
    there are fewer shards than readers (and not ``resampled``), DataError (see the module) on
    hopeless data.
    """
    check_readers(urls, world_size, num_workers, resampled)
    readers = max(1, num_workers)
    position = position or StreamPosition.head(readers)
    # a partial, not a lambda: DataLoader workers started by spawn receive it pickled
    stream = wds.DataPipeline(partial(
        _reader_batches, urls, transform, batch_per_rank, rank, world_size, readers, seed, epoch,
        position.batches, tuple(position.samples), shuffle_buffer, max_corrupt_run, subset,
        resampled, labelled))
    # A generator of its own: starting the loader draws the workers' base seed from it rather
    # than from this process's global RNG (the views are seeded per sample, not from that seed).
    # Pinned batches on a GPU machine: the trainer's copies to the device are then asynchronous
    # (from pageable memory the training thread would itself stage each batch, 154 MB of views
    # a step for ViT-L grafting at 128), and the loader's own thread does the pinning.
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                         generator=torch.Generator(),
                                         worker_init_fn=ignore_stop_signal,
                                         prefetch_factor=4 if num_workers else None,
                                         pin_memory=torch.cuda.is_available())
    return _advancing(itertools.islice(loader, steps - position.batches), position,
                      batch_per_rank)


def ignore_stop_signal(worker_id: int) -> None:
    """DataLoader workers outlive a SIGTERM from outside: the launchers (DeepSpeed's, SLURM's)
    signal the whole process tree, and a worker that died of it would crash its rank before the
    rank's handler (:mod:`lgp_ds.engine.faults`) stops the run with a checkpoint. A SIGTERM from
    the worker's own rank (multiprocessing ending its workers, at exit too) still ends it, as
    before: the signal is blocked and a thread takes it, looking at who sent it."""
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS: SIGTERM ends the worker there
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _end_on_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # default action: the process ends
    os.kill(os.getpid(), signal.SIGTERM)


def _advancing(batches, position: StreamPosition, batch_per_rank: int):
    """``batches`` as they are, ``position`` moved past each one before it is handed on: its
    reader gave ``batch_per_rank`` samples and the corrupt ones skipped on the way."""
    readers = len(position.samples)
    for batch in batches:
        position.samples[position.batches % readers] += batch_per_rank + int(batch[-1].sum())
        position.batches += 1
        yield batch
