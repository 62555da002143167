"""Training a segmentation network on patches of images at their own resolution, as nnU-Net does, from MONAI's
transforms.

An epoch is ``steps`` batches of patches, not a pass over the images (nnU-Net's 250 iterations: a data set of 16
large images gives as many steps as one of 1,000). Each patch comes from a training image drawn uniformly and is cut
by :class:`monai.transforms.RandCropByPosNegLabeld` around a foreground pixel with probability
``foreground_oversample`` (nnU-Net: a third), else around any pixel (nnU-Net's rule: MONAI's "negative" indices are
given as every pixel), an image smaller than the patch padded with zeros first (outside the region of interest, so
the loss ignores the padding). The foreground pixels of each image are found once. The ``nnunet`` augmentation
then follows nnU-Net's 2D pipeline with MONAI's transforms (probabilities and ranges as in nnU-Net's default
trainer, the noise scaled to images in [0, 1]): rotation in the plane (p 0.2, up to 180 degrees) and scaling (p 0.2,
0.7-1.4), Gaussian noise (p 0.1), Gaussian blur (p 0.2, sigma 0.5-1), brightness (p 0.15, x0.75-1.25), contrast
(p 0.15, x0.75-1.25), gamma (p 0.3, 0.7-1.5), and mirroring along each axis (p 0.5). ``flip`` mirrors left-right
only (the paper's).

Every patch is a function of (seed, epoch, index) alone, whichever worker makes it: a CPU run repeats bit for bit.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dex.data.preprocess import Preprocessing
from dex.data.readers import Picture, read_picture
from dex.data.tasks import Task, mask_labels, roi_mask

AUGMENTATIONS = ("flip", "nnunet")


def _augmentation(kind: str, keys: tuple[str, ...]):
    """The MONAI pipeline of ``kind`` over ``keys`` (image, label, roi: the masks by nearest neighbour)."""
    from monai import transforms as T  # deferred: MONAI is slow to import

    if kind not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {kind!r}")
    modes = ["bilinear", "nearest", "nearest"][:len(keys)]
    if kind == "flip":
        return T.Compose([T.RandFlipd(keys, prob=0.5, spatial_axis=1)])
    return T.Compose([
        T.RandRotated(keys, range_x=math.pi, prob=0.2, mode=modes, padding_mode="zeros"),
        T.RandZoomd(keys, prob=0.2, min_zoom=0.7, max_zoom=1.4, mode=modes, padding_mode="constant",
                    keep_size=True),
        T.RandGaussianNoised("image", prob=0.1, std=0.03),
        T.RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0)),
        T.RandScaleIntensityd("image", factors=0.25, prob=0.15),
        T.RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
        T.RandFlipd(keys, prob=0.5, spatial_axis=0),
        T.RandFlipd(keys, prob=0.5, spatial_axis=1),
    ])


class TaskPatches(Dataset):
    """``steps * batch_size`` training patches [channels, h, w] of a segmentation task's images ``ids`` at their
    own resolution (with ``fit="resize"``: of the images resized to the input, one patch each), each with its
    target [h, w] (class indices) and region of interest [h, w] (1 inside; all ones for a task without ``roi/``).
    Images, masks and regions are read once and kept (as stored, 8 or 16 bit: a
    small task's training split in memory, as nnU-Net's 2D data loader keeps its cases)."""

    def __init__(self, task: Task, ids: list[str], preprocessing: Preprocessing, patch: tuple[int, int],
                 steps: int, batch_size: int, foreground_oversample: float, augmentation: str, seed: int = 0) -> None:
        from monai import transforms as T

        if not 0 <= foreground_oversample <= 1:
            raise ValueError(f"foreground_oversample must be in [0, 1], got {foreground_oversample}")
        self.task, self.ids, self.preprocessing, self.patch = task, ids, preprocessing, tuple(patch)
        self.length, self.seed, self.epoch = steps * batch_size, seed, 0
        self.images, self.labels, self.rois, self.foreground = [], [], [], []
        everywhere: dict[int, np.ndarray] = {}  # the flat indices of every pixel, one array per image area
        for item in ids:
            picture = read_picture(task.images[item])
            pixels = picture.pixels.astype(np.int32) if picture.pixels.dtype == np.uint16 else picture.pixels
            roi = roi_mask(task, item)
            labels = mask_labels(task, item).astype(np.uint8)
            if preprocessing.fit == "resize":  # the whole image at the input size: one patch, as evaluation sees it
                pixels, labels, roi = _resized(preprocessing, pixels, labels, roi)
            image, label = _padded(pixels, self.patch), _padded(labels, self.patch)
            roi = _padded(np.ones(pixels.shape[:2], np.uint8) if roi is None else roi.astype(np.uint8), self.patch)
            self.images.append((torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0) if image.ndim == 3
                                                                      else image[None])), picture.max_value))
            self.labels.append(torch.from_numpy(label)[None])
            self.rois.append(torch.from_numpy(roi)[None])
            self.foreground.append(np.flatnonzero(label).astype(np.int32))
            everywhere.setdefault(label.size, np.arange(label.size, dtype=np.int32))
        self.everywhere = everywhere
        keys = ("image", "label", "roi")
        self.crop = T.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=self.patch,
                                             pos=foreground_oversample, neg=1 - foreground_oversample, num_samples=1,
                                             fg_indices_key="foreground", bg_indices_key="everywhere")
        self.augment = _augmentation(augmentation, keys)
        # one generator for the crop and every augmentation, reseeded per patch: MONAI's set_random_state(seed=...)
        # makes a new RandomState per transform (about 80 us each, 17 a patch: a third of the pipeline's time)
        self.random = np.random.RandomState()
        for transform in (self.crop, *self.augment.transforms):
            transform.set_random_state(state=self.random)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[int, dict[str, Any]]:
        """The image drawn for patch ``index`` of the current epoch and its crop (before augmentation): the stored
        values [C, h, w], the label and the region [1, h, w]."""
        from monai.data import set_track_meta

        rng = np.random.default_rng([self.seed, self.epoch, index])
        which = int(rng.integers(len(self.ids)))
        label = self.labels[which]
        self.random.seed(int(rng.integers(2**31)))  # the crop's draws, then the augmentation's (__getitem__)
        set_track_meta(False)  # plain tensors: MONAI's metadata tracking would cost more than the crop
        try:
            with warnings.catch_warnings():  # an image without foreground: MONAI says so at every patch of it
                warnings.filterwarnings("ignore", message="Num foregrounds 0")
                patch = self.crop({"image": self.images[which][0], "label": label, "roi": self.rois[which],
                                   "foreground": self.foreground[which],
                                   "everywhere": self.everywhere[label.numel()]})[0]
        finally:
            set_track_meta(True)
        return which, patch

    def __getitem__(self, index: int) -> dict[str, Any]:
        from monai.data import set_track_meta

        which, patch = self.sample(index)
        stored = patch["image"]
        patch = {"image": self.preprocessing.scale(Picture(
            (stored[0] if stored.shape[0] == 1 else stored.permute(1, 2, 0)).numpy(), self.images[which][1])),
            "label": patch["label"], "roi": patch["roi"]}
        set_track_meta(False)
        try:
            patch = self.augment(patch)
        finally:
            set_track_meta(True)
        return {"image": self.preprocessing.standardize(torch.as_tensor(patch["image"]).float()),
                "target": _integers(patch["label"]), "roi": _integers(patch["roi"]).float(), "index": index}


def _integers(mask: torch.Tensor) -> torch.Tensor:
    """[1, h, w] labels (float after a nearest-neighbour rotation or zoom, else as stored) -> [h, w] int64."""
    mask = torch.as_tensor(mask)[0]
    return (mask.round() if mask.is_floating_point() else mask).long()


def _resized(preprocessing: Preprocessing, pixels: np.ndarray, labels: np.ndarray, roi: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """An image's stored values [H, W(, C)] resized by ``preprocessing`` (as float: the resize is linear, so scaling
    after it is the same as before), its labels and region resized with nearest neighbours."""
    from torchvision.transforms.v2 import functional as TF

    values = torch.from_numpy(pixels.astype(np.float32))
    values = values[None] if values.ndim == 2 else values.permute(2, 0, 1)
    resized = preprocessing.resize(values)
    resized = resized[0] if pixels.ndim == 2 else resized.permute(1, 2, 0)

    def nearest(mask: np.ndarray) -> np.ndarray:
        return TF.resize(torch.from_numpy(mask)[None], list(preprocessing.size),
                         interpolation=TF.InterpolationMode.NEAREST)[0].numpy()

    return resized.numpy(), nearest(labels), None if roi is None else nearest(roi.astype(np.uint8)).astype(bool)


def _padded(array: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    """``array`` [H, W, ...] padded with zeros at the end of each axis shorter than ``patch`` (h, w): outside the
    region of interest, so the loss ignores it."""
    pad = [(0, max(0, p - s)) for p, s in zip(patch, array.shape[:2])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad) if any(after for _, after in pad) else array
