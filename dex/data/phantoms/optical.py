"""Optical modalities: H&E pathology tiles, colonoscopy frames, dermoscopy photographs."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dex.data.phantoms.shapes import Sample, ellipse, ellipse_level, grid, polyline_distance, smooth_field, wavy_curve

# Optical density per unit stain for R, G, B (Ruifrok & Johnston 2001, normalised).
HAEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286])
EOSIN_OD = np.array([0.072, 0.990, 0.105])
PHOTO_CLASSES = ("regular", "irregular")
FUNDUS_EXUDATE_CLASSES = ("none", "exudates")


def he_tile(rng: np.random.Generator, size: int) -> Sample:
    """An H&E tile by the Beer-Lambert stain model ``RGB = exp(-(c_H * OD_H + c_E * OD_E))``.

    Eosin stains fibrous stroma (a textured concentration field) with white gaps; haematoxylin stains nuclei
    (ellipses with chromatin texture) grouped in clusters and gland-like rings. Masks: ``pathology-nuclei``.
    Findings: ``clusters`` (a list of (y, x, spread, ring): a ring's nuclei lie on a circle of radius ``spread``),
    ``nuclei`` (the list of every nucleus's (radius y, radius x)).
    """
    yy, xx = grid(size)
    stroma = np.clip(0.45 + 0.25 * smooth_field(rng, yy.shape, size / 40), 0, None)
    fibres = 0.2 * np.abs(np.sin(8 * xx + 3 * smooth_field(rng, yy.shape, size / 12)))
    eosin = stroma + fibres
    eosin[smooth_field(rng, yy.shape, size / 10) > 1.3] = 0.02  # lumen / fat: unstained
    haem = np.zeros(yy.shape)
    nuclei = np.zeros(yy.shape, bool)
    clusters, axes = [], []
    for _ in range(rng.integers(3, 6)):  # cell clusters; the field of view is fixed, so sizes do not scale
        centre = rng.uniform(-0.9, 0.9, 2)
        ring = rng.random() < 0.4
        spread = rng.uniform(0.15, 0.3)
        clusters.append((*centre, spread, bool(ring)))
        for _ in range(rng.integers(6, 14)):
            if ring:  # nuclei on a gland's rim
                angle = rng.uniform(0, 2 * np.pi)
                cy, cx = centre + spread * np.array([np.sin(angle), np.cos(angle)])
            else:
                cy, cx = centre + rng.normal(0, spread, 2)
            radii = rng.uniform(0.045, 0.08, 2)
            axes.append(tuple(radii))
            nucleus = ellipse(yy, xx, cy, cx, *radii, rng.uniform(0, np.pi))
            nuclei |= nucleus
            haem[nucleus] = rng.uniform(1.2, 1.8)
    haem *= 1 + 0.15 * smooth_field(rng, yy.shape, 0.8)  # chromatin texture
    eosin = np.where(nuclei, 0.15, eosin)
    density = haem[..., None] * HAEMATOXYLIN_OD + eosin[..., None] * EOSIN_OD
    rgb = np.exp(-density) + rng.normal(0, 0.01, density.shape)
    return Sample(np.clip(rgb, 0, 1).astype(np.float32), masks={"pathology-nuclei": nuclei.astype(np.uint8)},
                  findings={"clusters": clusters, "nuclei": axes})


def colonoscopy(rng: np.random.Generator, size: int, polyp: bool | None = None) -> Sample:
    """A colonoscopy frame: circular vignette, pink mucosa with haustral folds around a dark lumen, Lambertian
    lighting from the scope (intensity falls with depth), specular highlights, and a raised polyp in about half
    the frames (always when ``polyp=True``). Masks: ``endoscopy-polyp``. Findings: ``lumen`` (y, x), ``polyp``
    ((y, x, radius y, radius x, angle) of its base, or None)."""
    yy, xx = grid(size)
    lumen = rng.uniform(-0.4, 0.4, 2)
    dist = np.hypot(yy - lumen[0], xx - lumen[1])
    angle = np.arctan2(yy - lumen[0], xx - lumen[1])
    folds = 0.06 * np.sin(rng.uniform(9, 14) * dist + 0.6 * np.sin(3 * angle + rng.uniform(0, 6)))
    height = folds + 0.03 * smooth_field(rng, yy.shape, size / 20)
    has_polyp = bool(rng.random() < 0.5) if polyp is None else polyp
    mask = np.zeros(yy.shape, bool)
    outline = None
    if has_polyp:
        py, px = lumen + rng.uniform(0.35, 0.6) * np.array([np.sin(a := rng.uniform(0, 2 * np.pi)), np.cos(a)])
        outline = (py, px, *rng.uniform(0.12, 0.25, 2), rng.uniform(0, np.pi))
        level = ellipse_level(yy, xx, *outline)
        dome = np.clip(1 - level, 0, None)
        height = height + 0.25 * np.sqrt(dome)
        mask = level <= 1.0
    gy, gx = np.gradient(height, 2.0 / size)
    normal_z = 1.0 / np.sqrt(1 + gx**2 + gy**2)
    depth = 1.0 + 3.0 * np.exp(-dist**2 / 0.06)  # the lumen is far away
    light = normal_z / depth**2  # Lambertian, inverse-square falloff from the scope's light
    base = np.array([0.88, 0.5, 0.45]) * rng.uniform(0.9, 1.05, 3)
    rgb = light[..., None] * base
    if has_polyp:
        rgb[mask] *= np.array([1.05, 0.85, 0.8])  # a slightly different, redder surface
    vessels = smooth_field(rng, yy.shape, 1.0)
    rgb *= (1 - 0.08 * (np.abs(vessels) < 0.08))[..., None]
    specular = (normal_z > 0.995) & (rng.random(yy.shape) < 0.3) & (depth < 1.2)
    rgb[ndimage.binary_dilation(specular, iterations=1)] = 1.0
    rgb = ndimage.gaussian_filter(rgb, (0.7, 0.7, 0)) * (np.hypot(yy, xx) < 0.98)[..., None]
    return Sample(np.clip(rgb, 0, 1).astype(np.float32), masks={"endoscopy-polyp": mask.astype(np.uint8)},
                  findings={"lumen": tuple(lumen), "polyp": outline})


SKIN_TONES = np.array([[0.93, 0.80, 0.70], [0.87, 0.70, 0.58], [0.76, 0.57, 0.44], [0.60, 0.42, 0.30],
                       [0.42, 0.29, 0.21]])


def dermoscopy(rng: np.random.Generator, size: int) -> Sample:
    """A dermoscopy photograph: skin tone, pigmented lesion whose border is a Fourier-perturbed ellipse (a few low
    harmonics when ``regular``, many and larger when ``irregular``, with several colours and dots), pigment
    network, hairs, and the dark corners of the dermoscope. Masks: ``photo-lesion``; labels: ``photo-lesion-type``
    (index in PHOTO_CLASSES). Findings: ``lesion`` (y, x, mean radius), ``irregular``, ``veil`` and ``dots`` (whether
    the lesion shows a blue-grey veil, dark dots), ``hairs`` (how many)."""
    yy, xx = grid(size)
    irregular = int(rng.random() < 0.5)
    tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.95, 1.05, 3)
    rgb = np.ones(yy.shape + (3,)) * tone * (1 + 0.03 * smooth_field(rng, yy.shape, size / 20))[..., None]
    cy, cx = rng.uniform(-0.15, 0.15, 2)
    angle = np.arctan2(yy - cy, xx - cx)
    radius = np.hypot(yy - cy, xx - cx)
    r0 = rng.uniform(0.3, 0.5)
    harmonics = range(2, 9) if irregular else range(2, 4)
    border = np.ones_like(angle)
    for k in harmonics:
        border += rng.uniform(0, 0.12 if irregular else 0.05) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    lesion = radius < r0 * border
    depth = np.clip(1 - radius / (r0 * border), 0, 1)
    brown = np.array([0.45, 0.28, 0.18])
    colour = brown * (1 - 0.4 * depth)[..., None]
    shows_veil = shows_dots = False
    if irregular:  # blue-grey veil and dark dots
        veil = smooth_field(rng, yy.shape, size / 12) > 0.6
        colour[veil] = [0.35, 0.35, 0.42]
        dots = (rng.random(yy.shape) < 0.01) & (depth > 0.2)
        colour[ndimage.binary_dilation(dots)] = [0.12, 0.08, 0.07]
        shows_veil, shows_dots = bool((veil & lesion).any()), bool(dots.any())
    warp = 0.4 * smooth_field(rng, yy.shape, size / 16)
    network = 0.9 + 0.1 * np.cos(12 * np.pi * (xx + warp)) * np.cos(12 * np.pi * (yy - warp))  # pigment network
    rgb[lesion] = colour[lesion] * network[lesion][:, None]
    hairs = rng.integers(0, 8)
    for _ in range(hairs):
        start = rng.uniform(-1, 1, 2)
        pts = wavy_curve(rng, start, rng.uniform(0, 2 * np.pi), 1.5, 20, 0.05)
        rgb[polyline_distance(yy, xx, pts) < 0.006 + 2.0 / size] = [0.1, 0.07, 0.05]
    corners = np.clip((np.hypot(yy, xx) - 1.05) / 0.2, 0, 1)
    rgb *= (1 - corners)[..., None]
    rgb = ndimage.gaussian_filter(rgb, (0.5, 0.5, 0)) + rng.normal(0, 0.008, rgb.shape)
    return Sample(np.clip(rgb, 0, 1).astype(np.float32), masks={"photo-lesion": lesion.astype(np.uint8)},
                  labels={"photo-lesion-type": irregular},
                  findings={"lesion": (cy, cx, r0), "irregular": bool(irregular), "veil": shows_veil,
                            "dots": shows_dots, "hairs": int(hairs)})
