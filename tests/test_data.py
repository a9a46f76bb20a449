"""WebDataset input: shard lists, per-rank/worker splits, equal batch counts, bad data."""
import io
import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lgp_ds.data.builtin import digits_shards
from lgp_ds.data.shards import expand_shards, train_batches
from lgp_ds.data.transforms import TwoViews


def _png(seed: int) -> bytes:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_shards(folder, sizes, corrupt=()) -> str:
    """Shard i holds sizes[i] samples labelled i; (shard, index) pairs in ``corrupt`` are garbage."""
    for shard, n in enumerate(sizes):
        with wds.TarWriter(str(folder / f"s-{shard:02d}.tar")) as sink:
            for j in range(n):
                image = b"not an image" if (shard, j) in corrupt else _png(100 * shard + j)
                sink.write({"__key__": f"{shard}-{j}", "png": image, "cls": str(shard).encode()})
    return str(folder / f"s-{{00..{len(sizes) - 1:02d}}}.tar")


def batches(urls, steps, rank=0, world=1, workers=0, batch=8, buffer=1, epoch=0):
    return list(train_batches(urls, TwoViews(16, 0.5), batch, steps, rank, world, workers,
                              seed=0, epoch=epoch, shuffle_buffer=buffer))


def test_patterns_expand_and_missing_shards_are_named(tmp_path):
    pattern = make_shards(tmp_path, [2, 2, 2])
    assert len(expand_shards([pattern])) == 3
    assert len(expand_shards([str(tmp_path / "s-*.tar"), pattern])) == 6
    with pytest.raises(FileNotFoundError, match=r"2 shard\(s\) missing, e.g. .*s-03.tar"):
        expand_shards([str(tmp_path / "s-{00..04}.tar")])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_shards([str(tmp_path / "x-*.tar")])
    assert expand_shards(["pipe:cat a.tar"]) == ["pipe:cat a.tar"]


def test_each_rank_reads_its_own_shards(tmp_path):
    urls = expand_shards([make_shards(tmp_path, [8, 8, 8, 8])])
    seen = [set(torch.cat([b[2] for b in batches(urls, 2, rank=r, world=2)]).tolist())
            for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 2 and not seen[0] & seen[1]


def test_uneven_shards_give_every_rank_the_same_number_of_batches(tmp_path):
    urls = expand_shards([make_shards(tmp_path, [3, 17, 5, 9, 2])])
    for rank in (0, 1):
        got = batches(urls, 6, rank=rank, world=2, workers=2, buffer=16)
        assert len(got) == 6
        v1, v2, labels, skipped = got[0]
        assert v1.shape == v2.shape == (8, 3, 16, 16) and labels.shape == (8,)
        assert not torch.equal(v1, v2)  # two different augmented views


def test_too_few_shards_for_the_readers(tmp_path):
    urls = expand_shards([make_shards(tmp_path, [4, 4, 4])])
    with pytest.raises(ValueError, match=r"3 shard\(s\) cannot give each of 2 rank\(s\) x 2"):
        batches(urls, 1, world=2, workers=2)


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    urls = expand_shards([make_shards(tmp_path, [10, 10], corrupt={(0, 3)})])
    (got,) = batches(urls, 1, batch=19)
    assert int(got[3].sum()) == 1 and got[0].shape[0] == 19


def test_corrupt_shard_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    urls = expand_shards([make_shards(tmp_path, [8, 8])])
    bad = tmp_path / "s-02.tar"
    bad.write_bytes(b"\x00garbage, not a tar file" * 40)
    with caplog.at_level(logging.WARNING):
        got = batches(urls + [str(bad)], 4)
    assert len(got) == 4
    assert any("s-02.tar" in r.getMessage() for r in caplog.records)


def test_order_is_a_function_of_seed_epoch_and_rank(tmp_path):
    urls = expand_shards([make_shards(tmp_path, [8, 8, 8, 8])])
    a, b = batches(urls, 3, buffer=8), batches(urls, 3, buffer=8)
    c = batches(urls, 3, buffer=8, epoch=1)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_embedded_digits_shards(tmp_path):
    pattern, n = digits_shards(size=16, num_shards=4, root=str(tmp_path))
    assert n == 1797
    labels = torch.cat([b[2] for b in batches(expand_shards([pattern]), 4, batch=64, buffer=256)])
    assert set(labels.tolist()) == set(range(10))
    assert digits_shards(size=16, num_shards=4, root=str(tmp_path)) == (pattern, n)  # cached
