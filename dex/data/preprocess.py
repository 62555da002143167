"""The one definition of how a picture becomes a model input: :class:`Preprocessing`.

Fine-tuning (:class:`dex.downstream.finetune.TaskImages`), the analyses (``dex analyze``), the tail of the pretraining
augmentation (:class:`dex.data.transforms.PretrainTransform`), image folders (:class:`dex.data.stream.FolderImages`)
and the figures' un-normalisation all use it, and every model folder records it (``config.json``'s
``"preprocessing"`` block, read back by :func:`dex.models.weights.load_preprocessing`), so a model can be fed new
images exactly as it was trained and evaluated.

The steps, in order:

0. volumes only (NIfTI, DICOM series; ``dex predict``, ``dex embed``): the whole volume to [0, 1] by the Table 2
   rule ``volume_normalization`` (``ct_hu`` with ``ct_window``), cut into slices along ``slice_axis`` and stored
   16-bit (:func:`dex.data.normalize.normalize_volume`, :func:`dex.data.volumes.volume_slice`), exactly as
   ``dex data import-task volumes`` made the slices of a task;
1. intensity (:meth:`Preprocessing.scale`, pictures only): the rule named by ``intensity``. ``"full_scale"`` divides
   the stored values by the picture's full scale (:attr:`dex.data.readers.Picture.max_value`: 255 for 8 bit, 65535
   for 16 bit, 1.0 for float), the rule of :func:`dex.data.normalize.scale_255` without its clip (the clamp of
   step 3 comes after the resize). Images cut from volumes were brought to [0, 1] by the volume rules of Table 2
   (``dex.data.normalize.VOLUME_NORMALIZERS``: ``ct_hu``, ``mr_percentile``, ``pet_raw``, ``pet_suv``) when they were
   curated or imported, and stored as 8- or 16-bit pictures: ``full_scale`` is what reads them back.
2. resize (:meth:`Preprocessing.resize`): the whole image to ``size`` (H, W) with ``interpolation`` (torchvision's
   ``InterpolationMode`` value) and ``antialias``, when ``fit`` is ``"resize"``; with ``"native"`` (a segmentation
   model trained on patches) the image keeps its own size and ``size`` is that of the windows the model sees
   (:mod:`dex.downstream.windows`);
3. :meth:`Preprocessing.standardize`: clamp to [0, 1], a grey image repeated to ``channels``, then
   ``(x - mean) / std`` per channel.

This module imports only torch, torchvision, numpy and :mod:`dex.data.normalize` (and :mod:`dex.data.readers`, when a
file is read), so that
:mod:`dex.models` can use it without importing the data pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from dex.data.normalize import CT_WINDOW, SLICE_AXES, VOLUME_NORMALIZERS

if TYPE_CHECKING:
    from dex.data.readers import Picture

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def full_scale(picture: Picture) -> Tensor:
    """A picture's stored values over its full scale, as a [C, H, W] float32 tensor (C = 1 or 3); float pictures
    keep values outside [0, 1] (the clamp comes after the resize)."""
    pixels = torch.from_numpy(picture.pixels.astype(np.float32) / picture.max_value)
    return pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)


INTENSITY_RULES: dict[str, Callable[[Picture], Tensor]] = {"full_scale": full_scale}
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")  # the modes TF.resize has for tensors
FITS = ("resize", "native")


def _pair(value: Any) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
        raise ValueError(f"preprocessing: size: expected a positive integer or [height, width] of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _floats(key: str, value: Any, count: int, positive: bool = False, what: str = " (one per channel)"
            ) -> tuple[float, ...]:
    if (not isinstance(value, (list, tuple)) or len(value) != count
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       and (v > 0 or not positive) for v in value)):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise ValueError(f"preprocessing: {key}: expected {count} {kind}{what}, got {value!r}")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class Preprocessing:
    """How a picture becomes a model input (see the module's docstring for the steps); serialisable with
    :meth:`to_dict` / :meth:`from_dict`, and a transform: ``preprocessing(image)`` is :meth:`to_input`.

    Fields (validated on construction; a bad value raises a ``ValueError`` naming the field):
        size: (height, width) of the model input; an int means a square.
        channels: channels of the model input; a grey image is repeated to this many.
        mean, std: the per-channel z-score, ``channels`` values each (ImageNet's by default).
        interpolation: torchvision ``InterpolationMode`` value of the resize (``"bilinear"``).
        antialias: whether the resize antialiases when it shrinks (True).
        intensity: the rule of :data:`INTENSITY_RULES` that scales a raw picture into [0, 1] (``"full_scale"``).
        modality: the modality of the images the model was trained on (``""``: several, or not known).
        volume_normalization: the Table 2 rule that made its training images from volumes (``ct_hu``,
            ``mr_percentile``, ``pet_raw``, ``pet_suv``), ``""`` when they were not cut from volumes.
        slice_axis: the axis those slices were cut along (``axial``, ``coronal``, ``sagittal``).
        ct_window: the HU window of ``ct_hu`` (Table 2: [-200, 400]).
        fit: ``"resize"`` (the whole image to ``size``) or ``"native"`` (kept at its own size; ``size`` is the
            window of a sliding-window prediction).
    """

    size: tuple[int, int] = (256, 256)
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    antialias: bool = True
    intensity: str = "full_scale"
    modality: str = ""
    volume_normalization: str = ""
    slice_axis: str = "axial"
    ct_window: tuple[float, float] = CT_WINDOW
    fit: str = "resize"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise lists (from JSON) to tuples once, here
        set_(self, "size", _pair(self.size))
        if not isinstance(self.channels, int) or isinstance(self.channels, bool) or self.channels < 1:
            raise ValueError(f"preprocessing: channels: expected a positive integer, got {self.channels!r}")
        set_(self, "mean", _floats("mean", self.mean, self.channels))
        set_(self, "std", _floats("std", self.std, self.channels, positive=True))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocessing: interpolation: expected one of {', '.join(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")
        if not isinstance(self.antialias, bool):
            raise ValueError(f"preprocessing: antialias: expected true or false, got {self.antialias!r}")
        if self.intensity not in INTENSITY_RULES:
            raise ValueError(f"preprocessing: intensity: expected one of {', '.join(INTENSITY_RULES)}, got "
                             f"{self.intensity!r} (the volume rules of dex.data.normalize.VOLUME_NORMALIZERS apply "
                             "when volumes are cut into pictures, before this)")
        if not isinstance(self.modality, str):
            raise ValueError(f"preprocessing: modality: expected a name, got {self.modality!r}")
        if self.volume_normalization not in ("", *VOLUME_NORMALIZERS):
            raise ValueError(f"preprocessing: volume_normalization: expected one of {', '.join(VOLUME_NORMALIZERS)} "
                             f"or \"\" (none), got {self.volume_normalization!r}")
        if self.slice_axis not in SLICE_AXES:
            raise ValueError(f"preprocessing: slice_axis: expected one of {', '.join(SLICE_AXES)}, got "
                             f"{self.slice_axis!r}")
        window = _floats("ct_window", self.ct_window, 2, what=" (low and high HU)")
        if window[0] >= window[1]:
            raise ValueError(f"preprocessing: ct_window: expected [low, high] HU with low < high, got "
                             f"{self.ct_window!r}")
        set_(self, "ct_window", window)
        if self.fit not in FITS:
            raise ValueError(f"preprocessing: fit: expected one of {', '.join(FITS)}, got {self.fit!r}")

    # --- serialisation ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (lists for the tuples)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_dict`; a missing field takes its default, an unknown one or a bad value raises
        a ``ValueError`` naming it."""
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocessing: expected a mapping of its fields, got {data!r}")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"preprocessing: unknown key(s) {', '.join(map(str, unknown))} (known: "
                             f"{', '.join(sorted(known))})")
        return cls(**data)

    # --- the steps -------------------------------------------------------------------------------------------

    def scale(self, picture: Picture) -> Tensor:
        """Step 1: a :class:`~dex.data.readers.Picture` -> [C, H, W] float32 by the ``intensity`` rule."""
        return INTENSITY_RULES[self.intensity](picture)

    def resize(self, image: Tensor) -> Tensor:
        """Step 2: [C, h, w] -> [C, H, W] at ``size`` (``fit="native"``: unchanged)."""
        if self.fit == "native":
            return image
        return TF.resize(image, list(self.size), interpolation=TF.InterpolationMode(self.interpolation),
                         antialias=self.antialias)

    def standardize(self, image: Tensor) -> Tensor:
        """Step 3, the tail every pipeline shares: [C, H, W] (C = 1 or ``channels``) -> clamped to [0, 1], grey
        repeated to ``channels``, z-scored."""
        image = image.clamp(0, 1)
        if image.shape[0] != self.channels:
            if image.shape[0] != 1:
                raise ValueError(f"an image of {image.shape[0]} channels cannot become {self.channels}")
            image = image.expand(self.channels, -1, -1)
        return TF.normalize(image, list(self.mean), list(self.std))

    def to_input(self, image: Tensor) -> Tensor:
        """[C, h, w] float in [0, 1] (C = 1 or ``channels``) -> the model input [channels, H, W]: steps 2 and 3."""
        return self.standardize(self.resize(image))

    __call__ = to_input

    def picture_input(self, picture: Picture) -> Tensor:
        """A :class:`~dex.data.readers.Picture` -> the model input [channels, H, W]: steps 1-3."""
        return self.to_input(self.scale(picture))

    def read(self, path: str | Path) -> Tensor:
        """A picture file (any format :func:`dex.data.readers.read_picture` reads) -> the model input: steps 1-3.
        An unreadable file raises :class:`dex.data.readers.ReadError` naming it."""
        from dex.data.readers import read_picture  # deferred: pydicom, nibabel, av are not needed to build models

        return self.picture_input(read_picture(path))

    def unnormalize(self, image: Tensor) -> Tensor:
        """A z-scored [channels, H, W] model input back to [0, 1] (for display): ``x * std + mean``, clamped."""
        mean = torch.tensor(self.mean, device=image.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=image.device).view(-1, 1, 1)
        return (image * std + mean).clamp(0, 1)
