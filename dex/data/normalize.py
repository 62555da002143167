"""The per-modality intensity normalisations of MedVerse (App. C.1.1, Table 2), all mapping to [0, 1] float32.

Volume-wise rules (MR, raw PET) take their statistics from the whole volume, before it is cut into slices.
"""

from __future__ import annotations

import numpy as np


def ct_hu(hu: np.ndarray) -> np.ndarray:
    """CT: ``(clip(x, -200, 400) + 200) / 600``."""
    return ((np.clip(hu, -200.0, 400.0) + 200.0) / 600.0).astype(np.float32)


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
