"""Image transforms: MoCo v3's two asymmetric augmented views, MAE's one light view, and the
unaugmented view that evaluation reads."""
import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalised_tensor() -> list:
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def moco_view_transforms(img_size: int = 224, crop_min: float = 0.08):
    """The two MoCo v3 / BYOL view pipelines: PIL image -> float tensor [3, img_size, img_size].

    View 1 is always blurred; view 2 is blurred with p=0.1 and solarised with p=0.2. The blur's
    sigma range (0.1, 2.0) is MoCo's for 224 px images and scales with ``img_size``.
    """
    kernel = max(3, int(0.1 * img_size) // 2 * 2 + 1)  # odd, about 10% of the image
    scale = img_size / 224
    blur = T.GaussianBlur(kernel, sigma=(0.1 * scale, 2.0 * scale))
    common = [T.RandomResizedCrop(img_size, scale=(crop_min, 1.0)),
              T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
              T.RandomGrayscale(p=0.2)]
    tail = [T.RandomHorizontalFlip()] + _to_normalised_tensor()
    view1 = T.Compose(common + [T.RandomApply([blur], p=1.0)] + tail)
    view2 = T.Compose(common + [T.RandomApply([blur], p=0.1), T.RandomSolarize(128, p=0.2)] + tail)
    return view1, view2


def mae_view_transform(img_size: int = 224, crop_min: float = 0.2):
    """MAE's pre-training view: RandomResizedCrop (bicubic, scale (crop_min, 1)) and a flip."""
    return T.Compose([T.RandomResizedCrop(img_size, scale=(crop_min, 1.0),
                                          interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip()] + _to_normalised_tensor())


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
