"""The geometric half of the views, on the CPU: random resized crops and flips of an image that
is decoded only as far as its crops need, as uint8 tensors whose photometric half
(:mod:`lgp_ds.data.device_augment`) runs on the device (``augment_on: device``).

Per image: every view's crop box is drawn as torchvision's ``RandomResizedCrop`` draws it, from
the image's size alone (PIL knows it after opening the file, before decoding); a JPEG is then
decoded once for all views, reduced by the largest factor (2, 4, 8: PIL's draft mode, libjpeg's
scaled decoding) at which every box still spans at least the output size each way; each box is
resized (antialiased, from its exact place in the reduced image) and flipped with p=0.5. The
boxes, drawn on the full-size image, have torchvision's distribution exactly.
"""
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from .transforms import Crop

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
JPEG_SCALES = (8, 4, 2)  # the reductions libjpeg decodes to directly, largest first


def jpeg_scale(boxes: list[tuple[int, int, int, int]], size: int) -> int:
    """The largest JPEG reduction (8, 4, 2, else 1) that keeps every box (top, left, height,
    width) at least ``size`` pixels high and wide."""
    smallest = min(min(h, w) for _, _, h, w in boxes)
    return next((s for s in JPEG_SCALES if smallest >= size * s), 1)


class CropViews:
    """RGB PIL image (opened, pixels not necessarily decoded yet) -> tuple of uint8 tensors
    [3, size, size], one per :class:`Crop`, each flipped with p=0.5 (see the module)."""

    def __init__(self, size: int, crops: list[Crop]):
        self.size, self.crops = size, list(crops)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, ...]:
        boxes = [RandomResizedCrop.get_params(img, [c.crop_min, 1.0], list(RATIO))
                 for c in self.crops]
        views = self.cut(img, boxes)
        return tuple(v.flip(-1) if torch.rand(1) < 0.5 else v for v in views)

    def cut(self, img: Image.Image, boxes: list[tuple[int, int, int, int]]) -> list[torch.Tensor]:
        """The crops ``boxes`` (top, left, height, width on the full-size image, one per
        :class:`Crop`) resized to [3, size, size] uint8, from one decode of ``img`` at the
        reduction they all allow (full size where ``img`` is decoded already or no JPEG)."""
        scale = jpeg_scale(boxes, self.size)
        width, height = img.size
        # draft() answers None where it cannot reduce (not a JPEG, or decoded already); else
        # the full image's extent in reduced pixels, (0, 0, width / scale, height / scale).
        drafted = img.draft("RGB", (width // scale, height // scale)) if scale > 1 else None
        img = img if img.mode == "RGB" else img.convert("RGB")
        if drafted:  # the boxes in reduced pixels are fractional: PIL resizes from them exactly
            scale = width / drafted[1][2]
            return [F.pil_to_tensor(img.resize(
                (self.size, self.size), Image.Resampling[crop.interpolation.name],
                box=(left / scale, top / scale, (left + w) / scale, (top + h) / scale)))
                for crop, (top, left, h, w) in zip(self.crops, boxes)]
        pixels = F.pil_to_tensor(img)  # torch resizes uint8 two to three times as fast as PIL
        return [F.resize(pixels[:, top:top + h, left:left + w], [self.size, self.size],
                         interpolation=crop.interpolation, antialias=True)
                for crop, (top, left, h, w) in zip(self.crops, boxes)]
