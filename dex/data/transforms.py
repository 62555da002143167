"""Pretraining augmentation (App. C.2.1): random resized crop that refuses near-black crops, horizontal flip,
random affine, then the shared tail of :class:`dex.data.preprocess.Preprocessing` (clamp, grey to 3 channels,
ImageNet z-score); and the views of multi-view methods (M-IDoL): :class:`ViewAugmentation`,
:class:`MultiViewTransform`.
The evaluation transform is :class:`~dex.data.preprocess.Preprocessing` itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dex.config import STRICT
from dex.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MultiViewTransform", "PretrainTransform", "ViewAugmentation"]


class PretrainTransform:
    """[C, H, W] float image in [0, 1] (C = 1 or 3) -> [3, size, size] z-scored tensor.

    The random resized crop (area ``scale``, aspect ``ratio``) is redrawn while the crop's mean is under
    ``min_mean`` (a mostly black crop), up to ``tries`` times, then a centre square crop is taken; the reference code
    also floors the crop area at ``min_area`` of the image (0 here unless set). Then a horizontal flip and a random
    affine rotation of up to ``degrees``, each with probability ``p``, and ``preprocessing.standardize`` (clamp,
    channels, z-score; the crop is resized by ``preprocessing.resize``). Randomness comes from torch's generator, so
    seeded loaders reproduce.
    """

    def __init__(self, size: int = 256, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), min_mean: float = 0.05, tries: int = 10,
                 degrees: float = 15.0, p: float = 0.5, min_area: float = 0.0) -> None:
        self.size, self.scale, self.ratio = size, (max(scale[0], min_area), scale[1]), ratio
        self.min_mean, self.tries, self.degrees, self.p = min_mean, tries, degrees, p
        self.preprocessing = Preprocessing(size=size)

    def crop(self, image: Tensor) -> Tensor:
        for _ in range(self.tries):
            top, left, height, width = v2.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
            crop = image[:, top: top + height, left: left + width]
            if float(crop.mean()) >= self.min_mean:
                return self.preprocessing.resize(crop)
        side = min(image.shape[-2:])
        return self.preprocessing.resize(TF.center_crop(image, [side, side]))

    def geometric(self, image: Tensor) -> Tensor:
        """The crop, flip and rotation: [C, H, W] in [0, 1] -> [C, size, size] in [0, 1]."""
        image = self.crop(image)
        if torch.rand(()) < self.p:
            image = TF.horizontal_flip(image)
        if torch.rand(()) < self.p:
            angle = float(torch.empty(()).uniform_(-self.degrees, self.degrees))
            image = TF.affine(image, angle=angle, translate=[0, 0], scale=1.0, shear=[0.0, 0.0])
        return image

    def __call__(self, image: Tensor) -> Tensor:
        return self.preprocessing.standardize(self.geometric(image))


@STRICT
@dataclass
class ViewAugmentation:
    """The views of a multi-view (contrastive) method, each drawn independently from one image (all ours: M-IDoL's
    sources do not give them). Geometry as :class:`PretrainTransform` (crop area ``scale``, flip and rotation up
    to ``degrees`` each with probability ``p``); then, with probability ``intensity_p``, the intensity changes
    that mean something for grey-scale scans as for colour images (no hue or saturation): gamma log-uniform in
    ``gamma``, contrast scaled about the image mean by a factor uniform in 1 +- ``contrast``, brightness shifted
    by uniform +- ``brightness`` (intensities in [0, 1], clamped); a Gaussian blur of sigma uniform in
    ``blur_sigma`` with probability ``blur_p``; additive Gaussian noise of std ``noise`` with probability
    ``noise_p``."""

    views: int = 2
    scale: tuple[float, float] = (0.25, 1.0)
    degrees: float = 15.0
    p: float = 0.5
    intensity_p: float = 0.8
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: float = 0.3
    brightness: float = 0.1
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    noise_p: float = 0.2
    noise: float = 0.03

    def __post_init__(self) -> None:
        if self.views < 2:
            raise ValueError(f"views: a multi-view method needs at least 2 views per image, got {self.views}")
        if not 0 < self.gamma[0] <= self.gamma[1]:
            raise ValueError(f"gamma: a range of positive exponents (low <= high), got {self.gamma}")


class MultiViewTransform:
    """[C, H, W] float image in [0, 1] -> [V, 3, size, size] z-scored views (:class:`ViewAugmentation`), drawn
    from torch's generator so that seeded loaders reproduce."""

    def __init__(self, size: int = 256, augmentation: ViewAugmentation | None = None) -> None:
        self.augmentation = augmentation or ViewAugmentation()
        a = self.augmentation
        self.geometry = PretrainTransform(size, scale=a.scale, degrees=a.degrees, p=a.p)

    def intensity(self, image: Tensor) -> Tensor:
        a = self.augmentation
        if torch.rand(()) < a.intensity_p:
            low, high = torch.tensor(a.gamma).log()
            image = image.clamp(0, 1) ** float(torch.empty(()).uniform_(float(low), float(high)).exp())
            mean = image.mean()
            image = (image - mean) * float(torch.empty(()).uniform_(1 - a.contrast, 1 + a.contrast)) + mean
            image = (image + float(torch.empty(()).uniform_(-a.brightness, a.brightness))).clamp(0, 1)
        if torch.rand(()) < a.blur_p:
            sigma = float(torch.empty(()).uniform_(*a.blur_sigma))
            kernel = min(2 * int(3 * sigma + 0.5) + 1, (min(image.shape[-2:]) // 2) * 2 - 1)
            image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        if torch.rand(()) < a.noise_p:
            image = (image + a.noise * torch.randn_like(image)).clamp(0, 1)
        return image

    def __call__(self, image: Tensor) -> Tensor:
        standardize = self.geometry.preprocessing.standardize
        return torch.stack([standardize(self.intensity(self.geometry.geometric(image)))
                            for _ in range(self.augmentation.views)])
