"""The images an analysis reads: global batches in dataset order, each rank its share.

Batch b of size B holds the images at dataset positions b*B .. (b+1)*B - 1 of the shards (in the
order given, samples in shard order); rank r of W takes positions b*B + floor(r*B/W) up to
b*B + floor((r+1)*B/W). A random view of an image is drawn from a generator seeded by the
image's position, so any number of ranks sees the same views of the same global batch.
"""
from functools import partial

import torch
import webdataset as wds

from lgp_ds import dist
from lgp_ds.data.ordered import raise_shard_error
from lgp_ds.data.shards import DataError, describe_error, image_and_label


def _samples_in_order(urls: list[str]):
    """Tar samples of ``urls``, in dataset order."""
    for url in urls:
        yield from wds.tarfile_samples([{"url": url}], handler=partial(raise_shard_error, url))


def view_seed(seed: int, position: int, stream: int = 0) -> int:
    """The seed of the image at dataset ``position``: ``stream`` 0 for its views, 1 for its
    MAE mask (streams never share a seed)."""
    return (seed * 1_000_003 + position) * 2 + stream


def _views(sample: dict, transform, seed: int) -> tuple[tuple[torch.Tensor, ...], int]:
    """(views, label) of one tar sample, drawn from the seed of its position."""
    where = f"sample {sample.get('__key__')!r} in {sample.get('__url__')}"
    try:
        img, label = image_and_label(sample)
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG
            torch.manual_seed(seed)
            views = transform(img)
    except Exception as exn:
        raise DataError(f"{where}: {describe_error(exn)}") from exn
    return (views if isinstance(views, tuple) else (views,)), label


def rank_batches(urls: list[str], batch_size: int, num_batches: int, transform, seed: int = 0):
    """This rank's share of each of ``num_batches`` global batches of ``batch_size`` images:
    yields (positions [n] int64, views: tuple of [n,3,H,W] (one per output of ``transform``,
    PIL image -> tensor or tuple of tensors), labels [n] int64, -1 where a sample has none).

    Every rank reads the shards from the start and decodes only its own images. Fewer than
    ``batch_size * num_batches`` images in the shards is a ValueError.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    lo, hi = rank * batch_size // world, (rank + 1) * batch_size // world
    samples = _samples_in_order(urls)
    for b in range(num_batches):
        mine = []
        for i in range(batch_size):
            sample = next(samples, None)
            if sample is None:
                raise ValueError(f"the data holds {b * batch_size + i} images; {num_batches} "
                                 f"batch(es) of {batch_size} need {num_batches * batch_size}: "
                                 f"lower --batches or --batch_size")
            if lo <= i < hi:
                position = b * batch_size + i
                mine.append((position, *_views(sample, transform, view_seed(seed, position))))
        positions, views, labels = zip(*mine)
        yield (torch.tensor(positions), tuple(torch.stack(v) for v in zip(*views)),
               torch.tensor(labels))
