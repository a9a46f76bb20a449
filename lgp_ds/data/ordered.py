"""Labelled images in dataset order, for evaluation: every image exactly once over all ranks.

Each rank (and each DataLoader worker of it) reads whole shards of its own, in order, with no
shuffle, no augmentation and no padding; every sample carries its position in the data set,
``index = shard_number * 2**32 + position_in_shard`` (shard numbers in the order of ``urls``),
so results gathered from all ranks are put back in dataset order by sorting on it.

Evaluation must cover the whole set and score every image: a corrupt sample, an unreadable shard
or a sample without an integer class label (``cls``) is an error naming it, not a skip.
"""
from functools import partial

import torch
import webdataset as wds

from .shards import DataError, describe_error, image_and_label, ignore_stop_signal

SHARD_STRIDE = 2 ** 32


def raise_shard_error(url: str, exn: Exception) -> bool:
    raise DataError(f"shard {url} could not be read: {describe_error(exn)}") from exn


def _reader_samples(urls: list[str], rank: int, world_size: int):
    """Tar samples of this reader's shards (rank, then worker), with ``__index__``."""
    numbered = list(enumerate(urls))[rank::world_size]
    for number, url in wds.split_by_worker(numbered):
        samples = wds.tarfile_samples([{"url": url}], handler=partial(raise_shard_error, url))
        for position, sample in enumerate(samples):
            sample["__index__"] = number * SHARD_STRIDE + position
            yield sample


def _decode(samples, transform):
    """Tar samples -> (index, image [3,H,W], label, key); DataError names a sample that fails."""
    for sample in samples:
        where = f"sample {sample.get('__key__')!r} in {sample.get('__url__')}"
        try:
            img, label = image_and_label(sample)
            image = transform(img)
        except Exception as exn:
            raise DataError(f"{where}: {describe_error(exn)}") from exn
        if label < 0:
            raise DataError(f"{where} has no integer class label (its cls: "
                            f"{sample.get('cls')!r}): evaluation scores every image against "
                            f"its label")
        yield sample["__index__"], image, label, sample["__key__"]


def ordered_batches(urls: list[str], transform, batch_size: int, rank: int, world_size: int,
                    num_workers: int = 0, with_keys: bool = False):
    """This rank's share of the data set as batches (index [B] int64, images [B,3,H,W],
    labels [B] int64, and with ``with_keys`` the B sample keys (image names) as a list; the last
    batch of each reader may be smaller; a rank with no shard of its own yields nothing).
    ``transform``: PIL image -> tensor [3,H,W]."""
    pipeline = wds.DataPipeline(
        partial(_reader_samples, urls, rank, world_size),
        partial(_decode, transform=transform),
        wds.batched(batch_size, partial=True),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers,
                           persistent_workers=False, worker_init_fn=ignore_stop_signal,
                           pin_memory=torch.cuda.is_available())  # see shards.train_batches
    for index, images, labels, keys in loader:
        batch = torch.as_tensor(index, dtype=torch.int64), images, torch.as_tensor(labels)
        yield (*batch, list(keys)) if with_keys else batch
