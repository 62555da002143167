"""CT, MR, PET and X-ray from one 3D torso phantom, so the four modalities share anatomy and differ by physics.

The torso is a label volume [Z, Y, X] (Z from superior to inferior, Y anterior to posterior, X patient right to
left) in normalised coordinates: thorax with lungs, heart and ribs above, abdomen with liver, spleen and kidneys
below, a spine throughout, a subcutaneous fat layer and optional lesions. Each modality maps the labels through
its own property table and imaging model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dex.data.phantoms.shapes import Sample, ellipsoid, smooth_field

TISSUES = ("air", "soft", "fat", "lung", "heart", "liver", "spleen", "kidney", "bone", "lesion")
T = {name: i for i, name in enumerate(TISSUES)}
ORGAN_CLASSES = ("background", "lung", "heart", "liver", "spleen", "kidney")  # the CT / MR segmentation task

# Property tables, indexed like TISSUES.
CT_HU = np.array([-1000.0, 40.0, -100.0, -850.0, 40.0, 60.0, 50.0, 35.0, 800.0, 45.0])
MR_T1 = np.array([0.0, 0.32, 0.95, 0.04, 0.25, 0.52, 0.42, 0.45, 0.65, 0.30])  # T1-weighted: fat bright
PET_SUV = np.array([0.0, 0.6, 0.25, 0.35, 3.0, 2.2, 1.8, 4.5, 0.9, 8.0])
XRAY_MU = np.array([0.0, 0.20, 0.18, 0.05, 0.21, 0.21, 0.21, 0.21, 0.48, 0.21])  # 1/cm at ~60 keV

FIELD_MM = 400.0  # in-plane field of view
TORSO_MM = 600.0  # superior-inferior extent of z in [-1, 1]
XRAY_Z_RANGE = (1.12, -0.45)  # the rows of a chest radiograph, neck to upper abdomen


@dataclass
class Torso:
    labels: np.ndarray  # [Z, Y, X] uint8 tissue indices
    spacing: tuple[float, float, float]  # mm (z, y, x)
    lesion_suv: np.ndarray  # [Z, Y, X] uptake of the lesions (0 elsewhere)
    organs: list[tuple[str, tuple[float, float, float], tuple[float, float, float]]]  # (tissue, centre, radii) z, y, x


def torso(rng: np.random.Generator, depth: int, size: int, z_range=(1.15, -1.1), y_size: int | None = None,
          lesions: int = 0) -> Torso:
    """A random torso on a [depth, y_size or size, size] grid covering z from ``z_range[0]`` to ``z_range[1]``; the
    body spans z in [-1, 1] (neck to pelvis), so the default range has empty slices at both ends, as scans do."""
    y_size = y_size or size
    z = np.linspace(z_range[0], z_range[1], depth)
    zz, yy, xx = np.meshgrid(z, np.linspace(-1, 1, y_size), np.linspace(-1, 1, size), indexing="ij", sparse=True)
    j = lambda scale=0.08: 1.0 + rng.uniform(-scale, scale)  # noqa: E731  per-subject size jitter
    ax, ay = 0.82 * j(), 0.55 * j()
    rise = np.clip((zz - 0.8) / 0.16, 0.0, 1.0)
    neck = rise * rise * (3 - 2 * rise)  # smoothstep: rounded shoulders narrowing to the neck
    body_x, body_y = ax * (1 - 0.7 * neck), ay * (1 - 0.45 * neck)
    radius = np.sqrt((xx / body_x) ** 2 + (yy / body_y) ** 2)
    radius[(z > 1.0) | (z < -1.0)] = np.inf  # the body ends; a scan may reach beyond it
    labels = np.zeros(radius.shape, np.uint8)
    labels[radius <= 1.0] = T["soft"]
    labels[(radius <= 1.0) & (radius > 1.0 - rng.uniform(0.06, 0.15))] = T["fat"]
    organs = [
        ("liver", (-0.15 * j(), 0.0, -0.33 * j()), (0.26 * j(), 0.35 * j(), 0.36 * j())),
        ("spleen", (-0.12 * j(), 0.18, 0.48 * j()), (0.15 * j(), 0.15 * j(), 0.12 * j())),
        ("kidney", (-0.45 * j(), 0.3, 0.3 * j()), (0.16 * j(), 0.11 * j(), 0.1 * j())),
        ("kidney", (-0.45 * j(), 0.3, -0.3 * j()), (0.16 * j(), 0.11 * j(), 0.1 * j())),
        ("heart", (0.3 * j(), -0.12, 0.1 * j()), (0.22 * j(), 0.2 * j(), 0.2 * j())),
        ("lung", (0.45, -0.02, 0.36 * j(0.05)), (0.5 * j(), 0.38 * j(), 0.26 * j())),
        ("lung", (0.45, -0.02, -0.36 * j(0.05)), (0.5 * j(), 0.38 * j(), 0.26 * j())),
    ]
    inside = labels > 0
    axes = (z, np.linspace(-1, 1, y_size), np.linspace(-1, 1, size))
    for name, center, radii in organs:
        box = _box(axes, center, radii)  # evaluate each organ inside its bounding box only
        grids = (zz[box[0]], yy[:, box[1]], xx[:, :, box[2]])
        shape = ellipsoid(*grids, center, radii) & inside[box] & (grids[0] < 0.97)
        if name == "lung":
            shape &= labels[box] != T["heart"]
        labels[box][shape] = T[name]
    spine = (np.hypot(yy - 0.36 * ay / 0.55, xx) < 0.09) & (np.mod(zz * 6.5, 1.0) > 0.15) & inside
    labels[spine] = T["bone"]
    for zk in np.linspace(0.2, 0.9, 6):  # ribs: bands along the thoracic wall, tilted downwards anteriorly
        band = (radius > 0.84) & (radius < 0.92) & (np.abs(zz - zk - 0.45 * yy) < 0.025) & (yy > -0.45)
        labels[band & inside] = T["bone"]
    lesion_suv = np.zeros(labels.shape, np.float32)
    candidates = np.argwhere(np.isin(labels, [T["lung"], T["liver"], T["soft"]]))
    for _ in range(lesions):
        if not len(candidates):
            break
        cz, cy, cx = candidates[rng.integers(len(candidates))]
        r = rng.uniform(0.07, 0.12)
        blob = ellipsoid(zz, yy, xx, (z[cz], yy[0, cy, 0], xx[0, 0, cx]), (r * 1.5, r, r)) & inside
        labels[blob] = T["lesion"]
        lesion_suv[blob] = rng.uniform(5.0, 15.0)
    spacing = (TORSO_MM * abs(z_range[0] - z_range[1]) / 2 / max(depth - 1, 1), FIELD_MM / y_size, FIELD_MM / size)
    return Torso(labels, spacing, lesion_suv, organs)


def _box(axes, center, radii) -> tuple[slice, ...]:
    """Index ranges of a grid (one coordinate array per axis) that hold an axis-aligned ellipsoid."""
    out = []
    for coords, c, r in zip(axes, center, radii):
        inside = np.flatnonzero(np.abs(coords - c) <= r)
        out.append(slice(inside.min(), inside.max() + 1) if len(inside) else slice(0, 0))
    return tuple(out)


def organ_labels(labels: np.ndarray) -> np.ndarray:
    """Tissue labels -> the organ classes of ORGAN_CLASSES (0 elsewhere)."""
    lut = np.zeros(len(TISSUES), np.uint8)
    for i, name in enumerate(ORGAN_CLASSES[1:], start=1):
        lut[T[name]] = i
    return lut[labels]


def ct_hu(rng: np.random.Generator, body: Torso) -> np.ndarray:
    """Hounsfield units: tissue values with mild texture, partial-volume blur and Gaussian noise (sigma 12 HU)."""
    hu = CT_HU[body.labels].astype(np.float32)
    hu += 8.0 * smooth_field(rng, hu.shape, 1.5) * (body.labels > 0)
    lung = body.labels == T["lung"]
    hu[lung] += 120.0 * np.clip(smooth_field(rng, hu.shape, 0.7)[lung] - 1.5, 0, None)  # lung vessels
    hu = ndimage.gaussian_filter(hu, (0, 0.6, 0.6))  # in-plane point-spread function
    return (hu + rng.normal(0.0, 12.0, hu.shape)).astype(np.float32)


def mr_t1(rng: np.random.Generator, body: Torso, scale: float = 1200.0) -> np.ndarray:
    """T1-weighted magnitude: tissue contrast, smooth multiplicative bias field, Rician noise (scanner units)."""
    signal = MR_T1[body.labels] * (1.0 + 0.06 * smooth_field(rng, body.labels.shape, 1.5))
    bias = np.exp(0.2 * smooth_field(rng, body.labels.shape, max(body.labels.shape) / 3))
    signal = ndimage.gaussian_filter(signal * bias * scale, (0, 0.5, 0.5))
    sigma = 0.03 * scale
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imag = rng.normal(0.0, sigma, signal.shape)
    return np.hypot(real, imag).astype(np.float32)


@dataclass
class PETScan:
    bqml: np.ndarray  # [Z, Y/2, X/2] activity concentration, Bq/ml (decay-corrected to the scan start)
    suv: np.ndarray  # same grid, SUV (body weight)
    labels: np.ndarray  # tissue labels on the PET grid
    spacing: tuple[float, float, float]
    weight_kg: float
    dose_bq: float
    minutes_after_injection: float


def pet(rng: np.random.Generator, body: Torso) -> PETScan:
    """FDG-PET: SUV map at half the in-plane resolution, scanner blur (FWHM ~2.4 voxels), Poisson counts."""
    suv = PET_SUV[body.labels].astype(np.float64)
    suv[body.labels == T["heart"]] *= rng.uniform(0.5, 1.5)  # myocardial uptake varies a lot
    suv = np.where(body.lesion_suv > 0, body.lesion_suv, suv)
    depth, height, width = suv.shape
    suv = suv.reshape(depth, height // 2, 2, width // 2, 2).mean(axis=(2, 4))
    suv = ndimage.gaussian_filter(suv, (0.6, 1.0, 1.0))
    weight, dose, minutes = rng.uniform(55, 95), rng.uniform(2.5e8, 4.0e8), rng.uniform(50, 75)
    decayed = dose * 2.0 ** (-minutes * 60.0 / 6586.2)
    bqml = suv * decayed / (weight * 1000.0)
    per_count = 2.2 * decayed / (weight * 1000.0) / 40.0  # about 40 counts in a liver voxel
    counts = rng.poisson(bqml / per_count)
    bqml = (counts * per_count).astype(np.float32)
    spacing = (body.spacing[0], body.spacing[1] * 2, body.spacing[2] * 2)
    return PETScan(bqml, (bqml * weight * 1000.0 / decayed).astype(np.float32), body.labels[:, ::2, ::2],
                   spacing, weight, dose, minutes)


XRAY_CLASSES = ("background", "lung", "heart")


def chest_xray(rng: np.random.Generator, size: int) -> Sample:
    """A posterior-anterior chest radiograph: Beer-Lambert line integrals through a torso, Poisson quantum noise,
    log transform so that bone is bright, random patient positioning.

    Returns ``image`` [size, size] in [0, 1] (columns from the patient's right to left), mask ``xray-lungs`` (the
    lung and heart fields, XRAY_CLASSES) and findings ``heart`` (column of its centre, half-width) and ``thorax``
    (columns of the outer edges of the lungs), where the positioning put them, in the image's [-1, 1] coordinates.
    """
    body = torso(rng, size, size, z_range=XRAY_Z_RANGE, y_size=max(size // 2, 16))
    path_cm = body.spacing[1] / 10.0
    line_integral = (XRAY_MU[body.labels] * path_cm).sum(axis=1)  # [Z, X]
    photons = rng.uniform(3000, 8000)
    detected = np.maximum(rng.poisson(photons * np.exp(-line_integral)), 1)
    density = np.log(photons / detected)
    image = np.clip(density / rng.uniform(5.5, 7.0), 0, 1) ** rng.uniform(0.7, 1.0)
    fields = np.zeros(line_integral.shape, np.uint8)
    fields[(body.labels == T["lung"]).any(axis=1)] = 1
    fields[(body.labels == T["heart"]).any(axis=1)] = 2
    # patient positioning: shift, tilt and magnification differ from one radiograph to the next
    angle, scale = np.deg2rad(rng.uniform(-6, 6)), rng.uniform(0.88, 1.08)
    matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale
    centre = (np.array(image.shape) - 1) / 2
    offset = centre - matrix @ (centre + rng.uniform(-0.08, 0.08, 2) * np.array(image.shape))
    image = ndimage.affine_transform(image, matrix, offset, order=1, mode="constant", cval=0.0)
    fields = ndimage.affine_transform(fields, matrix, offset, order=0, mode="constant", cval=0)
    per_unit = (size - 1) / np.array([XRAY_Z_RANGE[0] - XRAY_Z_RANGE[1], 2.0])  # pixels per torso unit (z, x)
    to_output = np.linalg.inv(matrix)

    def columns(center, radii) -> tuple[float, float]:
        """(centre, half-width) of an organ's projected ellipse across the positioned radiograph, in [-1, 1] units."""
        pixel = np.array([XRAY_Z_RANGE[0] - center[0], center[2] + 1.0]) * per_unit
        column = (to_output @ (pixel - offset))[1]
        half = np.hypot(*(to_output[1] * np.array([radii[0], radii[2]]) * per_unit))
        return 2 * column / (size - 1) - 1, 2 * half / (size - 1)

    heart = next(columns(c, r) for name, c, r in body.organs if name == "heart")
    lungs = [columns(c, r) for name, c, r in body.organs if name == "lung"]
    thorax = (min(c - h for c, h in lungs), max(c + h for c, h in lungs))
    return Sample(image.astype(np.float32), masks={"xray-lungs": fields}, findings={"heart": heart, "thorax": thorax})
