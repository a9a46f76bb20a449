"""input_backend=dali: the training stream on NVIDIA DALI. Here on DALI's CPU pipeline (CI has
no GPU; tests/gpu_checks.py checks the nvJPEG decode): every rank takes exactly its batches
from shards of its own, the stream is a function of (seed, epoch, rank), a resume continues it
exactly, and the crops have the distribution of crops.CropViews' (torchvision's boxes)."""
import io
import math
import re

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

import jobs
from lgp_ds import config, dist
from lgp_ds.config import Config, build_config
from lgp_ds.data.crops import RATIO, CropViews
from lgp_ds.data.photos import photo_jpegs, write_photo_shards
from lgp_ds.data.shards import DataError, expand_shards, rank_shards
from lgp_ds.data.transforms import Crop
from multirank import run_ranks
from tarfiles import make_shards, numbered_shards
from test_fast_input import _ks, _open
from test_stream import same

DALI_MISSING = 'NVIDIA DALI is not installed (pip install -e ".[dali]")'


@pytest.fixture(scope="module")
def dali():
    """lgp_ds.data.dali where NVIDIA DALI is installed; else the test is skipped, saying why."""
    pytest.importorskip("nvidia.dali", reason=DALI_MISSING)
    from lgp_ds.data import dali
    return dali


def dali_config(pattern: str, **keys) -> Config:
    return Config(**{**dict(data=[pattern], input_backend="dali", augment_on="device",
                            img_size=16, shuffle_buffer=16, seed=5, num_workers=2), **keys})


def stream(dali, pattern: str, epoch: int, count: int, crops=(Crop(0.5), Crop(0.5)),
           batch: int = 4, **keys) -> list:
    return list(dali.DaliTrainData(dali_config(pattern, **keys), batch, list(crops))
                .batches(epoch, count))


def test_config_keys_that_dali_cannot_serve_are_refused(monkeypatch):
    def refused(match, **keys):
        with pytest.raises(ValueError, match=match):
            build_config({"input_backend": "dali", "augment_on": "device", **keys})

    refused(r"input_backend='dali' makes only the views' crops: set augment_on=device",
            augment_on="cpu")
    refused(r"input_backend='dali' applies to pre-training: method=finetune", method="finetune")
    for keys in ({"resampled_shards": True}, {"subset_fraction": 0.1}):
        refused(r"resampled_shards, subset and subset_fraction need input_backend=webdataset",
                **keys)
    monkeypatch.setattr(config, "dali_installed", lambda: False)
    refused(r'needs NVIDIA DALI: pip install -e "\.\[dali\]" \(with CUDA 13: pip install '
            r'nvidia-dali-cuda130\)')
    build_config({})  # the default backend needs no DALI


def test_every_rank_takes_its_batches_from_shards_of_its_own(dali, tmp_path, monkeypatch):
    """Two ranks (one process playing each in turn) on 5 shards of unequal size: each takes
    exactly ``count`` batches of uint8 views [4,3,16,16] and the labels of its own shards, as
    the webdataset path deals them, cycling through them where an epoch asks for more."""
    sizes = [10, 3, 7, 5, 6]
    pattern = numbered_shards(tmp_path, sizes)
    urls = expand_shards([pattern])
    first = {url: sum(sizes[:i]) for i, url in enumerate(urls)}
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        got = stream(dali, pattern, epoch=3, count=7)
        assert len(got) == 7
        for *views, labels, skipped in got:
            assert [(v.shape, v.dtype, v.device.type) for v in views] == \
                [((4, 3, 16, 16), torch.uint8, "cpu")] * 2
            assert labels.dtype == torch.int64 and not skipped.any()
        own = {n for url in rank_shards(urls, 5, 3, rank, 2)
               for n in range(first[url], first[url] + sizes[urls.index(url)])}
        labels = [int(n) for b in got for n in b[-2]]
        assert set(labels) <= own and len(labels) > len(own)  # more than a pass: cycled
        seen.append(set(labels))
    assert not seen[0] & seen[1]


def test_same_seed_same_stream_whatever_the_thread_count(dali, tmp_path):
    pattern = numbered_shards(tmp_path, [12] * 3)
    first = stream(dali, pattern, 0, 5)
    assert same(first, stream(dali, pattern, 0, 5, num_workers=1))
    for other in (stream(dali, pattern, 0, 5, seed=6), stream(dali, pattern, 1, 5)):
        assert not same(first, other)
        assert not torch.equal(torch.cat([b[2] for b in first]), torch.cat([b[2] for b in other]))


def test_resume_continues_the_epoch_exactly(dali, tmp_path, capsys):
    """The state a checkpoint saves mid-epoch (past the end of a pass over the rank's shards)
    restores DALI's pipeline: the rest of the epoch is the uninterrupted run's; a stream left
    mid-epoch goes on where it was; with other shards the epoch restarts, with a note."""
    pattern = numbered_shards(tmp_path, [12, 12])
    epoch, count, stop = 1, 9, 7  # 6 batches a pass
    straight = stream(dali, pattern, epoch, count)
    data = dali.DaliTrainData(dali_config(pattern), 4, [Crop(0.5), Crop(0.5)])
    batches = data.batches(epoch, count)
    taken = [next(batches) for _ in range(stop)]
    state = data.state_dict()
    assert same(taken, straight[:stop]) and isinstance(state["dali"], bytes)
    assert same(list(data.batches(epoch, count, skip=stop)), straight[stop:])

    resumed = dali.DaliTrainData(dali_config(pattern), 4, [Crop(0.5), Crop(0.5)])
    resumed.resume(state, epoch, stop)
    assert same(list(resumed.batches(epoch, count, skip=stop)), straight[stop:])
    assert capsys.readouterr().out == ""

    resumed.resume({**state, "shards": "3 shards, 0123456789ab"}, epoch, stop)
    assert re.search(r"data names 2 shards, \w{12}, the run that saved it read 3 shards, "
                     r"0123456789ab \(other shards", capsys.readouterr().out)
    assert same(list(resumed.batches(epoch, count, skip=stop)), straight[:count - stop])


def test_labels_are_the_cls_integers_or_minus_one(dali, tmp_path):
    pattern = numbered_shards(tmp_path, [8], unlabelled={2, 5})
    with wds.TarWriter(str(tmp_path / "n-01.tar")) as sink:  # a class name: no integer label
        sink.write({"__key__": "named", "png": _png(np.zeros((8, 8, 3), np.uint8)),
                    "cls": b"n01440764"})
    (batch,) = stream(dali, pattern.replace("00..00", "00..01"), 0, 1, batch=9,
                      shuffle_buffer=1)
    assert sorted(batch[-2].tolist()) == [-1, -1, -1, 0, 1, 3, 4, 6, 7]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


N = 2000  # crops per view measured below
KS_LIMIT = 1.95 * math.sqrt(2 / N)  # two-sample KS, level 1e-3 (as tests/test_fast_input.py)
WIDTH, HEIGHT = 128, 96


def test_crop_boxes_and_flips_have_torchvisions_distribution(dali, tmp_path):
    """A 128x96 image whose red is twice its column and green twice its row, cut into 128 px
    views: the resize only enlarges, linearly inside the box, so a view's range of red spans
    (1 - 1/128) of its box's width (DALI's boxes are fractional: pixels measure them), green
    likewise. N boxes of each view (bilinear crop_min 0.08, MoCo's; bicubic 0.2, MAE's) against
    N of RandomResizedCrop.get_params (CropViews' boxes) on an image of that size: area and
    aspect ratio by a KS test at level 1e-3; the flips (red falling left to right) at p=0.5
    within 4 standard deviations. Measured over seeds 5-12: KS at most 0.047 (bound 0.062),
    mean area within 3% of torchvision's; crop_min 0.04 higher, aspect ratios from [0.7, 1.4]
    or flips with p=0.45 fail it."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = 2 * np.arange(WIDTH)[None], 2 * np.arange(HEIGHT)[:, None]
    with wds.TarWriter(str(tmp_path / "grad.tar")) as sink:
        for i in range(50):
            sink.write({"__key__": f"{i:03d}", "png": _png(pixels), "cls": b"0"})
    crops = [Crop(0.08), Crop(0.2, InterpolationMode.BICUBIC)]
    data = dali.DaliTrainData(dali_config(str(tmp_path / "grad.tar"), img_size=WIDTH), 100, crops)
    measured = [[] for _ in crops]  # per view: [width, height, flipped] of each box
    for *views, _, _ in data.batches(0, N // 100):
        for boxes, view in zip(measured, views):
            red, green = view[:, 0].float() / 2, view[:, 1].float() / 2
            boxes.append(torch.stack([red.amax((1, 2)) - red.amin((1, 2)),
                                      green.amax((1, 2)) - green.amin((1, 2)),
                                      red[:, 0, 0] > red[:, 0, -1]], 1))
    torch.manual_seed(0)
    for crop, boxes in zip(crops, measured):
        width, height, flipped = torch.cat(boxes).T
        width, height = (x * WIDTH / (WIDTH - 1) for x in (width, height))
        want = torch.tensor([RandomResizedCrop.get_params(
            Image.new("RGB", (WIDTH, HEIGHT)), [crop.crop_min, 1.0], list(RATIO))[2:]
            for _ in range(N)]).float()  # (height, width) each
        for name, ours, theirs in (("area", width * height, want.prod(1)),
                                   ("aspect", width / height, want[:, 1] / want[:, 0])):
            assert _ks(ours, theirs) <= KS_LIMIT, (crop, name)
        assert abs(flipped.mean() - 0.5) <= 4 * math.sqrt(0.25 / N), crop


def test_crop_colours_match_cropviews_on_photos(dali, tmp_path):
    """Views of photo-like JPEGs (32 px, MoCo's crop): per view, the channel means and the
    spread of its pixels have CropViews' distribution by a KS test at level 1e-3 (1000 views a
    side): the same decode to RGB and resize, up to the filters. Measured over seeds 5-10: KS
    at most 0.042 (bound 0.087); decoding to BGR fails it."""
    n = 1000
    pattern = write_photo_shards(str(tmp_path), 20, 2)
    got = torch.cat([b[0] for b in stream(dali, pattern, 0, n // 50, [Crop(0.08)], batch=50,
                                          img_size=32)])
    torch.manual_seed(0)
    photos = photo_jpegs(20)  # the images of those shards
    cropper = CropViews(32, [Crop(0.08)])
    want = torch.stack([cropper(_open(photos[i % len(photos)]))[0] for i in range(n)])
    limit = 1.95 * math.sqrt(2 / n)
    for name, stat in (("mean", lambda x: x.float().mean((2, 3))),
                       ("std", lambda x: x.float().std((2, 3)))):
        ours, theirs = stat(got), stat(want)
        for c in range(3):
            assert _ks(ours[:, c], theirs[:, c]) <= limit, (name, "rgb"[c])


def test_corrupt_data_stops_the_run_naming_the_shards(dali, tmp_path):
    """DALI cannot skip what it fails to decode: a truncated JPEG or a file that is no image
    stops the stream with a DataError naming the shards (and the sample, where DALI does)."""
    jpegs = photo_jpegs(6)
    jpegs[4] = jpegs[4][:len(jpegs[4]) // 2]
    with wds.TarWriter(str(tmp_path / "t.tar")) as sink:
        for i, jpeg in enumerate(jpegs):
            sink.write({"__key__": f"{i:03d}", "jpg": jpeg})
    with pytest.raises(DataError, match=r"rank 0, epoch 0, batch \d: DALI stopped on data it "
                                        r"cannot use \(Failed to decode sample .*t\.tar:\d+:"
                                        r"004\.jpg\).*input_backend=webdataset"):
        stream(dali, str(tmp_path / "t.tar"), 0, 2)
    garbage = make_shards(tmp_path, [4, 4], corrupt={(1, 2)})
    with pytest.raises(DataError, match=r"nvImageCodec failure.* This rank's shards: "
                                        r".*s-0[01]\.tar, .*s-0[01]\.tar\."):
        stream(dali, garbage, 0, 4)


def test_remote_shards_and_too_few_shards_are_refused(dali, tmp_path, monkeypatch):
    pattern = numbered_shards(tmp_path, [4])
    cfg = dali_config("pipe:cat a.tar")
    with pytest.raises(ValueError, match="input_backend=dali reads local shard files"):
        dali.DaliTrainData(cfg, 4, [Crop(0.5)])
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"1 shard\(s\) .* cannot feed 2 ranks"):
        dali.DaliTrainData(dali_config(pattern), 4, [Crop(0.5)])


def test_training_with_dali_continues_exactly_after_a_resume(dali, tmp_path):
    """MTL (two MoCo views and MAE's, bicubic) on 2 ranks with input_backend=dali: 4 steps
    straight against 3 whose last checkpoint never completed and a resume from step 2, in the
    middle of an epoch: the DALI state travels in the checkpoint and the runs agree bit for bit."""
    data = make_shards(tmp_path, [10] * 4)
    keys = dict(method="mtl", frozen_patch_embed=False, num_stages=1, stage_blrs=[1e-2],
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                input_backend="dali", augment_on="device", num_workers=1)
    out = run_ranks(jobs.resume_job, 2, False, data, str(tmp_path), keys)
    for rank in out:
        straight, resumed = rank["straight"], rank["resumed"]
        assert resumed["step"] == straight["step"] == 4
        for name, value in straight["weights"].items():
            assert torch.equal(resumed["weights"][name], value), name
    metrics = out[0]["metrics"]
    assert [(r["step"], r["loss"]) for r in metrics["split"]] == \
        [(r["step"], r["loss"]) for r in metrics["straight"]]
    assert all(math.isfinite(r["loss"]) for r in metrics["straight"])
