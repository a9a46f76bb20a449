"""Photo-like JPEG shards of ImageNet's typical size, for input-pipeline benchmarks and tests.

Each image is a random crop of one of scikit-learn's two bundled photographs (640x427; no
download), flipped at random, its colours scaled per channel, resized to 500x375 or 375x500
(ImageNet's most common sizes) and saved as a JPEG of quality 75-95: what decoding and
augmenting costs per image is close to ImageNet's, and the images differ from each other.
"""
import io
import os

import numpy as np
import webdataset as wds
from PIL import Image

SIZES = ((500, 375), (375, 500))  # (width, height)


def photo_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEG files (bytes), a function of ``seed``."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = SIZES[int(rng.integers(len(SIZES)))]
        widest = min(photo.width, photo.height * width / height)  # at the output's aspect
        crop_w = int(widest * rng.uniform(0.4, 1.0))
        crop_h = int(crop_w * height / width)
        left = int(rng.integers(0, photo.width - crop_w + 1))
        top = int(rng.integers(0, photo.height - crop_h + 1))
        img = photo.crop((left, top, left + crop_w, top + crop_h))
        img = img.resize((width, height), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        gain = rng.uniform(0.7, 1.3, size=3)
        img = Image.fromarray(np.clip(np.asarray(img) * gain, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
        out.append(buf.getvalue())
    return out


def write_photo_shards(folder: str, count: int, num_shards: int, seed: int = 0) -> str:
    """Write ``count`` images of :func:`photo_jpegs` into ``num_shards`` WebDataset shards in
    ``folder`` (samples ``KEY.jpg`` and ``KEY.cls``, the class 0); return their brace pattern."""
    jpegs = photo_jpegs(count, seed)
    for shard in range(num_shards):
        with wds.TarWriter(os.path.join(folder, f"photos-{shard:04d}.tar")) as sink:
            for i in range(shard, count, num_shards):
                sink.write({"__key__": f"{i:08d}", "jpg": jpegs[i], "cls": b"0"})
    return os.path.join(folder, f"photos-{{0000..{num_shards - 1:04d}}}.tar")
