"""The classification recipe's training augmentation, from timm: the transforms MAE and RETFound fine-tune with
(``timm.data.create_transform`` for training: a random resized crop, horizontal flips, RandAugment
``rand-m9-mstd0.5-inc1``, random erasing at p 0.25), over a picture read as dex reads it.

Grey-scale-aware (ours): a grey picture goes through RandAugment as a grey image and is repeated to the model's
channels afterwards, and random erasing fills with a constant (the mean: zero after the z-score) instead of per-pixel
colour noise, which would put colour into a grey image. RandAugment works on 8-bit images: a 16-bit picture is
brought to 8 bits for its training augmentation only (validation, test and prediction read it whole).

RandAugment's magnitudes are clipped at 9.99 instead of timm's 10 (ours): at 10 exactly, timm's increasing
posterize keeps 0 bits, which Pillow 13 refuses ("bits must be between or equal to 1 and 8"); a draw of N(9, 0.5)
reaches 9.99 about once in 40, and the ops' strength at 9.99 differs from 10's by a tenth of a percent.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dex.data.preprocess import Preprocessing
from dex.data.readers import Picture

RANDAUGMENT = "rand-m9-mstd0.5-inc1"  # MAE's and RETFound's fine-tuning policy
RANDOM_ERASING = 0.25  # their probability of random erasing
MAGNITUDE_MAX = 9.99  # under timm's 10, where posterize would keep 0 bits (see the module's docstring)


def classification_augmentation(preprocessing: Preprocessing, grey: bool,
                                random_erasing: float = RANDOM_ERASING) -> Callable[[Picture], Tensor]:
    """A function of a :class:`~dex.data.readers.Picture` to a training input [channels, H, W] at
    ``preprocessing.size``: timm's training transforms without their normalisation, then the preprocessing's own
    (:meth:`~dex.data.preprocess.Preprocessing.standardize`, so a grey image becomes the same channels as in
    evaluation), then timm's random erasing (see the module)."""
    from timm.data import create_transform
    from timm.data.random_erasing import RandomErasing

    fill = (float(np.mean(preprocessing.mean)),) if grey else preprocessing.mean  # what rotations and shears uncover
    from timm.data.auto_augment import RandAugment

    transform = create_transform(list(preprocessing.size), is_training=True, auto_augment=RANDAUGMENT,
                                 interpolation="bicubic", normalize=False, mean=fill)
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                op.magnitude_max = MAGNITUDE_MAX  # what timm's "mmax" sets, which takes integers only
    erase = RandomErasing(random_erasing, mode="const" if grey else "pixel", device="cpu") if random_erasing else None

    def augment(picture: Picture) -> Tensor:
        image = preprocessing.standardize(transform(_eight_bit(picture, grey)).float() / 255)
        return erase(image) if erase is not None else image

    return augment


def _eight_bit(picture: Picture, grey: bool) -> Image.Image:
    """The picture as an 8-bit PIL image (grey: ``L``, else ``RGB``), scaled by its full-scale value."""
    values = np.clip(picture.pixels.astype(np.float64) / picture.max_value, 0, 1)
    pixels = np.round(values * 255).astype(np.uint8)
    if grey and pixels.ndim == 3:
        pixels = np.round(pixels.mean(2)).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image.convert("L" if grey else "RGB")


def seeded_call(seed: list[int], function: Callable[..., Tensor], *args) -> Tensor:
    """``function(*args)`` with Python's, NumPy's and torch's global generators seeded from ``seed`` (timm's
    transforms draw from all three) and left as they were after: an item's augmentation is a function of (seed,
    epoch, index) alone, whichever worker makes it, and draws nothing from the training loop's generators."""
    value = int(np.random.default_rng(seed).integers(2**31))
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(value)
            np.random.seed(value)
            torch.manual_seed(value)
            return function(*args)
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
