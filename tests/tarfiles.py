"""Small WebDataset tar shards written for tests: PNG samples, corrupt samples, garbage files."""
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
