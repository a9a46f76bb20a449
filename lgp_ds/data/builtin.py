"""The embedded default data set: scikit-learn's bundled handwritten digits as WebDataset shards.

1,797 real 8x8 grey images with labels 0-9, upsampled to ``size`` px RGB PNGs and written once
into a cache folder (``$LGP_DS_CACHE``, default ``~/.cache/lgp_ds``). No download is involved.

A fixed class-stratified quarter of the images (``HELD_OUT_FRACTION``, drawn with seed 0) is the
``val`` split, which no pre-training run reads: evaluation measures on images the encoder never
saw. The other images are the ``train`` split (pre-training, and the labelled images of the
evaluation protocols).
"""
import io
import os
import shutil
import tempfile

import numpy as np
import webdataset as wds
from PIL import Image

from .subsets import balanced_subset

NUM_IMAGES = 1797
HELD_OUT_FRACTION = 0.25
SPLITS = ("train", "val")


def _split_indices() -> dict[str, np.ndarray]:
    """Image indices of each split, ascending: a stratified split that never changes."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, val = train_test_split(np.arange(NUM_IMAGES), test_size=HELD_OUT_FRACTION,
                                  stratify=target, random_state=0)
    return {"train": np.sort(train), "val": np.sort(val)}


NUM_SAMPLES = {"train": 1347, "val": 450}  # len(_split_indices()[split]); checked by a test


def embedded_subset(fraction: float) -> list[str]:
    """Sample keys of a class-balanced ``fraction`` of the embedded set's train split (seed 0:
    the same images in every run, as a SimCLR subset file)."""
    from sklearn.datasets import load_digits

    train = _split_indices()["train"]
    labels = load_digits().target[train]
    return balanced_subset([f"{i:06d}" for i in train], [int(y) for y in labels], fraction, seed=0)


def cache_root() -> str:
    return os.environ.get("LGP_DS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lgp_ds"))


def digits_shards(size: int = 32, num_shards: int = 8, root: str | None = None,
                  split: str = "train") -> tuple[str, int]:
    """Build both splits' shards if needed; return (brace pattern of ``split``'s shard files,
    number of samples in it). Sample keys are the image's index in scikit-learn's set.

    Safe to call from several processes at once: each builds into its own temporary folder and
    the first complete one is renamed into place.
    """
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"split={split!r}: not one of {SPLITS}")
    root = root or cache_root()
    folder = os.path.join(root, f"digits-{size}px-{num_shards}shards-split")
    pattern = os.path.join(folder, f"{split}-{{000000..{num_shards - 1:06d}}}.tar")
    if os.path.isdir(folder):
        return pattern, NUM_SAMPLES[split]
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".digits-", dir=root)
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], values 0..16
    for name, indices in _split_indices().items():
        for shard in range(num_shards):
            with wds.TarWriter(os.path.join(tmp, f"{name}-{shard:06d}.tar")) as sink:
                for i in indices[shard::num_shards]:
                    img = Image.fromarray(images[i]).resize((size, size), Image.BILINEAR)
                    buf = io.BytesIO()
                    img.convert("RGB").save(buf, format="PNG")
                    sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(),
                                "cls": str(int(digits.target[i])).encode()})
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return pattern, NUM_SAMPLES[split]
