"""A small seeded, procedural multi-modality image set: the default data of the demo pretraining.

Four stand-in modalities with the statistics that make multi-modality pretraining Non-IID (App. A): grey CT-like
slices with Gaussian noise, X-ray-like projections, colour fundus-like photographs and H&E pathology-like
tiles. Every image is a pure function of (seed, index), so loaders with any number of workers agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

MODALITIES = ("ct", "xray", "fundus", "pathology")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    cos, sin = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    return ((dx * cos + dy * sin) / rx) ** 2 + ((dy * cos - dx * sin) / ry) ** 2 <= 1.0


def _ct(rng, yy, xx):
    img = np.zeros_like(yy)
    img[_ellipse(yy, xx, 0, 0, rng.uniform(0.6, 0.8), rng.uniform(0.75, 0.9))] = 0.45  # soft tissue
    for _ in range(rng.integers(2, 5)):  # organs
        img[_ellipse(yy, xx, *rng.uniform(-0.4, 0.4, 2), *rng.uniform(0.08, 0.25, 2), rng.uniform(0, np.pi))] = (
            rng.uniform(0.5, 0.7))
    spine = _ellipse(yy, xx, rng.uniform(0.3, 0.45), 0, 0.1, 0.1)
    img[spine] = 1.0  # bone
    img = img + rng.normal(0, 0.04, img.shape)
    return np.repeat(np.clip(img, 0, 1)[..., None], 3, axis=2)


def _xray(rng, yy, xx):
    img = 0.15 + 0.55 * np.exp(-(xx**2) / 0.5)
    for side in (-1, 1):  # lung fields are darker
        img[_ellipse(yy, xx, -0.05, side * 0.35, 0.55, 0.25)] -= 0.3
    for k in range(rng.integers(5, 8)):  # ribs
        img += 0.12 * (np.abs(yy - (-0.6 + 0.2 * k) - 0.15 * np.abs(xx)) < 0.025)
    img += rng.normal(0, 0.02, img.shape)
    return np.repeat(np.clip(img, 0, 1)[..., None], 3, axis=2)


def _fundus(rng, yy, xx):
    radius = np.sqrt(yy**2 + xx**2)
    disc = radius < 0.9
    shade = np.clip(1.1 - radius, 0, 1)
    img = np.stack([0.85 * shade, 0.35 * shade, 0.1 * shade], axis=2) * disc[..., None]
    cy, cx = rng.uniform(-0.15, 0.15), rng.choice([-0.45, 0.45])
    img[_ellipse(yy, xx, cy, cx, 0.13, 0.12)] = (1.0, 0.9, 0.6)  # optic disc
    for angle in rng.uniform(0, 2 * np.pi, rng.integers(4, 8)):  # vessels leaving the disc
        bend = rng.uniform(-0.6, 0.6)
        along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle) - bend * along**2
        img[(np.abs(across) < 0.015) & (along > 0) & disc] *= 0.45
    return np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)


def _pathology(rng, yy, xx):
    img = np.stack([np.full_like(yy, 0.93), np.full_like(yy, 0.72), np.full_like(yy, 0.85)], axis=2)  # eosin
    for _ in range(rng.integers(20, 40)):  # haematoxylin nuclei
        nucleus = _ellipse(yy, xx, *rng.uniform(-1, 1, 2), *rng.uniform(0.03, 0.07, 2), rng.uniform(0, np.pi))
        img[nucleus] = (0.35, 0.2, 0.6) + rng.normal(0, 0.03, 3)
    return np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)


_GENERATORS = {"ct": _ct, "xray": _xray, "fundus": _fundus, "pathology": _pathology}


def synthetic_image(seed: int, index: int, size: int) -> tuple[np.ndarray, str]:
    """The image of ``index``: an [size, size, 3] float array in [0, 1] and its modality."""
    rng = np.random.default_rng([seed, index])
    modality = MODALITIES[index % len(MODALITIES)]
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    return _GENERATORS[modality](rng, yy, xx), modality


class SyntheticModalityImages(Dataset):
    """``length`` images of ``size`` px, z-scored with the ImageNet statistics as the paper's pipeline does.

    Items are [3, size, size] float32 tensors; ``flip`` mirrors an image with probability 1/2.
    """

    def __init__(self, length: int = 512, size: int = 64, seed: int = 0, flip: bool = True) -> None:
        self.length, self.size, self.seed, self.flip = length, size, seed, flip
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.length

    def modality(self, index: int) -> str:
        return MODALITIES[index % len(MODALITIES)]

    def __getitem__(self, index: int) -> torch.Tensor:
        image, _ = synthetic_image(self.seed, index, self.size)
        tensor = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
        if self.flip and torch.rand(()) < 0.5:  # torch's RNG: seeded per loader worker, new every epoch
            tensor = tensor.flip(-1)
        return (tensor - self.mean) / self.std
