"""The fast input path (augment_on=device): JPEGs decoded at reduced size where the crops allow
it, only crops and flips on the CPU, the photometric part per sample on the device. Its views
must have the distribution of the plain torchvision path's."""
import io
import math
import random

import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, RandomResizedCrop

import fast_input_jobs
from jobs import tiny_config
from lgp_ds.data import device_augment
from lgp_ds.data.crops import CropViews, jpeg_scale
from lgp_ds.data.device_augment import augment
from lgp_ds.data.photos import photo_jpegs
from lgp_ds.data.shards import image_and_label
from lgp_ds.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, Crop, Photometric, View,
                                    moco_views, torchvision_view)
from multirank import run_ranks


def _open(data: bytes) -> Image.Image:
    img, _ = image_and_label({"jpg": data})
    return img


def _sharpness(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] -> [N]: mean absolute difference of horizontally adjacent pixels."""
    return (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))


def test_jpegs_are_opened_undecoded_and_other_modes_converted():
    img = _open(photo_jpegs(1)[0])
    assert img.mode == "RGB" and img.size in ((500, 375), (375, 500))
    assert img.tile  # size known, pixels still to decode: the crops may draft it
    buf = io.BytesIO()
    Image.new("L", (8, 6), 77).save(buf, format="PNG")
    grey = _open(buf.getvalue())
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)


def test_reduced_decode_gives_the_full_decode_crops():
    """Crops of JPEGs decoded at 1/2, 1/4 and 1/8 against the same boxes cut from the full
    decode (144 random boxes of 500x375 photos, 32 px crops). The reduction is libjpeg's DCT
    scaling, a block filter, where the full path's antialiased resize is a triangle filter
    twice as wide: they differ at edges, not in place or colour. Measured, per reduction:
    mean absolute difference 1.0-1.5 levels (of 255; at most 4.2 for one crop), channel means
    0.4 levels apart on average (at most 1.5), no bias (0.13), sharpness 3.5% lower at 1/8.
    Boxes rounded to whole reduced pixels instead (up to half a reduced pixel off) measured 3.1
    levels and channel means 0.9 levels apart: the bounds below (2 and 0.5) tell them apart."""
    size, cropper = 32, CropViews(32, [Crop(0.08)])
    torch.manual_seed(0)
    seen = {}
    for data in photo_jpegs(12, seed=5):
        for _ in range(12):
            box = RandomResizedCrop.get_params(_open(data), [0.08, 1.0], [3 / 4, 4 / 3])
            scale = jpeg_scale([box], size)
            lazy, full = _open(data), _open(data)
            full.load()
            (got,), (want,) = cropper.cut(lazy, [box]), cropper.cut(full, [box])
            assert lazy.size == tuple(-(-n // scale) for n in full.size)  # decoded reduced
            got, want = got.float()[None], want.float()[None]
            channels = (got.mean((2, 3)) - want.mean((2, 3)))[0]
            seen.setdefault(scale, []).append(torch.stack([
                (got - want).abs().mean(), channels.abs().mean(), channels.mean(),
                _sharpness(got)[0] / _sharpness(want)[0]]))
    assert set(seen) == {2, 4, 8}  # every box of these photos allows a reduction at 32 px
    for scale, rows in seen.items():
        diff, channel, bias, sharpness = torch.stack(rows).T
        assert diff.max() <= 6 and diff.mean() <= 2, (scale, diff.max(), diff.mean())
        assert channel.max() <= 2 and channel.mean() <= 0.5, (scale, channel.max(),
                                                              channel.mean())
        assert abs(bias.mean()) <= 0.25 and abs(sharpness.mean() - 1) <= 0.05, (
            scale, bias.mean(), sharpness.mean())


def test_crops_of_several_views_share_one_decode():
    """The reduction is the one every box allows: a small box keeps the image at full size."""
    assert jpeg_scale([(0, 0, 300, 280), (0, 0, 100, 280)], 32) == 2
    assert jpeg_scale([(0, 0, 300, 280)], 32) == 8
    assert jpeg_scale([(0, 0, 31, 280)], 32) == 1


@pytest.mark.parametrize("interpolation", [InterpolationMode.BILINEAR,
                                           InterpolationMode.BICUBIC])
def test_crops_are_torchvisions_crops_and_flips(interpolation):
    """Seeded alike, CropViews draws torchvision's boxes and flips: its crops of decoded images
    are RandomResizedCrop + RandomHorizontalFlip's, but for torch's uint8 resize against PIL's
    (0.03 levels apart on average; a wrong box or flip is tens of levels off)."""
    photos = [_open(p) for p in photo_jpegs(6, seed=3)]
    for img in photos:
        img.load()
    plain = T.Compose([T.RandomResizedCrop(64, scale=(0.2, 1.0), interpolation=interpolation),
                       T.RandomHorizontalFlip(), T.PILToTensor()])
    ours = CropViews(64, [Crop(0.2, interpolation)])
    for i in range(60):
        torch.manual_seed(i)
        want = plain(photos[i % 6]).float()
        torch.manual_seed(i)
        (got,) = ours(photos[i % 6])
        assert (got.float() - want).abs().mean() <= 0.5, i


def test_colour_jitter_and_blur_are_torchvisions_per_sample():
    """Replaying their draws (factors b, c, s, h, then a permutation per sample; a sigma per
    sample), the batched ops give torchvision's functional ops applied image by image."""
    x = torch.rand(6, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    got = device_augment.color_jitter(x, 0.4, 0.4, 0.2, 0.1)
    torch.manual_seed(1)
    factors = [torch.empty(6).uniform_(lo, hi) for lo, hi in
               ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))]
    order = torch.rand(6, 4).argsort(1)
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for i in range(6):
        want = x[i]
        for op in order[i].tolist():
            want = ops[op](want, float(factors[op][i]))
        assert torch.allclose(got[i], want, atol=1e-5), i
    torch.manual_seed(2)
    got = device_augment.gaussian_blur(x, 7, (0.1, 2.0))
    torch.manual_seed(2)
    for i, sigma in enumerate(torch.empty(6).uniform_(0.1, 2.0).tolist()):
        assert torch.allclose(got[i], F.gaussian_blur(x[i], [7, 7], [sigma, sigma]), atol=1e-5)


N = 2000  # draws per path: view statistics compared below
# Two-sample Kolmogorov-Smirnov distance at which the hypothesis "same distribution" is
# rejected at level 1e-3 with N draws on each side: 1.95 * sqrt(2 / N) = 0.062.
KS_LIMIT = 1.95 * math.sqrt(2 / N)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two ECDFs."""
    points = torch.cat([a, b])
    ecdf = [torch.searchsorted(s.sort().values, points, right=True) / len(s) for s in (a, b)]
    return (ecdf[0] - ecdf[1]).abs().max().item()


def _statistics(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image of [N,3,H,W] in [0, 1]: what the photometric ops change."""
    return {"grey": ((x[:, 0] - x[:, 1]).abs() + (x[:, 1] - x[:, 2]).abs()).amax((1, 2)) < 1e-3,
            # solarised views have no pixel at 128/255 or above, and so have very dark ones
            "dim": x.amax((1, 2, 3)) < 128 / 255,
            **{f"mean_{c}": x[:, i].mean((1, 2)) for i, c in enumerate("rgb")},
            "std": x.std((1, 2, 3)), "saturation": (x.amax(1) - x.amin(1)).mean((1, 2)),
            "sharpness": _sharpness(x)}


def _unnormalised(views: torch.Tensor) -> torch.Tensor:
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return views.cpu() * std + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the device path on the GPU"))])
def test_device_views_have_the_torchvision_views_distribution(device):
    """MoCo v3's photometric part of both views, N times each way, on the same N crops (64 px,
    of 12 photos): torchvision image by image on PIL, as the CPU path runs it, and the batched
    ops on the device. Per view: the fractions of grey views and of dim ones (solarised, or
    dark) agree within 4 standard deviations of a difference of two binomial fractions; what
    the ops change in channel means, contrast, saturation and sharpness (view minus crop, so
    that the crops' own spread cancels) has one distribution by a KS test at level 1e-3.
    Measured: every statistic within 0.65 of its bound; dropping view 1's blur, scaling its
    sigma by 1.5, solarising with p=0.3 or jittering with p=0.7 exceeds one by 1.5-2.3x."""
    size, photos = 64, photo_jpegs(12, seed=1)
    views = moco_views(size, 0.08)
    torch.manual_seed(0)
    random.seed(0)
    cropper = CropViews(size, [views[0].crop])
    crops = torch.stack([cropper(_open(photos[i % 12]))[0] for i in range(N)])
    before = _statistics(crops / 255)
    pils = [F.to_pil_image(c) for c in crops]
    dim = []
    for view in views:  # the whole crop, at its size: torchvision's photometric part alone
        plain = torchvision_view(size, View(Crop(1.0), view.photometric))
        want = _statistics(_unnormalised(torch.stack([plain(p) for p in pils])))
        got = _statistics(_unnormalised(torch.cat([
            augment(crops[s:s + 500].to(device), view.photometric) for s in range(0, N, 500)])))
        for name in want:
            if want[name].dtype == torch.bool:
                p, q = want[name].float().mean(), got[name].float().mean()
                pooled = (p + q) / 2
                assert abs(p - q) <= 4 * math.sqrt(2 * pooled * (1 - pooled) / N), (name, p, q)
            else:
                assert _ks(want[name] - before[name], got[name] - before[name]) <= KS_LIMIT, name
        grey = got["grey"].float().mean()
        assert abs(grey - 0.2) <= 4 * math.sqrt(0.16 / N), grey  # p=0.2 in both views
        dim.append(got["dim"].float().mean())
    # view 2 is solarised with p=0.2 and otherwise dim as often as view 1 (the same jitter)
    assert abs(dim[1] - (0.2 + 0.8 * dim[0])) <= 4 * math.sqrt(0.2 * 0.8 / N), dim


def test_device_augmentation_takes_uint8_views_only():
    with pytest.raises(TypeError, match=r"uint8 views \[B,3,H,W\], got torch.float32"):
        augment(torch.zeros(2, 3, 8, 8), Photometric())
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    want = (x / 255 - mean) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(augment(x, Photometric()), want, atol=1e-6)  # MAE's: normalise only


def test_finetune_refuses_device_augmentation():
    with pytest.raises(ValueError, match="config key augment_on='device' applies to pre-training"):
        tiny_config(method="finetune", augment_on="device")


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    return run_ranks(fast_input_jobs.device_augment_job,
                     str(tmp_path_factory.mktemp("fast_input")))


def test_training_with_device_augmentation(training):
    """MTL (two MoCo views with their photometric part, an MAE view normalised only) trains on
    the embedded data with augment_on=device on 2 ranks."""
    for rank in training:
        assert [r["step"] for r in rank["records"]] == [1, 2]
        assert all(math.isfinite(r["loss"]) for r in rank["records"])


def test_device_views_are_a_function_of_seed_micro_batch_and_rank(training):
    """The trainer seeds the device augmentation per micro-batch and rank: a resumed run
    draws what an uninterrupted one would, and the ranks draw differently."""
    (a, b), (c, _) = (rank["views"] for rank in training)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # the same micro-batch twice
    assert not torch.equal(a[0], c[0])  # rank 0 vs rank 1
    assert not torch.equal(a[0], a[1])  # the two MoCo views of one batch
    assert torch.equal(a[2], c[2])  # MAE's view, normalised only: nothing random
