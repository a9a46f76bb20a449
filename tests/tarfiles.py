"""Small WebDataset tar shards written for tests: PNG samples, corrupt samples, garbage files,
numbered samples."""
import io

import numpy as np
import webdataset as wds
from PIL import Image


def png(seed: int, fmt: str = "PNG") -> bytes:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_shards(folder, sizes, corrupt=()) -> str:
    """Shard i holds sizes[i] samples labelled i; (shard, index) pairs in ``corrupt`` are garbage."""
    for shard, n in enumerate(sizes):
        with wds.TarWriter(str(folder / f"s-{shard:02d}.tar")) as sink:
            for j in range(n):
                image = b"not an image" if (shard, j) in corrupt else png(100 * shard + j)
                sink.write({"__key__": f"{shard}-{j}", "png": image, "cls": str(shard).encode()})
    return str(folder / f"s-{{00..{len(sizes) - 1:02d}}}.tar")


def write_garbage(path, data=b"\x00garbage, not a tar file" * 40) -> str:
    path.write_bytes(data)
    return str(path)


def numbered_image(i: int, fmt: str = "PNG") -> bytes:
    """A 20x20 image file whose pixel (0, 0) holds ``i`` (red * 256 + green)."""
    pixels = np.random.default_rng(i).integers(0, 255, (20, 20, 3), np.uint8)
    pixels[0, 0] = (i // 256, i % 256, 0)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def numbered_shards(folder, sizes, truncated=(), unlabelled=()) -> str:
    """Shards whose samples are numbered across them: sample i has ``cls`` i and i in its pixel
    (0, 0); those numbered in ``truncated`` are JPEG files cut in half, those in ``unlabelled``
    have no ``cls``. Returns the brace pattern."""
    for shard, n in enumerate(sizes):
        with wds.TarWriter(str(folder / f"n-{shard:02d}.tar")) as sink:
            for i in range(sum(sizes[:shard]), sum(sizes[:shard + 1])):
                sample = {"__key__": f"{i:05d}"}
                if i in truncated:
                    jpeg = numbered_image(i, "JPEG")
                    sample["jpg"] = jpeg[:len(jpeg) // 2]
                else:
                    sample["png"] = numbered_image(i)
                if i not in unlabelled:
                    sample["cls"] = str(i).encode()
                sink.write(sample)
    return str(folder / f"n-{{00..{len(sizes) - 1:02d}}}.tar")
