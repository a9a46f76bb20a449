"""Image transforms: MoCo v3's two asymmetric augmented views, MAE's one light view, and the
unaugmented view that evaluation reads.

A training view is specified once, as a :class:`View`: its geometry (:class:`Crop`) and its
photometric part (:class:`Photometric`). It is made either all on the CPU with torchvision on
the PIL image (:func:`torchvision_view`; ``augment_on: cpu``), or split: the crop on the CPU
(:mod:`lgp_ds.data.crops`) and the rest on the device (:mod:`lgp_ds.data.device_augment`;
``augment_on: device``).
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Crop:
    """A view's geometry: ``RandomResizedCrop(size, scale=(crop_min, 1), interpolation)``, then
    a horizontal flip with p=0.5."""
    crop_min: float
    interpolation: InterpolationMode = InterpolationMode.BILINEAR


@dataclass(frozen=True)
class Photometric:
    """A view's photometric part, in torchvision's order, then normalisation (the defaults: only
    that, MAE's view). ColorJitter(*``jitter``) with p=``jitter_p``; RandomGrayscale; a Gaussian
    blur of ``blur_kernel`` taps, sigma drawn from ``blur_sigma``, with p=``blur_p``; solarisation
    at 128 with p=``solarize_p``."""
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


class View(NamedTuple):
    """One view of an image, as its two parts: geometry (CPU) and photometric (CPU or device)."""
    crop: Crop
    photometric: Photometric


def moco_views(img_size: int = 224, crop_min: float = 0.08) -> list[View]:
    """The two MoCo v3 / BYOL views. View 1 is always blurred; view 2 is blurred with p=0.1 and
    solarised with p=0.2. The blur's sigma range (0.1, 2.0) is MoCo's for 224 px images and
    scales with ``img_size``."""
    kernel = max(3, int(0.1 * img_size) // 2 * 2 + 1)  # odd, about 10% of the image
    scale = img_size / 224
    colour = dict(jitter_p=0.8, grayscale_p=0.2, blur_kernel=kernel,
                  blur_sigma=(0.1 * scale, 2.0 * scale))
    return [View(Crop(crop_min), Photometric(**colour, blur_p=1.0)),
            View(Crop(crop_min), Photometric(**colour, blur_p=0.1, solarize_p=0.2))]


def mae_views(crop_min: float = 0.2) -> list[View]:
    """MAE's pre-training view: RandomResizedCrop (bicubic, scale (crop_min, 1)) and a flip."""
    return [View(Crop(crop_min, InterpolationMode.BICUBIC), Photometric())]


def _to_normalised_tensor() -> list:
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def torchvision_view(img_size: int, view: View) -> T.Compose:
    """``view`` all on the CPU: PIL image -> float tensor [3, img_size, img_size]."""
    crop, p = view
    steps = [T.RandomResizedCrop(img_size, scale=(crop.crop_min, 1.0),
                                 interpolation=crop.interpolation)]
    if p.jitter_p:
        steps.append(T.RandomApply([T.ColorJitter(*p.jitter)], p=p.jitter_p))
    if p.grayscale_p:
        steps.append(T.RandomGrayscale(p=p.grayscale_p))
    if p.blur_p:
        steps.append(T.RandomApply([T.GaussianBlur(p.blur_kernel, sigma=p.blur_sigma)],
                                   p=p.blur_p))
    if p.solarize_p:
        steps.append(T.RandomSolarize(128, p=p.solarize_p))
    return T.Compose(steps + [T.RandomHorizontalFlip()] + _to_normalised_tensor())


def moco_view_transforms(img_size: int = 224, crop_min: float = 0.08):
    """The two MoCo v3 views (:func:`moco_views`) on the CPU: PIL image -> float tensor
    [3, img_size, img_size] each."""
    return tuple(torchvision_view(img_size, v) for v in moco_views(img_size, crop_min))


def mae_view_transform(img_size: int = 224, crop_min: float = 0.2):
    """MAE's view (:func:`mae_views`) on the CPU: PIL image -> float tensor [3, H, W]."""
    return torchvision_view(img_size, mae_views(crop_min)[0])


def eval_transform(img_size: int = 224, crop_ratio: float = 0.875):
    """Evaluation's view (MAE's and MoCo v3's linear probe): resize the short side to
    ``img_size / crop_ratio`` (bicubic), centre crop ``img_size`` -> tensor [3, img_size, img_size]."""
    return T.Compose([T.Resize(round(img_size / crop_ratio),
                               interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size)] + _to_normalised_tensor())


class Views:
    """PIL image -> (view_1 [3,H,W], ..., view_k [3,H,W]), one per pipeline, in order."""

    def __init__(self, *pipelines):
        self.pipelines = pipelines

    def __call__(self, img) -> tuple[torch.Tensor, ...]:
        return tuple(p(img) for p in self.pipelines)
