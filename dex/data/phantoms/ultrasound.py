"""B-mode ultrasound: a sector (fan) scan in polar coordinates, scan-converted to the image grid.

Tissue echogenicity times correlated Rayleigh speckle (the magnitude of a blurred complex Gaussian field),
depth attenuation with partial gain compensation, acoustic shadows behind strong reflectors, log compression.
The scene is a fetal head (HC18-like: bright skull ellipse, midline echo) in amniotic fluid; cine clips show
a beating chamber.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dex.data.phantoms.shapes import Sample, ellipse, ellipse_level, smooth_field, speckle

GRAIN = (0.7, 1.6)  # speckle grain along the beam and across it, in polar samples


def _sector(size: int, half_angle: float):
    """Polar sampling grid (radius, angle) -> Cartesian (y, x) in [-1, 1], apex at the top centre."""
    n_r, n_t = size, size
    radius = np.linspace(0.0, 1.9, n_r)[:, None]
    theta = np.linspace(-half_angle, half_angle, n_t)[None, :]
    return radius, theta, -1.0 + radius * np.cos(theta), radius * np.sin(theta)


def _scan(echo_fn, size: int, rng: np.random.Generator, half_angle: float, field: np.ndarray | None = None):
    """Echo map sampled along the beams, speckle (from the complex ``field``, fresh if None), shadowing and
    compression; returns the image and the field-of-view mask."""
    radius, theta, py, px = _sector(size, half_angle)
    echo, reflector = echo_fn(py, px)
    transmission = np.exp(-np.cumsum(reflector, axis=0) * (3.0 / size))  # energy lost at strong interfaces
    gain = np.exp(-0.6 * radius) * (1 + 0.5 * radius)  # attenuation, partly compensated
    if field is None:
        field = rng.standard_normal((2, size, size))
    envelope = echo * transmission * gain * speckle(field, GRAIN)
    compressed = np.log1p(30.0 * envelope) / np.log1p(30.0 * 2.5)
    # scan conversion: Cartesian pixel -> (radius, angle) -> polar sample indices
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    r = np.hypot(yy + 1.0, xx)
    t = np.arctan2(xx, yy + 1.0)
    fov = (t >= -half_angle) & (t <= half_angle) & (r <= 1.9) & (r > 0.08)
    coords = np.stack([r / 1.9 * (size - 1), (t + half_angle) / (2 * half_angle) * (size - 1)])
    image = ndimage.map_coordinates(compressed, coords, order=1, mode="constant") * fov
    return np.clip(image, 0, 1).astype(np.float32), fov


def fetal_head(rng: np.random.Generator, size: int) -> Sample:
    """A fetal head in amniotic fluid, with a midline echo; mask ``us-fetal-head`` is the filled skull ellipse.

    Findings: ``head``, the skull ellipse (y, x, radius y, radius x, angle); the transducer is at y = -1.
    """
    cy, cx = rng.uniform(0.1, 0.35), rng.uniform(-0.25, 0.25)
    ry, rx, angle = rng.uniform(0.32, 0.45), rng.uniform(0.42, 0.55), rng.uniform(-0.6, 0.6)
    tissue = np.clip(0.6 + 0.25 * smooth_field(rng, (size, size), size / 16), 0.1, None)

    def echo_fn(py, px):
        level = ellipse_level(py, px, cy, cx, ry, rx, angle)
        fluid = ellipse_level(py, px, cy, cx, ry * 1.5, rx * 1.4, angle) <= 1.0
        skull = np.abs(np.sqrt(level) - 1.0) < 0.06
        midline = (level < 0.8) & (np.abs((px - cx) * np.cos(angle) + (py - cy) * np.sin(angle)) < 0.02)
        idx = np.clip(((py + 1) / 2 * (size - 1)).astype(int), 0, size - 1), np.clip(
            ((px + 1) / 2 * (size - 1)).astype(int), 0, size - 1)
        echo = np.where(fluid, 0.04, tissue[idx])
        echo = np.where(level <= 1.0, 0.35, echo)  # brain
        echo = np.where(midline, 1.2, echo)
        echo = np.where(skull, 2.5, echo)
        return echo, 8.0 * skull

    image, fov = _scan(echo_fn, size, rng, rng.uniform(0.55, 0.7))
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    head = ellipse(yy, xx, cy, cx, ry, rx, angle) & fov
    return Sample(image, masks={"us-fetal-head": head.astype(np.uint8)}, findings={"head": (cy, cx, ry, rx, angle)})


def cine(rng: np.random.Generator, size: int, frames: int) -> np.ndarray:
    """[frames, size, size] in [0, 1]: a chamber beating at ~1 Hz (30 fps) under slowly decorrelating speckle."""
    half_angle = rng.uniform(0.55, 0.7)
    cy, cx, r0 = rng.uniform(0.0, 0.3), rng.uniform(-0.2, 0.2), rng.uniform(0.25, 0.35)
    tissue = np.clip(0.7 + 0.2 * smooth_field(rng, (size, size), size / 16), 0.1, None)
    field = rng.standard_normal((2, size, size))
    out = []
    for f in range(frames):
        r = r0 * (1.0 + 0.25 * np.sin(2 * np.pi * f / 30.0))

        def echo_fn(py, px, r=r):
            level = ellipse_level(py, px, cy, cx, r, r * 1.2)
            wall = np.abs(np.sqrt(level) - 1.0) < 0.15
            idx = np.clip(((py + 1) / 2 * (size - 1)).astype(int), 0, size - 1), np.clip(
                ((px + 1) / 2 * (size - 1)).astype(int), 0, size - 1)
            echo = np.where(level <= 1.0, 0.05, tissue[idx])
            return np.where(wall, 1.5, echo), 0.5 * wall

        field = 0.95 * field + np.sqrt(1 - 0.95**2) * rng.standard_normal(field.shape)  # slow decorrelation
        out.append(_scan(echo_fn, size, rng, half_angle, field)[0])
    return np.stack(out)
