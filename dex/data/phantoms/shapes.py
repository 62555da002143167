"""Geometry and random-field helpers shared by the phantom generators. Coordinates are normalised to [-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage


@dataclass
class Sample:
    """One generated 2D image with its ground truth.

    ``image`` is float in the modality's own units before encoding (reflectance in [0, 1] for optical modalities);
    ``masks`` maps a task name to a [H, W] uint8 label map; ``labels`` maps a task name to a class index;
    ``findings`` holds the parameters of what was drawn that a report states (each generator's docstring lists them),
    positions and lengths in the [-1, 1] coordinates of :func:`grid`; :mod:`dex.data.phantoms.reports` words them.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    findings: dict[str, Any] = field(default_factory=dict)


def grid(size: int, height: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(yy, xx) of a [height, size] image, both in [-1, 1]."""
    return np.meshgrid(np.linspace(-1, 1, height or size), np.linspace(-1, 1, size), indexing="ij")


def ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
            angle: float = 0.0) -> np.ndarray:
    """Boolean mask of a filled ellipse centred at (cy, cx) with radii (ry, rx), rotated by ``angle``."""
    return ellipse_level(yy, xx, cy, cx, ry, rx, angle) <= 1.0


def ellipse_level(yy, xx, cy, cx, ry, rx, angle=0.0) -> np.ndarray:
    """The squared normalised radius of every pixel: 1 on the ellipse's boundary."""
    cos, sin = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    return ((dx * cos + dy * sin) / rx) ** 2 + ((dy * cos - dx * sin) / ry) ** 2


def ellipsoid(zz, yy, xx, center, radii) -> np.ndarray:
    (cz, cy, cx), (rz, ry, rx) = center, radii
    return ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation.

    Wide fields (sigma of 8 pixels or more) are drawn on a grid ``sigma / 4`` times coarser and interpolated up:
    the same smoothness at a fraction of the cost.
    """
    factor = max(1, int(sigma // 4))
    coarse = tuple(max(2, -(-n // factor)) for n in shape)
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma / factor, mode="wrap")
    if factor > 1:
        noise = ndimage.zoom(noise, [n / c for n, c in zip(shape, coarse)], order=1, mode="nearest")[
            tuple(slice(0, n) for n in shape)]
    return (noise - noise.mean()) / (noise.std() + 1e-12)


def speckle(field: np.ndarray, grain: tuple[float, float]) -> np.ndarray:
    """Unit-mean Rayleigh speckle: the magnitude of a complex Gaussian field [2, H, W] (real and imaginary parts)
    blurred by a point-spread function of standard deviations ``grain`` (axial, lateral) pixels."""
    magnitude = np.hypot(*(ndimage.gaussian_filter(part, grain) for part in field))
    return magnitude / magnitude.mean()


def polyline_distance(yy: np.ndarray, xx: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the polyline through ``points`` [M, 2] (y, x)."""
    best = np.full(yy.shape, np.inf)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / (dy * dy + dx * dx + 1e-12), 0.0, 1.0)
        best = np.minimum(best, np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx)))
    return best


def wavy_curve(rng: np.random.Generator, start, angle: float, length: float, steps: int,
               wiggle: float) -> np.ndarray:
    """A random smooth curve of ``steps`` points from ``start`` heading ``angle`` (radians)."""
    turns = np.cumsum(rng.normal(0.0, wiggle, steps))
    headings = angle + turns
    step = length / steps
    pts = np.cumsum(np.stack([np.sin(headings), np.cos(headings)], axis=1) * step, axis=0)
    return np.vstack([start, np.asarray(start) + pts])


def to_uint(image: np.ndarray, bits: int) -> np.ndarray:
    """[0, 1] floats to unsigned integers of ``bits`` (8 or 16), rounded."""
    top = (1 << bits) - 1
    return np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)
