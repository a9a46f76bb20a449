"""The embedded default data set: scikit-learn's bundled handwritten digits as WebDataset shards.

1,797 real 8x8 grey images with labels 0-9, upsampled to ``size`` px RGB PNGs and written once
into a cache folder (``$LGP_DS_CACHE``, default ``~/.cache/lgp_ds``). No download is involved.
"""
import io
import os
import shutil
import tempfile

import numpy as np
import webdataset as wds
from PIL import Image

NUM_SAMPLES = 1797


def cache_root() -> str:
    return os.environ.get("LGP_DS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lgp_ds"))


def digits_shards(size: int = 32, num_shards: int = 8, root: str | None = None) -> tuple[str, int]:
    """Build the shards if needed; return (brace pattern of the shard files, number of samples).

    Safe to call from several processes at once: each builds into its own temporary folder and
    the first complete one is renamed into place.
    """
    from sklearn.datasets import load_digits

    root = root or cache_root()
    folder = os.path.join(root, f"digits-{size}px-{num_shards}shards")
    pattern = os.path.join(folder, f"train-{{000000..{num_shards - 1:06d}}}.tar")
    if os.path.isdir(folder):
        return pattern, NUM_SAMPLES
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".digits-", dir=root)
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], values 0..16
    for shard in range(num_shards):
        with wds.TarWriter(os.path.join(tmp, f"train-{shard:06d}.tar")) as sink:
            for i in range(shard, NUM_SAMPLES, num_shards):
                img = Image.fromarray(images[i]).resize((size, size), Image.BILINEAR).convert("RGB")
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(),
                            "cls": str(int(digits.target[i])).encode()})
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return pattern, NUM_SAMPLES
