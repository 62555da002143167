"""Pretraining augmentation (App. C.2.1): random resized crop that refuses near-black crops, horizontal flip,
random affine, then the shared tail of :class:`dex.data.preprocess.Preprocessing` (clamp, grey to 3 channels,
ImageNet z-score). The evaluation transform is :class:`~dex.data.preprocess.Preprocessing` itself."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dex.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalTransform", "PretrainTransform"]


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

    def __call__(self, image: Tensor) -> Tensor:
        image = self.crop(image)
        if torch.rand(()) < self.p:
            image = TF.horizontal_flip(image)
        if torch.rand(()) < self.p:
            angle = float(torch.empty(()).uniform_(-self.degrees, self.degrees))
            image = TF.affine(image, angle=angle, translate=[0, 0], scale=1.0, shear=[0.0, 0.0])
        return self.preprocessing.standardize(image)


def EvalTransform(size: int = 256) -> Preprocessing:  # noqa: N802 (kept for its callers: a name, not a copy)
    """[C, H, W] in [0, 1] -> [3, size, size] z-scored: the whole image resized (no crop, no randomness), i.e. the
    default :class:`~dex.data.preprocess.Preprocessing` at ``size``."""
    return Preprocessing(size=size)
