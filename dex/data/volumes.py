"""Image volumes, one way for every caller: read (NIfTI, DICOM series, multi-frame DICOM), brought to one orientation,
normalised by Table 2, cut into slices along a named axis, and per-slice results put back into the grid they came from.

Curation (:mod:`dex.data.curation`), task import (``dex data import-task volumes``), ``dex predict`` and ``dex embed``
all read volumes here, so ``slice_axis`` names the same anatomical planes for every source, DICOM or NIfTI, whatever the
acquisition orientation: the axial slices of a sagittally acquired series are cut across its stored sagittal images.

**The display layout.** A volume's ``values`` are ``[Z, Y, X]`` float32 in the scanner's real units (HU for CT, Bq/ml
or SUV for PET, scanner units for MR), Z from superior to inferior, Y anterior to posterior, X patient right to left:
axial slices ``values[z]`` as a radiologist views them, coronal ``values[:, y]``, sagittal ``values[:, :, x]``
(:data:`SLICE_AXES`). A NIfTI file is reoriented from its affine; a DICOM series is placed by its geometry (Image
Position and Orientation (Patient), Pixel Spacing) and a multi-frame object by its frames' functional groups (Plane
Position, Plane Orientation, Pixel Measures), then reoriented exactly as a NIfTI file of that affine (a standard axial
series, orientation [1, 0, 0, 0, 1, 0], is already in the layout: its slices, superior first). ``meta["affine"]`` maps
display indices (z, y, x) to RAS+ millimetres; ``meta["source_affine"]`` and ``meta["source_shape"]`` are those of the
grid the file stores (for DICOM: column, row, slice, the slices descending along the slice normal), into which
:func:`source_grid` puts display-layout values back.

**Taken as stored.** DICOM that cannot be placed in patient space (a slice without Image Position or Orientation, a
single slice, slices of different orientations or at one position, a multi-frame object without plane positions) is,
read with ``strict=False`` (curation, which only cuts slices), taken as stored: its image plane as the axial plane, its
slices in file or frame order, and no affine; a slice that cannot be read leaves a gap, the slices around it kept.
``strict=True`` (task import and prediction, which place labels in patient space) refuses both: a volume it cannot
place, and uneven gaps between slices (a missing slice would misplace every label past it).

Every failure is a :class:`~dex.data.readers.ReadError` naming the file and the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from dex.data.normalize import (  # noqa: F401  (re-exported: defined with the intensity rules, which need no readers)
    MODALITY_VOLUME_NORMALIZATION,
    SLICE_AXES,
    normalize_volume,
)
from dex.data.readers import Problem, ReadError, dicom_meta, dicom_pixels, finite, group_dicom_series, read_dataset


@dataclass
class Volume:
    """One volume: values in the display layout (or as stored, then without ``meta["affine"]``) and its geometry."""

    values: np.ndarray  # [Z, Y, X] float32, real units, in the display layout (or as stored: see the module)
    spacing: tuple[float, float, float]  # mm (z, y, x)
    meta: dict[str, Any] = field(default_factory=dict)  # non-identifying facts: modality, units, suv_factor, geometry
    slice_files: tuple[Path, ...] = ()  # single-frame DICOM: the file of each slice of the source grid, in its order

    def slice_file(self, axis: str, index: int) -> Path | None:
        """The file of slice ``index`` along ``axis`` when this is a single-frame DICOM series and ``axis`` runs across
        its slices (an axial series cut axially, a sagittal one sagittally), else None: a cut along another axis takes
        a line of pixels from every file."""
        if not self.slice_files:
            return None
        if "source_affine" not in self.meta:  # taken as stored: the files are the axial slices
            return self.slice_files[index] if SLICE_AXES[axis] == 0 else None
        ras, flip = nib.orientations.io_orientation(self.meta["source_affine"])[2]  # where the slice axis went
        if SLICE_AXES[axis] != 2 - int(ras):  # display Z, Y, X run along RAS axes 2, 1, 0, reversed
            return None
        return self.slice_files[len(self.slice_files) - 1 - index if flip > 0 else index]


# --- cutting ---------------------------------------------------------------------------------------------------

def cut(values: np.ndarray, index: int, axis: str) -> np.ndarray:
    """Slice ``index`` along ``axis`` (:data:`SLICE_AXES`) of a [Z, Y, X] array (values, labels, a mask)."""
    return np.take(values, index, SLICE_AXES[axis])


def volume_slice(normalised: np.ndarray, index: int, axis: str) -> np.ndarray:
    """Slice ``index`` along ``axis`` of a normalised volume, stored as task folders keep it: 16-bit, the [0, 1] values
    times 65535 rounded (read back with full scale 65535)."""
    return np.round(cut(normalised, index, axis) * 65535.0).astype(np.uint16)


# --- display layout and source grid ----------------------------------------------------------------------------

def _display_volumes(image: nib.spatialimages.SpatialImage, path: str | Path) -> list[Volume]:
    """A nibabel image (any affine) -> :class:`Volume` s in the display layout, one per time point, with the affine
    and the image's own grid in ``meta``."""
    source_affine, source_shape = np.array(image.affine, dtype=float), tuple(int(n) for n in image.shape[:3])
    try:
        image = nib.as_closest_canonical(image)  # RAS+
        data = np.asarray(image.dataobj, dtype=np.float32)  # scl_slope / scl_inter applied
    except Exception as err:
        raise ReadError(path, f"not a readable image volume ({type(err).__name__}: {err})") from err
    if data.ndim not in (3, 4):
        raise ReadError(path, f"expected a 3D or 4D image, found {data.ndim} dimensions {data.shape}")
    zooms = image.header.get_zooms()[:3]
    i, j, k = data.shape[:3]
    flip = np.array([[0, 0, -1, i - 1], [0, -1, 0, j - 1], [-1, 0, 0, k - 1], [0, 0, 0, 1]], dtype=float)
    affine = image.affine @ flip  # (z, y, x) -> (i, j, k) = (I-1-x, J-1-y, K-1-z) -> RAS
    frames = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]
    out = []
    for frame in frames:
        display = np.ascontiguousarray(frame.transpose(2, 1, 0)[::-1, ::-1, ::-1])  # RAS -> [S->I, A->P, R->L]
        out.append(Volume(finite(Path(path), display), (float(zooms[2]), float(zooms[1]), float(zooms[0])),
                          {"affine": affine, "source_affine": source_affine, "source_shape": source_shape}))
    return out


def source_grid(display: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """Values in the display layout ([Z, Y, X], e.g. a predicted label volume) put back into the voxel grid of the
    volume they were read from (its ``meta["source_affine"]``), so that saved with that affine they lie where the
    volume lies: the exact inverse of the reorientation a volume is read with."""
    canonical = display[::-1, ::-1, ::-1].transpose(2, 1, 0)  # [S->I, A->P, R->L] -> RAS+ (i, j, k)
    to_source = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.io_orientation(source_affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(canonical, to_source))


# --- NIfTI -----------------------------------------------------------------------------------------------------

def read_nifti(path: str | Path) -> list[Volume]:
    """A 3D NIfTI -> one :class:`Volume`, a 4D one -> one per time point; reoriented from any affine."""
    path = Path(path)
    try:
        image = nib.load(path)
    except Exception as err:
        raise ReadError(path, f"not a readable NIfTI file ({type(err).__name__}: {err})") from err
    return _display_volumes(image, path)


# --- DICOM -----------------------------------------------------------------------------------------------------

@dataclass
class _Plane:
    """One image of a DICOM volume: a single-frame file, or one frame of a multi-frame object."""

    values: np.ndarray  # [rows, columns] float32, the modality LUT applied
    position: np.ndarray | None  # Image Position (Patient): LPS mm of the first pixel's centre
    orientation: np.ndarray | None  # Image Orientation (Patient): the row direction, then the column direction
    spacing: tuple[float, float]  # Pixel Spacing: between rows, between columns (mm)
    thickness: float  # Spacing Between Slices, else Slice Thickness: the slice spacing of a volume taken as stored
    meta: dict[str, Any]  # :func:`dex.data.readers.dicom_meta` of its dataset
    file: Path | None = None  # a single-frame slice's file


def _vector(item: pydicom.Dataset | None, keyword: str) -> np.ndarray | None:
    value = item.get(keyword) if item is not None else None
    return np.array(value, dtype=float) if value is not None and len(value) else None


def _measures(item: pydicom.Dataset) -> tuple[tuple[float, float], float]:
    spacing = tuple(float(v) for v in item.get("PixelSpacing") or (1.0, 1.0))
    return spacing, float(item.get("SpacingBetweenSlices") or item.get("SliceThickness") or 1.0)


def _single_frame(path: Path, ds: pydicom.Dataset) -> _Plane:
    values = finite(path, apply_modality_lut(dicom_pixels(path, ds), ds).astype(np.float32))
    spacing, thickness = _measures(ds)
    return _Plane(values, _vector(ds, "ImagePositionPatient"), _vector(ds, "ImageOrientationPatient"), spacing,
                  thickness, dicom_meta(ds), path)


def _functional_group(groups: list[pydicom.Dataset], keyword: str) -> pydicom.Dataset | None:
    """The first item of the functional group sequence ``keyword`` in the first of ``groups`` that has it."""
    return next((g[keyword][0] for g in groups if g.get(keyword)), None)


def _frames(path: Path, ds: pydicom.Dataset) -> list[_Plane]:
    """The frames of a multi-frame object, each with the rescale, plane and pixel measures of its functional groups
    (its own, else the shared ones; the object's top-level rescale and spacing when it has no groups)."""
    stored = dicom_pixels(path, ds)  # [frames, rows, columns]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    meta = dicom_meta(ds)
    planes = []
    for index, frame in enumerate(stored):
        groups = [g for g in (per_frame[index] if index < len(per_frame) else None, shared) if g is not None]
        transform = _functional_group(groups, "PixelValueTransformationSequence") or ds
        slope, intercept = float(transform.get("RescaleSlope", 1.0)), float(transform.get("RescaleIntercept", 0.0))
        spacing, thickness = _measures(_functional_group(groups, "PixelMeasuresSequence") or ds)
        position = _vector(_functional_group(groups, "PlanePositionSequence"), "ImagePositionPatient")
        orientation = _vector(_functional_group(groups, "PlaneOrientationSequence"), "ImageOrientationPatient")
        planes.append(_Plane(finite(path, frame.astype(np.float32) * slope + intercept), position, orientation,
                             spacing, thickness, meta))
    return planes


def _unplaceable(planes: list[_Plane]) -> str | None:
    """Why ``planes`` cannot be placed in patient space, or None."""
    if len(planes) < 2 or any(p.position is None or p.orientation is None or len(p.orientation) != 6 for p in planes):
        return ("a volume needs two or more slices (or frames) with Image Position and Orientation (Patient) to be "
                "placed in patient space")
    if any(not np.allclose(p.orientation, planes[0].orientation, atol=1e-4) for p in planes):
        return "its slices differ in Image Orientation (Patient)"
    normal = np.cross(planes[0].orientation[:3], planes[0].orientation[3:])
    depths = np.sort([float(np.dot(normal, p.position)) for p in planes])
    if np.diff(depths).min() < 1e-3:
        return "two or more slices lie at one position (several stacks or acquisitions in one series)"
    return None


def _placed(planes: list[_Plane], where: Path, strict: bool) -> Volume:
    """Planes that can be placed: sorted descending along the slice normal (superior first for axial images) into the
    source grid (column, row, slice), then reoriented to the display layout like a NIfTI of that affine."""
    along_row, along_column = planes[0].orientation[:3], planes[0].orientation[3:]
    normal = np.cross(along_row, along_column)
    planes = sorted(planes, key=lambda p: -float(np.dot(normal, p.position)))
    positions = np.array([p.position for p in planes])
    gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    extent = positions[-1] - positions[0]
    if strict and gaps.max() - gaps.min() > 0.01 + 0.001 * float(np.linalg.norm(extent)) / len(gaps):
        raise ReadError(where, f"the slices are not evenly spaced (gaps from {gaps.min():.3g} to {gaps.max():.3g} mm): "
                               "a slice is missing, or the folder mixes series")
    # The smallest gap is the slice spacing. Across a larger one (slices left out; strict=False only) the slices are
    # stacked without the gap, so the affine places each slice past it as many slices too near the first as are
    # missing: curation, which reads with gaps, only cuts slices and uses no affine.
    step = extent / round(float(np.linalg.norm(extent)) / float(gaps.min()))
    row_spacing, column_spacing = planes[0].spacing
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = (along_row * column_spacing, along_column * row_spacing, step,
                                                      positions[0])
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    grid = np.ascontiguousarray(np.stack([p.values for p in planes]).transpose(2, 1, 0))  # (column, row, slice)
    volume = _display_volumes(nib.Nifti1Image(grid, ras), where)[0]
    volume.meta = {**planes[0].meta, **volume.meta}
    volume.slice_files = tuple(p.file for p in planes if p.file is not None)
    return volume


def _volume(planes: list[_Plane], where: Path, strict: bool) -> Volume:
    shapes = {p.values.shape for p in planes}
    if len(shapes) > 1:
        raise ReadError(where, f"slices of one series differ in size: {sorted(shapes)}")
    reason = _unplaceable(planes)
    if reason is None:
        return _placed(planes, where, strict)
    if strict:
        raise ReadError(where, reason)
    return Volume(np.stack([p.values for p in planes]), (planes[0].thickness, *planes[0].spacing), planes[0].meta,
                  tuple(p.file for p in planes if p.file is not None))


def read_dicom_volume(paths: Sequence[str | Path], unreadable: list[Problem] | None = None,
                      strict: bool = True) -> Volume:
    """One DICOM series (one file per slice) or one multi-frame object -> :class:`Volume` in the display layout, the
    modality LUT (Rescale Slope / Intercept; per frame for a multi-frame object) applied.

    ``strict`` (task import, prediction): the volume must be placed exactly in patient space, or ReadError. With
    ``strict=False`` (curation) a volume that cannot be placed is taken as stored, and one with a gap keeps the
    slices around it. A slice file that cannot be read or decoded raises ReadError, or, when ``unreadable`` is a list,
    is appended to it and left out of the volume.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("read_dicom_volume needs at least one file")
    if len(paths) == 1:
        dataset = read_dataset(paths[0])
        if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
            return _volume(_frames(paths[0], dataset), paths[0], strict)
    planes = []
    for path in paths:
        try:
            planes.append(_single_frame(path, dataset if len(paths) == 1 else read_dataset(path)))
        except ReadError as err:
            if unreadable is None:
                raise
            unreadable.append(err.problem)
    if not planes:
        raise ReadError(paths[0].parent, f"none of the series' {len(paths)} files could be read")
    return _volume(planes, paths[0].parent, strict)


def suv_values(volume: Volume, path: str | Path) -> np.ndarray:
    """A DICOM PET volume in SUV: as stored when its Units say SUV, else Bq/ml times its ``suv_factor``
    (:func:`dex.data.readers.suv_factor`)."""
    if volume.meta.get("units") == "SUV":
        return volume.values
    factor = volume.meta.get("suv_factor")
    if factor is None:
        raise ReadError(path, "PET in SUV needs Units BQML, PatientWeight, the injected dose and the injection and "
                              "series times")
    return volume.values * factor


# --- cases: an image volume and its labels ---------------------------------------------------------------------

def read_volume(path: str | Path, channel: int = 0, suv: bool = False,
                problems: list[Problem] | None = None) -> Volume:
    """An image volume placed in patient space, for labels drawn on it: a NIfTI file (channel ``channel`` of a 4D one)
    or a folder holding exactly one DICOM series (read ``strict``; in SUV when ``suv``, by :func:`suv_values`; NIfTI
    PET is taken to be in SUV already, as AutoPET ships it). Files of the folder that are not readable DICOM go to
    ``problems`` (raised without it); the series is read without them."""
    path = Path(path)
    if not path.is_dir():
        frames = read_nifti(path)
        if channel >= len(frames):
            raise ReadError(path, f"has {len(frames)} channel(s); channel {channel} does not exist")
        return frames[channel]
    files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    series = group_dicom_series(files, problems)
    if len(series) != 1:
        raise ReadError(path, f"holds {len(series)} DICOM series; a case folder must hold exactly one")
    volume = read_dicom_volume(next(iter(series.values())))
    if suv:
        volume.values = suv_values(volume, path)
    return volume


def read_label_volume(path: str | Path, image: Volume, image_name: str) -> np.ndarray:
    """A NIfTI label volume drawn on ``image`` (named ``image_name`` in errors), in the display layout as int64
    labels; a ReadError when it is not in the image's space (another shape after reorientation, or affines more
    than 0.01 mm apart), rather than a silently misaligned truth."""
    labels = read_nifti(path)[0]
    if labels.values.shape != image.values.shape:
        raise ReadError(path, f"label volume is {labels.values.shape}, the image {image_name} is "
                              f"{image.values.shape} (after reorientation)")
    offset = float(np.abs(image.meta["affine"] - labels.meta["affine"]).max())
    if offset > 0.01:
        raise ReadError(path, f"label volume is not in the space of the image {image_name} (their affines differ "
                              f"by up to {offset:.3g} mm)")
    return np.rint(labels.values).astype(np.int64)
