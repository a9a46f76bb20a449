"""WebDataset input: shard lists, per-rank/worker splits, equal batch counts, bad data."""
import logging
import re

import numpy as np
import pytest
import torch
import webdataset as wds

from lgp_ds.config import Config
from lgp_ds.data.builtin import HELD_OUT_FRACTION, NUM_IMAGES, NUM_SAMPLES, SPLITS, digits_shards
from lgp_ds.data.pipeline import TrainData
from lgp_ds.data.ordered import ordered_batches
from lgp_ds.data.shards import DataError, expand_shards, train_batches
from lgp_ds.data.transforms import Views, moco_view_transforms
from tarfiles import make_shards, png, write_garbage


def batches(urls, steps, rank=0, world=1, workers=0, batch=8, buffer=1, epoch=0, **kw):
    views = Views(*moco_view_transforms(16, 0.5))
    return list(train_batches(urls, views, batch, steps, rank, world, workers, seed=0, epoch=epoch,
                              shuffle_buffer=buffer, **kw))


def test_patterns_expand_and_missing_shards_are_named(tmp_path):
    pattern = make_shards(tmp_path, [2, 2, 2])
    assert len(expand_shards([pattern])) == 3
    (tmp_path / "t-0.tar").touch()
    assert len(expand_shards([str(tmp_path / "s-*.tar"), str(tmp_path / "t-*.tar")])) == 4
    with pytest.raises(ValueError, match=r"3 shard\(s\) named twice, e.g. .*s-00.tar.* the same "
                                         r"images"):  # overlapping patterns
        expand_shards([str(tmp_path / "s-*.tar"), pattern])
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
    with pytest.raises(ValueError, match=r"3 shard\(s\) \(.*s-02.tar\) cannot give each of "
                                         r"2 rank\(s\) x 2"):
        batches(urls, 1, world=2, workers=2)


def test_too_few_shards_fail_when_train_data_is_built(tmp_path):
    # The trainer builds TrainData before the DeepSpeed engine: the error must come from there.
    cfg = Config(data=[make_shards(tmp_path, [4])], samples_per_epoch=4, num_workers=2,
                 img_size=16)
    with pytest.raises(ValueError, match=r"1 shard\(s\) \(.*s-00.tar\) cannot give each of "
                                         r"1 rank\(s\) x 2 worker\(s\)"):
        TrainData(cfg, batch_per_rank=4, transform=None)
    cfg.num_workers = 1
    assert TrainData(cfg, batch_per_rank=4, transform=None).urls == [str(tmp_path / "s-00.tar")]


def test_reader_whose_shards_all_fail_stops_naming_them(tmp_path):
    urls = expand_shards([make_shards(tmp_path, [16])]) + [write_garbage(tmp_path / "bad.tar")]
    outcome = {}
    for rank in (0, 1):  # each rank keeps one shard for the epoch: one of them gets bad.tar
        try:
            outcome[rank] = len(batches(urls, 2, rank=rank, world=2))
        except RuntimeError as e:
            outcome[rank] = str(e)
    errors = [v for v in outcome.values() if isinstance(v, str)]
    assert len(errors) == 1 and 2 in outcome.values(), outcome
    msg = errors[0]
    assert re.search(r"no sample in a whole pass over the 1 shard\(s\) of rank \d.*"
                     r"bad.tar: ReadError: invalid header", msg), msg
    assert "s-00.tar" not in msg
    # Every shard unreadable on a single reader (num_workers=0): an error, not an endless loop.
    empty = write_garbage(tmp_path / "empty.tar", b"")
    with pytest.raises(RuntimeError, match=r"bad.tar: ReadError: invalid header.*"
                                           r"empty.tar: ReadError: empty file"):
        batches(sorted([urls[1], empty]), 1)


def test_bad_shard_error_survives_the_dataloader_worker(tmp_path):
    urls = expand_shards([make_shards(tmp_path, [16])]) + [write_garbage(tmp_path / "bad.tar")]
    with pytest.raises(RuntimeError, match=r"DataLoader worker(.|\n)*no sample in a whole pass "
                                           r"over the 1 shard\(s\) of rank 0, DataLoader worker "
                                           r"\d: .*bad.tar: ReadError: invalid header"):
        batches(urls, 4, workers=2)


def test_webp_and_upper_case_image_keys_are_decoded(tmp_path):
    for shard, (key, fmt) in enumerate([("webp", "WEBP"), ("JPEG", "JPEG"), ("Png", "PNG")]):
        with wds.TarWriter(str(tmp_path / f"s-{shard:02d}.tar")) as sink:
            for j in range(4):
                sink.write({"__key__": f"{shard}-{j}", key: png(10 * shard + j, fmt),
                            "cls": str(shard).encode()})
    (got,) = batches(expand_shards([str(tmp_path / "s-*.tar")]), 1, batch=12)
    assert int(got[3].sum()) == 0 and sorted(got[2].tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_samples_without_an_image_stop_the_run_naming_shard_and_keys(tmp_path):
    urls = expand_shards([make_shards(tmp_path, [8])])
    with wds.TarWriter(str(tmp_path / "text.tar")) as sink:
        for j in range(20):
            sink.write({"__key__": f"t-{j}", "txt": b"a caption", "cls": b"1"})
    # in a DataLoader worker, so the message has to cross the process boundary
    with pytest.raises(RuntimeError, match=r"5 samples in a row could not be used "
                                           r"\(max_corrupt_run=5\).*text.tar.* has no image "
                                           r"\(keys found: \['cls', 'txt'\]"):
        batches(urls + [str(tmp_path / "text.tar")], 4, workers=1, max_corrupt_run=5)


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    urls = expand_shards([make_shards(tmp_path, [10, 10], corrupt={(0, 3)})])
    (got,) = batches(urls, 1, batch=19)
    assert int(got[3].sum()) == 1 and got[0].shape[0] == 19


def test_class_names_instead_of_indices_are_no_corrupt_samples(tmp_path):
    with wds.TarWriter(str(tmp_path / "names.tar")) as sink:
        for j in range(8):
            sink.write({"__key__": str(j), "png": png(j), "cls": b"n01440764"})
    (got,) = batches([str(tmp_path / "names.tar")], 1)
    assert int(got[3].sum()) == 0 and got[2].tolist() == [-1] * 8


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
    assert n == NUM_SAMPLES["train"]
    labels = torch.cat([b[2] for b in batches(expand_shards([pattern]), 4, batch=64, buffer=256)])
    assert set(labels.tolist()) == set(range(10))
    assert digits_shards(size=16, num_shards=4, root=str(tmp_path)) == (pattern, n)  # cached


def test_embedded_split_is_stratified_disjoint_and_complete(tmp_path):
    from sklearn.datasets import load_digits
    target = load_digits().target
    keys, labels = {}, {}
    for split in SPLITS:
        pattern, n = digits_shards(size=16, num_shards=4, root=str(tmp_path), split=split)
        samples = [s for url in expand_shards([pattern])
                   for s in wds.tarfile_samples([{"url": url}])]
        keys[split] = [int(s["__key__"]) for s in samples]
        labels[split] = np.array([int(s["cls"]) for s in samples])
        assert len(keys[split]) == len(set(keys[split])) == n
        assert (labels[split] == target[keys[split]]).all()
    assert sorted(keys["train"] + keys["val"]) == list(range(NUM_IMAGES))
    # every class held out in the set's proportion, to within one image
    for c in range(10):
        share = (target == c).sum() * HELD_OUT_FRACTION
        assert abs((labels["val"] == c).sum() - share) <= 1


def test_embedded_set_has_a_shard_for_every_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("LGP_DS_CACHE", str(tmp_path))
    data = TrainData(Config(img_size=16, num_workers=12), batch_per_rank=8, transform=None)
    assert len(data.urls) == 12  # 8 shards would leave 4 of the 12 workers without one


@pytest.mark.parametrize("world,workers", [(1, 0), (3, 0), (2, 2)])
def test_ordered_batches_give_every_image_once_in_dataset_order(tmp_path, world, workers):
    from torchvision.transforms import ToTensor
    urls = expand_shards([make_shards(tmp_path, [5, 3, 4, 2, 6])])  # 20 images, 5 shards
    got = [b for rank in range(world)
           for b in ordered_batches(urls, ToTensor(), 4, rank, world, workers)]
    index = torch.cat([b[0] for b in got])
    assert len(index) == 20 and len(set(index.tolist())) == 20  # each image once, no padding
    order = index.argsort()
    images, labels = torch.cat([b[1] for b in got])[order], torch.cat([b[2] for b in got])[order]
    single = list(ordered_batches(urls, ToTensor(), 7, 0, 1))
    assert torch.equal(torch.cat([b[0] for b in single]), index[order])  # one reader: in order
    assert torch.equal(torch.cat([b[1] for b in single]), images)
    assert torch.equal(torch.cat([b[2] for b in single]), labels)


def test_ordered_batches_name_a_corrupt_sample(tmp_path):
    from torchvision.transforms import ToTensor
    urls = expand_shards([make_shards(tmp_path, [3, 3], corrupt={(1, 2)})])
    with pytest.raises(DataError, match=r"sample '1-2' in .*s-01.tar"):
        list(ordered_batches(urls, ToTensor(), 4, 0, 1))
    garbage = write_garbage(tmp_path / "garbage.tar")
    with pytest.raises(DataError, match="garbage.tar"):
        list(ordered_batches([garbage], ToTensor(), 4, 0, 1))


def test_ordered_batches_refuse_a_sample_without_a_label(tmp_path):
    from torchvision.transforms import ToTensor
    with wds.TarWriter(str(tmp_path / "u.tar")) as sink:
        sink.write({"__key__": "a", "png": png(0), "cls": b"3"})
        sink.write({"__key__": "b", "png": png(1)})  # evaluation cannot score it
    with pytest.raises(DataError, match=r"sample 'b' in .*u.tar has no integer class label"):
        list(ordered_batches([str(tmp_path / "u.tar")], ToTensor(), 4, 0, 1))
