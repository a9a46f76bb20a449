"""The photometric half of the views, on the device, per sample, on whole batches
(``augment_on: device``): MoCo v3's colour jitter, grayscale, Gaussian blur and solarisation,
then normalisation, of the uint8 views [B,3,H,W] that :class:`lgp_ds.data.crops.CropViews` cut.

Each op follows torchvision's (which :func:`lgp_ds.data.transforms.moco_view_transforms`
applies image by image on the CPU) with its own random draw per sample: ColorJitter's four
adjustments in a random order per sample, each with its own factor; a blur sigma per sample. The
ops compute in float on [0, 1], where torchvision's PIL path rounds to uint8 after each one.
Every draw comes from torch's global RNG of the batch's device, which the trainer seeds per
micro-batch and rank (``Trainer._forward_rng``), so a resumed run draws what an uninterrupted
one would. No op loops over samples or waits for the device.
"""
import torch
import torch.nn.functional as F

from .transforms import IMAGENET_MEAN, IMAGENET_STD, Photometric

_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601-2)


def augment(x: torch.Tensor, p: Photometric) -> torch.Tensor:
    """uint8 views [B,3,H,W] -> ``p`` applied to each (a draw per sample), normalised float32
    [B,3,H,W] on the same device. Horizontal flips, which commute with all of it, come with the
    crops."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise TypeError(f"device augmentation takes uint8 views [B,3,H,W], got {x.dtype} "
                        f"{list(x.shape)}: with augment_on=device the method's transform() "
                        f"makes them (crops only) and the device adds the rest")
    x = x.float() / 255
    if p.jitter_p:
        x = _where(_chance(x, p.jitter_p), color_jitter(x, *p.jitter), x)
    if p.grayscale_p:
        x = _where(_chance(x, p.grayscale_p), grayscale(x).expand_as(x), x)
    if p.blur_p:
        x = _where(_chance(x, p.blur_p), gaussian_blur(x, p.blur_kernel, p.blur_sigma), x)
    if p.solarize_p:  # torchvision's threshold 128 of uint8
        x = _where(_chance(x, p.solarize_p), torch.where(x >= 128 / 255, 1 - x, x), x)
    return normalise(x)


def _chance(x: torch.Tensor, p: float) -> torch.Tensor:
    """[B] bool on x's device: each sample's draw of an event of probability ``p``."""
    return torch.rand(x.shape[0], device=x.device) < p


def _where(chosen: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample (``chosen`` [B] bool): ``a`` where chosen, else ``b`` ([B,...] each)."""
    return torch.where(chosen.view(-1, *[1] * (a.dim() - 1)), a, b)


def _per_sample(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """[B,1,1,1] factors drawn uniformly from [low, high], one per sample."""
    return torch.empty(x.shape[0], 1, 1, 1, device=x.device).uniform_(low, high)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> luma [B,1,H,W]."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjustments: ``factor * x + (1 - factor) * other``, clipped to [0, 1]."""
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue rotated by ``shift`` [B,1,1,1] turns (torchvision's hue_factor), value and saturation
    kept: torchvision's RGB -> HSV -> RGB, with HSV -> RGB in its closed form: channel n of
    (5, 3, 1) is v - (v - min) clamp(min(k, 4 - k), 0, 1), k = (n + hue in sixths) mod 6."""
    value = x.amax(1, keepdim=True)  # [B,1,H,W], as the others
    spread = value - x.amin(1, keepdim=True)
    delta = spread.clamp(min=1e-12)  # 0 only for greys, whose hue does not matter
    r, g, b = x.split(1, dim=1)
    sixths = torch.where(r == value, (g - b) / delta,
                         torch.where(g == value, 2 + (b - r) / delta, 4 + (r - g) / delta))
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # 5, 3, 1: R, G, B
    k = (n + sixths + 6 * shift) % 6
    return value - spread * torch.minimum(k, 4 - k).clamp(0, 1)


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float,
                 hue: float) -> torch.Tensor:
    """torchvision's ColorJitter per sample: the four adjustments in an order drawn per sample
    (as its randperm), each with a factor drawn per sample from [1 - m, 1 + m] (hue: [-m, m]).

    Brightness, contrast and saturation each blend the image with something by their factor
    (black, the mean of its grey image, its grey image), so each of the four slots makes one
    blend, by factor 1 (no change) where the sample's slot holds the hue, and one hue rotation.
    """
    b, c, s = (_per_sample(x, 1 - m, 1 + m) for m in (brightness, contrast, saturation))
    h = _per_sample(x, -hue, hue)
    order = torch.rand(x.shape[0], 4, device=x.device).argsort(1)  # a permutation per sample
    for slot in range(4):
        op = order[:, slot].view(-1, 1, 1, 1)  # 0 brightness, 1 contrast, 2 saturation, 3 hue
        grey = grayscale(x)
        other = torch.where(op == 1, grey.mean((2, 3), keepdim=True), grey * (op == 2))
        factor = torch.where(op == 0, b, torch.where(op == 1, c, torch.where(op == 2, s, 1.0)))
        x = torch.where(op == 3, adjust_hue(x, h), _blend(x, other, factor))
    return x


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: tuple[float, float]) -> torch.Tensor:
    """torchvision's GaussianBlur (``kernel`` taps, reflect padding) with a sigma drawn per
    sample from ``sigma``: separable, as a grouped convolution with one kernel per sample."""
    n, c, height, width = x.shape
    sigmas = torch.empty(n, 1, device=x.device).uniform_(*sigma)
    taps = torch.linspace(-(kernel - 1) / 2, (kernel - 1) / 2, kernel, device=x.device)
    weights = torch.exp(-0.5 * (taps / sigmas) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, kernel]
    pad = kernel // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, height + 2 * pad,
                                                                width + 2 * pad)
    y = F.conv2d(y, weights.view(n * c, 1, 1, kernel), groups=n * c)
    y = F.conv2d(y, weights.view(n * c, 1, kernel, 1), groups=n * c)
    return y.view(n, c, height, width)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0, 1] -> (x - ImageNet mean) / std per channel, in place. Python scalars,
    not a tensor of them: copying one to the GPU would wait for the work queued there."""
    for channel, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
        x[:, channel].sub_(mean).div_(std)
    return x
