"""WebDataset shards -> fixed-size two-view batches, the same number on every rank.

Flow (per rank): shard list, shuffled by (seed, pass) -> split by node -> split by worker ->
tar samples -> shuffle buffer -> decode + two views (corrupt samples skipped and counted) ->
batches of ``batch_per_rank``. The shard stream repeats forever and every rank takes exactly
``steps`` batches per epoch, so an uneven shard split never leaves a rank short of a batch (which
would hang the next collective).
"""
import glob
import io
import itertools
import logging
import os
import random

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png")
_REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://")


def expand_shards(patterns: list[str]) -> list[str]:
    """Shard URLs from brace (``train-{000..099}.tar``) and glob patterns.

    A local pattern that matches no file, or a brace pattern with missing files, raises
    FileNotFoundError naming them. Remote URLs are passed through unchecked.
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
    return urls


def _repeating_shards(urls: list[str], seed: int):
    """Source stage: every shard once per pass, in a new seeded order each pass, forever."""
    for n in itertools.count():
        order = list(urls)
        random.Random(seed * 1_000_003 + n).shuffle(order)
        yield from ({"url": u} for u in order)


def _warn_shard(exn: Exception) -> bool:
    log.warning("skipping unreadable shard data: %r", exn)
    return True  # keep going with the next shard


def _decode_two_views(samples, transform):
    """Tar samples -> (view1, view2, label, skipped) with skipped = corrupt samples dropped before."""
    skipped = 0
    for sample in samples:
        try:
            key = next(k for k in IMAGE_KEYS if k in sample)
            img = Image.open(io.BytesIO(sample[key])).convert("RGB")
            label = int(sample["cls"]) if "cls" in sample else -1
            v1, v2 = transform(img)
        except Exception as exn:  # a corrupt or incomplete sample: count it and go on
            skipped += 1
            log.warning("skipping corrupt sample %s in %s: %r", sample.get("__key__"),
                        sample.get("__url__"), exn)
            continue
        yield v1, v2, label, skipped
        skipped = 0


def train_batches(urls: list[str], transform, batch_per_rank: int, steps: int, rank: int,
                  world_size: int, num_workers: int, seed: int, epoch: int,
                  shuffle_buffer: int = 5000):
    """Iterator over exactly ``steps`` batches of this rank for ``epoch``.

    Each batch is (view1 [B,3,H,W], view2 [B,3,H,W], labels [B], skipped [B]) where
    ``skipped.sum()`` counts corrupt samples dropped while it was assembled. The order is a
    function of (seed, epoch, rank), so a resumed run sees the same batches.
    """
    readers = world_size * max(1, num_workers)
    if len(urls) < readers:
        raise ValueError(f"{len(urls)} shard(s) cannot give each of {world_size} rank(s) x "
                         f"{max(1, num_workers)} worker(s) its own shards: use more shards or "
                         f"fewer num_workers")
    epoch_seed = seed * 10_007 + epoch
    pipeline = wds.DataPipeline(
        lambda: _repeating_shards(urls, epoch_seed),
        lambda src: itertools.islice(src, rank, None, world_size),  # split by node
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=_warn_shard),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 1000),
                    seed=epoch_seed * 1_000 + rank),
        lambda src: _decode_two_views(src, transform),
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
