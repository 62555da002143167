"""The per-modality intensity normalisations of MedVerse (App. C.1.1, Table 2), all mapping to [0, 1] float32, and
the names of the axes a volume is cut along (:data:`SLICE_AXES`).

Volume-wise rules (MR, raw PET) take their statistics from the whole volume, before it is cut into slices. Curation,
task import (``dex data import-task volumes``) and ``dex predict`` / ``dex embed`` on volumes all go through
:func:`normalize_volume` and :func:`dex.data.volumes.volume_slice`, so a model sees a volume's slices as it saw its
training images. This module needs only numpy, so that model code can name the rules and axes without the readers.
"""

from __future__ import annotations

import numpy as np

#: The slice axes by name, each with the axis of a volume's ``[Z, Y, X]`` values (:class:`dex.data.volumes.Volume`)
#: it cuts across: axial slices are ``values[z]``, coronal ``values[:, y]``, sagittal ``values[:, :, x]``.
SLICE_AXES: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}

#: Table 2's CT window in HU.
CT_WINDOW = (-200.0, 400.0)


def ct_hu(hu: np.ndarray, window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """CT: ``(clip(x, low, high) - low) / (high - low)``; Table 2's window is [-200, 400] HU."""
    low, high = (float(v) for v in window)
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def _minmax(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def mr_percentile(volume: np.ndarray) -> np.ndarray:
    """MR: clip to the volume's 1st and 99th percentiles, then min-max to [0, 1]."""
    low, high = np.percentile(volume, [1.0, 99.0])
    return _minmax(np.clip(volume, low, high))


def pet_raw(volume: np.ndarray) -> np.ndarray:
    """Raw PET: clip to the 1st-99th percentiles, z-score, then min-max to [0, 1] (the paper's three stages)."""
    low, high = np.percentile(volume, [1.0, 99.0])
    clipped = np.clip(volume, low, high)
    std = float(clipped.std())
    return _minmax((clipped - clipped.mean()) / std if std > 0 else clipped - clipped.mean())


def pet_suv(suv: np.ndarray) -> np.ndarray:
    """PET in SUV: ``clip(x, 0, 20) / 20``."""
    return (np.clip(suv, 0.0, 20.0) / 20.0).astype(np.float32)


def scale_255(pixels: np.ndarray, max_value: float) -> np.ndarray:
    """Everything else: ``x / 255`` for 8-bit data, ``x / 65535`` for 16-bit (the data's own full scale)."""
    return np.clip(pixels.astype(np.float32) / max_value, 0.0, 1.0)


VOLUME_NORMALIZERS = {"ct_hu": ct_hu, "mr_percentile": mr_percentile, "pet_raw": pet_raw, "pet_suv": pet_suv}

#: The Table 2 rule of each volume modality, for a volume whose model or command names none (PET: in SUV, the rule
#: of the SUV sources of Table 2; a DICOM PET series is converted to SUV from its tags).
MODALITY_VOLUME_NORMALIZATION = {"CT": "ct_hu", "MR": "mr_percentile", "PET": "pet_suv"}


def normalize_volume(values: np.ndarray, rule: str, ct_window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """A [Z, Y, X] volume in real units -> [0, 1] float32 by the rule of :data:`VOLUME_NORMALIZERS` named ``rule``
    (``ct_hu`` with ``ct_window``)."""
    if rule not in VOLUME_NORMALIZERS:
        raise ValueError(f"volume normalisation {rule!r}: one of {', '.join(VOLUME_NORMALIZERS)}")
    return ct_hu(values, ct_window) if rule == "ct_hu" else VOLUME_NORMALIZERS[rule](values)
