"""Ophthalmic imaging: colour fundus photographs and retinal OCT B-scans."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dex.data.phantoms.shapes import Sample, ellipse, grid, polyline_distance, smooth_field, speckle, wavy_curve

OCT_LAYERS = ("vitreous", "rnfl", "gcl-ipl", "inl-opl", "onl", "ez-rpe", "choroid")


def _vessel_tree(rng: np.random.Generator, disc: tuple[float, float], temporal: float):
    """Vessels leaving the optic disc: four arcades curving round the macula, branching as they go.

    Returns a list of (points [M, 2], width, darkness): darker for veins.
    """
    segments = []
    for up in (-1, 1):
        for kind, darkness in (("artery", 0.55), ("vein", 0.7)):
            start = np.array(disc) + [0.02 * up, 0.0]
            heading = np.arctan2(up * 0.9, temporal) + rng.normal(0, 0.15)
            stack = [(start, heading, 0.028 if kind == "vein" else 0.022, 0.9, 0)]
            while stack:
                point, angle, width, length, depth = stack.pop()
                pts = wavy_curve(rng, point, angle, length, 16, 0.09)
                # bend the arcades around the macula
                pts[:, 0] += up * 0.25 * np.linspace(0, 1, len(pts)) ** 2 * length
                segments.append((pts, width, darkness))
                if depth < 3:
                    for cut in rng.uniform(0.3, 0.8, rng.integers(1, 3)):
                        k = int(cut * (len(pts) - 1))
                        branch = angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)
                        stack.append((pts[k], branch, width * 0.7, length * 0.55, depth + 1))
    for _ in range(rng.integers(3, 6)):  # nasal vessels
        angle = np.pi * rng.uniform(0.6, 1.4) * np.sign(-temporal)
        segments.append((wavy_curve(rng, np.array(disc), angle, 0.6, 12, 0.1), 0.015, 0.6))
    return segments


def fundus(rng: np.random.Generator, size: int) -> Sample:
    """Orange-red retina in a circular field on black; bright optic disc with a cup; darker macula; vessel tree;
    exudates (yellow spots) in about half the images.

    Masks: ``fundus-vessels``, ``fundus-exudates`` (binary); labels: ``fundus-exudates`` (0 none, 1 present).
    Findings: ``eye`` ("right" with the disc on the image's right, else "left"), ``disc`` (y, x, radius, vertical
    cup-to-disc ratio), ``macula`` (y, x), ``exudates`` (a list of (y, x, radius y, radius x), the spots with a pixel
    in the field of view).
    """
    yy, xx = grid(size)
    radius = np.hypot(yy, xx)
    fov = radius < 0.94
    side = rng.choice([-1.0, 1.0])  # left or right eye: disc on one side, macula on the other
    disc = (rng.uniform(-0.08, 0.08), side * rng.uniform(0.38, 0.48))
    macula = (disc[0] + rng.uniform(-0.05, 0.05), disc[1] - side * 0.75)
    light = np.clip(1.15 - 0.5 * radius**2, 0, 1) * (1 + 0.08 * smooth_field(rng, yy.shape, size / 10))
    pigment = rng.uniform(0.8, 1.1)
    rgb = np.stack([0.85 * light, 0.36 * light * pigment, 0.12 * light * pigment], axis=2)
    macular = np.exp(-(((yy - macula[0]) ** 2 + (xx - macula[1]) ** 2) / 0.02))
    rgb *= (1 - 0.35 * macular)[..., None]
    vessels = np.zeros(yy.shape, bool)
    for pts, width, darkness in _vessel_tree(rng, disc, -side):
        dist = polyline_distance(yy, xx, pts)
        core = dist < width / 2
        vessels |= core
        shade = np.clip(1 - (width / 2 - dist) / (width / 2), 0, 1)  # darker in the middle
        rgb[core] *= (darkness + (1 - darkness) * shade[core] * 0.5)[:, None] * np.array([1.0, 0.6, 0.6])
    disc_r = rng.uniform(0.09, 0.12)
    disc_glow = np.exp(-(((yy - disc[0]) ** 2 + (xx - disc[1]) ** 2) / (disc_r**2)))
    rgb = rgb + disc_glow[..., None] * np.array([0.35, 0.5, 0.35])
    cup_ry = disc_r * 0.4
    cup = ellipse(yy, xx, disc[0], disc[1], cup_ry, disc_r * 0.35)
    rgb[cup] = np.minimum(rgb[cup] + [0.1, 0.15, 0.15], 1.0)
    exudates = np.zeros(yy.shape, bool)
    spots = []
    if rng.random() < 0.5:
        for _ in range(rng.integers(4, 12)):
            cy, cx = np.array(macula) + rng.normal(0, 0.15, 2)
            ry, rx = rng.uniform(0.012, 0.03, 2)
            spot = ellipse(yy, xx, cy, cx, ry, rx) & fov
            if spot.any():
                spots.append((cy, cx, ry, rx))
            exudates |= spot
        rgb[exudates] = [0.95, 0.88, 0.45]
    rgb = ndimage.gaussian_filter(rgb, (0.5, 0.5, 0)) + rng.normal(0, 0.01, rgb.shape)
    rgb *= fov[..., None]
    return Sample(np.clip(rgb, 0, 1).astype(np.float32),
                  masks={"fundus-vessels": (vessels & fov).astype(np.uint8),
                         "fundus-exudates": exudates.astype(np.uint8)},
                  labels={"fundus-exudates": int(exudates.any())},
                  findings={"eye": "right" if side > 0 else "left", "disc": (*disc, disc_r, cup_ry / disc_r),
                            "macula": macula, "exudates": spots})


def oct_bscan(rng: np.random.Generator, size: int) -> Sample:
    """A foveal OCT B-scan: dark vitreous, curved retina with a foveal pit, alternating bright and dark layers
    (RNFL bright, INL and ONL dark, EZ/RPE brightest), textured choroid, multiplicative speckle, log display.

    Masks: ``oct-layers`` with the indices of OCT_LAYERS. Findings: ``fovea`` (x of the pit's centre),
    ``central_thickness`` (from the inner limiting membrane to the bottom of the EZ/RPE in the pit's column, in
    units of y), ``nasal`` (the side, "right", where the nerve fibre layer is thicker).
    """
    yy, xx = grid(size)
    centre = rng.uniform(-0.15, 0.15)
    globe = rng.uniform(-0.1, 0.05) + rng.uniform(0.1, 0.3) * (xx - centre) ** 2  # top of the EZ/RPE band
    fovea = np.exp(-((xx - centre) ** 2) / rng.uniform(0.015, 0.03))
    nasal = 0.05 * (xx > centre)  # the RNFL is thicker on the nasal side
    # RNFL, GCL-IPL, INL-OPL, ONL from the inside out; the inner three thin out at the fovea, forming the pit
    inner = [(0.09 + nasal) * (1 - 0.9 * fovea), 0.14 * (1 - 0.85 * fovea), 0.12 * (1 - 0.6 * fovea),
             0.16 + 0.06 * fovea]
    reflectivity = [0.004, 0.85, 0.45, 0.2, 0.12, 1.0, 0.35]
    boundaries = [globe]  # the top of each layer, built upwards from the EZ/RPE
    for t in reversed(inner):
        boundaries.insert(0, boundaries[0] - t)
    boundaries.append(globe + 0.06)  # bottom of the EZ/RPE = top of the choroid
    bottom_choroid = boundaries[-1] + rng.uniform(0.12, 0.2)
    layers = np.zeros(yy.shape, np.uint8)
    for i, b in enumerate(boundaries):
        layers[yy >= b] = i + 1
    signal = np.array(reflectivity)[layers]
    choroid = layers == len(OCT_LAYERS) - 1
    signal[choroid] *= np.clip(1 + 0.6 * smooth_field(rng, yy.shape, 2.0)[choroid], 0.2, None)
    deep = yy >= bottom_choroid
    signal[deep] *= np.exp(-15 * (yy - bottom_choroid))[deep]  # signal fades in the sclera
    grain = speckle(rng.standard_normal((2, size, size)), (0.6, 1.5))
    image = np.log1p(20 * signal * grain) / np.log1p(20 * 1.6)
    pit = int(np.argmin(np.abs(xx[0] - centre)))
    return Sample(np.clip(image, 0, 1).astype(np.float32), masks={"oct-layers": layers},
                  findings={"fovea": centre, "central_thickness": float(boundaries[-1][0, pit] - boundaries[0][0, pit]),
                            "nasal": "right"})
