"""The training stream over an epoch and a resume: the same stream from the same seed, a
mid-epoch resume that continues it exactly without decoding the samples it skips, bad samples
inside a shard, another num_workers on resume, and more readers than shards (resampled)."""
import logging

import pytest
import torch

from lgp_ds.config import Config
from lgp_ds.data.pipeline import TrainData
from lgp_ds.data.shards import expand_shards, train_batches
from lgp_ds.data.transforms import Views, moco_view_transforms
from tarfiles import numbered_shards


class RecordingViews(Views):
    """The two MoCo views of an image, each image's number appended to the file ``log`` as they
    are made (DataLoader workers are other processes)."""

    def __init__(self, log):
        super().__init__(*moco_view_transforms(16, 0.5))
        self.log = str(log)

    def __call__(self, img):
        red, green, _ = img.getpixel((0, 0))  # decodes: a truncated file fails here
        with open(self.log, "a") as f:
            f.write(f"{red * 256 + green}\n")
        return super().__call__(img)


def decoded(log) -> list[int]:
    """The numbers of the images a RecordingViews writing to ``log`` made views of."""
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def train_data(pattern: str, log, workers: int, **keys) -> TrainData:
    cfg = Config(data=[pattern], num_workers=workers, img_size=16, shuffle_buffer=16, seed=5,
                 **keys)
    return TrainData(cfg, batch_per_rank=4, transform=RecordingViews(log))


def same(a: list, b: list) -> bool:
    """Whether two lists of batches hold equal tensors."""
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_stream(tmp_path, workers):
    urls = expand_shards([numbered_shards(tmp_path, [12] * 4)])
    views = Views(*moco_view_transforms(16, 0.5))

    def stream(seed, epoch=0):
        return list(train_batches(urls, views, 4, 5, 0, 1, workers, seed=seed, epoch=epoch,
                                  shuffle_buffer=8))

    first = stream(0)
    assert same(first, stream(0))
    for other in (stream(1), stream(0, epoch=1)):
        assert not torch.equal(torch.cat([b[2] for b in first]), torch.cat([b[2] for b in other]))


def interrupted(data: TrainData, epoch: int, count: int, stop: int) -> tuple[list, dict]:
    """The first ``stop`` batches of ``epoch`` and the data position a checkpoint then saves."""
    stream = data.batches(epoch, count)
    taken = [next(stream) for _ in range(stop)]
    return taken, data.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_epoch_exactly_without_decoding_the_skipped_samples(tmp_path,
                                                                               workers):
    # 120 samples, corrupt and unlabelled ones among them; each reader holds more samples than an
    # epoch (and the workers' prefetch) reads, so no sample comes twice in it
    pattern = numbered_shards(tmp_path, [30] * 4, truncated={3, 40, 77, 95},
                              unlabelled={5, 61})
    epoch, count, stop = 1, 8, 5
    straight = list(train_data(pattern, tmp_path / "a.log", workers).batches(epoch, count))
    taken, state = interrupted(train_data(pattern, tmp_path / "b.log", workers), epoch, count,
                               stop)
    assert same(taken, straight[:stop])
    assert int(sum(b[-1].sum() for b in straight)) > 0  # corrupt samples in the batches counted

    resumed = train_data(pattern, tmp_path / "c.log", workers)
    resumed.resume(state, epoch, stop)
    rest = list(resumed.batches(epoch, count, skip=stop))
    assert same(rest, straight[stop:])
    # The samples of the batches taken before the checkpoint are not decoded again.
    taken_samples = {int(n) for b in taken for n in b[-2]} - {-1}
    made = decoded(tmp_path / "c.log")
    assert made and not taken_samples & set(made)
    assert {int(n) for b in rest for n in b[-2]} - {-1} <= set(made)


def test_truncated_jpeg_and_missing_label_inside_a_shard(tmp_path, caplog):
    urls = expand_shards([numbered_shards(tmp_path, [10, 10], truncated={2, 13},
                                          unlabelled={4})])
    views = Views(*moco_view_transforms(16, 0.5))
    with caplog.at_level(logging.WARNING):
        # pre-training: a pass over the shards gives 18 images, one without a label
        (got,) = train_batches(urls, views, 18, 1, 0, 1, 0, seed=0, epoch=0, shuffle_buffer=1)
        assert int(got[3].sum()) == 2
        assert sorted(got[2].tolist()) == [-1] + sorted(set(range(20)) - {2, 4, 13})
        # training on labels, the unlabelled sample is skipped too; the stream goes on
        got = list(train_batches(urls, views, 17, 3, 0, 1, 0, seed=0, epoch=0, shuffle_buffer=1,
                                 labelled=True))
        assert [int(b[3].sum()) for b in got] == [3, 3, 3]
        assert all(sorted(b[2].tolist()) == sorted(set(range(20)) - {2, 4, 13}) for b in got)
    warned = [r.getMessage() for r in caplog.records]
    assert any("00013" in m and "could not be decoded" in m and "truncated" in m for m in warned)
    assert any("00004" in m and "has no integer class label" in m for m in warned)


def test_resume_with_other_num_workers_starts_the_rest_of_the_epoch_afresh(tmp_path, capsys):
    pattern = numbered_shards(tmp_path, [12] * 4)
    _, state = interrupted(train_data(pattern, tmp_path / "a.log", 2), 0, 6, 2)
    fewer = train_data(pattern, tmp_path / "b.log", 1)
    fewer.resume(state, 1, 0)  # at an epoch's start: nothing to continue, nothing to say
    assert capsys.readouterr().out == ""
    fewer.resume(state, 0, 2)
    note = capsys.readouterr().out
    assert "num_workers gives 1 reader(s) per rank, the run that saved it had 2" in note
    assert "the rest of epoch 0 comes from the head of its stream" in note
    rest = list(fewer.batches(0, 6, skip=2))
    assert same(rest, list(train_data(pattern, tmp_path / "c.log", 1).batches(0, 4)))


def test_resume_over_other_shards_of_the_same_count_starts_the_epoch_afresh(tmp_path, capsys):
    # the saved per-reader counts would land elsewhere in other shards: a note, not a silent
    # misplaced stream; the same shards moved to another folder continue exactly
    pattern = numbered_shards(tmp_path, [12] * 4)
    taken, state = interrupted(train_data(pattern, tmp_path / "a.log", 2), 0, 6, 2)
    (tmp_path / "b").mkdir()
    other = numbered_shards(tmp_path / "b", [10, 12, 14, 12])
    data = train_data(other, tmp_path / "b.log", 2)
    data.resume(state, 0, 2)
    assert "data names 4 shards, " in capsys.readouterr().out
    (tmp_path / "moved").mkdir()
    for shard in sorted(tmp_path.glob("n-*.tar")):
        shard.rename(tmp_path / "moved" / shard.name)
    moved = train_data(str(tmp_path / "moved" / "n-{00..03}.tar"), tmp_path / "c.log", 2)
    moved.resume(state, 0, 2)
    assert capsys.readouterr().out == ""
    assert same(list(moved.batches(0, 6, skip=2)),
                list(train_data(str(tmp_path / "moved" / "n-{00..03}.tar"), tmp_path / "d.log",
                                2).batches(0, 6))[2:])


def test_resampled_shards_feed_more_readers_than_shards(tmp_path):
    pattern = numbered_shards(tmp_path, [24], truncated={7})
    with pytest.raises(ValueError, match=r"1 shard\(s\) .* 2 worker\(s\) .*resampled_shards"):
        train_data(pattern, tmp_path / "a.log", 2)
    data = train_data(pattern, tmp_path / "a.log", 2, resampled_shards=True)
    straight = list(data.batches(0, 6))
    # each reader its own draws and order: batch 0 is worker 0's, batch 1 worker 1's
    assert not torch.equal(straight[0][2].sort().values, straight[1][2].sort().values)
    taken, state = interrupted(train_data(pattern, tmp_path / "b.log", 2, resampled_shards=True),
                               0, 6, 3)
    resumed = train_data(pattern, tmp_path / "c.log", 2, resampled_shards=True)
    resumed.resume(state, 0, 3)
    assert same(taken + list(resumed.batches(0, 6, skip=3)), straight)
