"""Readers for the formats medical image collections come in, built on pydicom, nibabel, Pillow, tifffile and PyAV.

Volumes come back in one layout, whatever the file's orientation: ``[Z, Y, X]`` float32 in the scanner's real
units (HU for CT, Bq/ml or SUV for PET, scanner units for MR), Z from superior to inferior (for DICOM: along the
slice normal, descending), Y anterior to posterior, X patient right to left, i.e. axial slices as a radiologist
views them. Every failure is a :class:`ReadError` naming the file and the reason.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import av
import nibabel as nib
import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut

from dex.data.normalize import SLICE_AXES  # noqa: F401  (re-exported: where the readers' callers look for it)


class ReadError(ValueError):
    """A file that cannot be read as what it claims to be; ``str()`` names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    @property
    def problem(self) -> Problem:
        return Problem(self.path, self.reason)


class Problem(NamedTuple):
    """A file (or folder) that could not be used, and why: one row of a quarantine or problems report."""

    path: str
    reason: str


@dataclass
class Volume:
    values: np.ndarray  # [Z, Y, X] float32, real units
    spacing: tuple[float, float, float]  # mm (z, y, x)
    meta: dict[str, Any] = field(default_factory=dict)  # non-identifying facts: modality, units, suv_factor, ...
    slice_files: tuple[Path, ...] = ()  # single-frame DICOM series: the file of each slice, in slice order


@dataclass
class Picture:
    pixels: np.ndarray  # [H, W] or [H, W, 3], the stored integer (or float) values
    max_value: float  # the full-scale value of the stored type: 255 for 8 bit, 65535 for 16 bit, 1.0 for float


def _finite(path: Path, values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():
        raise ReadError(path, "contains NaN or infinite values")
    return values


# --- DICOM -----------------------------------------------------------------------------------------------------

def _read_dataset(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as err:  # pydicom raises many kinds for truncated or foreign bytes
        raise ReadError(path, f"not a readable DICOM file ({type(err).__name__}: {err})") from err


def _pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    if "PixelData" not in ds:
        raise ReadError(path, "DICOM file has no pixel data")
    try:
        stored = ds.pixel_array
    except Exception as err:
        raise ReadError(path, f"cannot decode the pixel data ({type(err).__name__}: {err})") from err
    if ds.get("SamplesPerPixel", 1) != 1:
        raise ReadError(path, f"expected a grey image, found SamplesPerPixel={ds.SamplesPerPixel}")
    return stored


def _time(value: str) -> datetime.timedelta:
    value = str(value).split(".")[0].ljust(6, "0")
    return datetime.timedelta(hours=int(value[:2]), minutes=int(value[2:4]), seconds=int(value[4:6]))


def suv_factor(ds: pydicom.Dataset) -> float | None:
    """Body-weight SUV per Bq/ml of a PET dataset, or None when its tags do not allow it.

    ``SUV = C * weight_g / dose_at_scan`` for images in Bq/ml (Units BQML) decay-corrected to the scan start
    (DecayCorrection START), with the injected dose decayed from the injection time to the series time.
    """
    try:
        if ds.Modality != "PT" or ds.Units != "BQML" or ds.get("DecayCorrection", "START") != "START":
            return None
        info = ds.RadiopharmaceuticalInformationSequence[0]
        elapsed = (_time(ds.SeriesTime) - _time(info.RadiopharmaceuticalStartTime)).total_seconds()
        dose = float(info.RadionuclideTotalDose) * 2.0 ** (-elapsed / float(info.RadionuclideHalfLife))
        weight_g = float(ds.PatientWeight) * 1000.0
    except (AttributeError, IndexError, KeyError, ValueError, TypeError):
        return None
    return weight_g / dose if dose > 0 and weight_g > 0 else None


def suv_values(volume: Volume, path: str | Path) -> np.ndarray:
    """A DICOM PET volume in SUV: as stored when its Units say SUV, else Bq/ml times :func:`suv_factor`."""
    if volume.meta.get("units") == "SUV":
        return volume.values
    factor = volume.meta.get("suv_factor")
    if factor is None:
        raise ReadError(path, "PET in SUV needs Units BQML, PatientWeight, the injected dose and the injection and "
                              "series times")
    return volume.values * factor


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    orientation = np.array(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    return np.cross(orientation[:3], orientation[3:])


def group_dicom_series(paths: Sequence[Path], unreadable: list[Problem] | None = None) -> dict[str, list[Path]]:
    """Group DICOM files by SeriesInstanceUID (headers only).

    An unreadable file raises :class:`ReadError`, or, when ``unreadable`` is a list, is appended to it as a
    :class:`Problem` and left out, so that one bad file does not cost the series around it.
    """
    series: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:
            error = ReadError(path, f"not a readable DICOM file ({type(err).__name__}: {err})")
            if unreadable is None:
                raise error from err
            unreadable.append(error.problem)
            continue
        series[str(ds.get("SeriesInstanceUID", path.parent))].append(path)
    return dict(series)


def read_dicom_series(paths: Sequence[str | Path], unreadable: list[Problem] | None = None) -> Volume:
    """One series (one file per slice, or one multi-frame file) -> :class:`Volume` with the modality LUT
    (Rescale Slope/Intercept) applied, slices sorted along the slice normal.

    A slice file that cannot be read or decoded raises :class:`ReadError`, or, when ``unreadable`` is a list, is
    appended to it and left out of the volume (the slices around it are kept; the volume then has a gap).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("read_dicom_series needs at least one file")
    if len(paths) == 1:
        dataset = _read_dataset(paths[0])
        if int(dataset.get("NumberOfFrames", 1)) > 1:
            return _read_multiframe(paths[0], dataset)
    slices: list[tuple[Path, pydicom.Dataset, np.ndarray]] = []
    for path in paths:
        try:
            ds = _read_dataset(path)
            values = _finite(path, apply_modality_lut(_pixels(path, ds), ds).astype(np.float32))
        except ReadError as err:
            if unreadable is None:
                raise
            unreadable.append(err.problem)
            continue
        slices.append((path, ds, values))
    if not slices:
        raise ReadError(paths[0].parent, f"none of the series' {len(paths)} files could be read")
    shapes = {values.shape for _, _, values in slices}
    if len(shapes) > 1:
        raise ReadError(paths[0].parent, f"slices of one series differ in size: {sorted(shapes)}")
    normal = _normal(slices[0][1])
    positions = [float(np.dot(normal, ds.get("ImagePositionPatient", [0, 0, i]))) for i, (_, ds, _) in
                 enumerate(slices)]
    order = np.argsort(positions)[::-1]  # descending along the normal: superior first for axial images
    sorted_positions = np.array(positions)[order]
    gaps = np.abs(np.diff(sorted_positions))
    first = slices[order[0]][1]
    thickness = float(np.median(gaps)) if len(gaps) else float(first.get("SliceThickness", 1.0) or 1.0)
    row, col = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    return Volume(np.stack([slices[i][2] for i in order]), (thickness, row, col), _dicom_meta(first),
                  tuple(slices[i][0] for i in order))


def _read_multiframe(path: Path, ds: pydicom.Dataset) -> Volume:
    stored = _pixels(path, ds).astype(np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and "PixelValueTransformationSequence" in shared[0]:
        transform = shared[0].PixelValueTransformationSequence[0]
        slope, intercept = float(transform.RescaleSlope), float(transform.RescaleIntercept)
    values = _finite(path, stored * slope + intercept)
    spacing = (float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0),
               *(float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])))
    return Volume(values, spacing, _dicom_meta(ds))


def read_dicom_pictures(path: str | Path, stride: int = 30) -> tuple[list[tuple[int, Picture]], dict[str, Any]]:
    """A 2D DICOM image (radiograph, ultrasound, secondary capture): grey or RGB, MONOCHROME1 inverted so that
    bright means dense, full scale ``2**BitsStored - 1``; a multi-frame object gives every ``stride``-th frame.

    Returns [(frame index, :class:`Picture`)] (frame index -1 for a single frame) and the non-identifying meta.
    """
    path = Path(path)
    ds = _read_dataset(path)
    if "PixelData" not in ds:
        raise ReadError(path, "DICOM file has no pixel data")
    try:
        pixels = ds.pixel_array  # YBR colour data comes back as RGB
        if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
    except Exception as err:
        raise ReadError(path, f"cannot decode the pixel data ({type(err).__name__}: {err})") from err
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = 3 if pixels.shape[-1] == 3 and pixels.ndim == (4 if frames > 1 else 3) else 1
    if frames == 1:
        pixels = pixels[None]
    if pixels.ndim != (4 if samples == 3 else 3):
        raise ReadError(path, f"unexpected pixel array shape {pixels.shape} for {frames} frame(s)")
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":  # the LUT's output depth
        bits = 8 * pixels.dtype.itemsize
    else:
        bits = int(ds.get("BitsStored", 8 * pixels.dtype.itemsize))
    full_scale = float((1 << bits) - 1)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = full_scale - pixels
    if pixels.dtype.kind == "i":  # signed storage: shift to start at zero
        pixels = pixels - pixels.min()
    out = []
    for index in range(0, pixels.shape[0], stride if frames > 1 else 1):
        frame = np.clip(pixels[index], 0, full_scale)
        out.append((index if frames > 1 else -1, Picture(frame.astype(np.uint16 if full_scale > 255 else np.uint8),
                                                         full_scale)))
    return out, _dicom_meta(ds)


def _dicom_meta(ds: pydicom.Dataset) -> dict[str, Any]:
    """The non-identifying facts downstream code needs, plus the study UID (for a salted hash, never stored raw)."""
    return {
        "modality": str(ds.get("Modality", "")),
        "units": str(ds.get("Units", "HU" if ds.get("Modality") == "CT" else "")),
        "suv_factor": suv_factor(ds),
        "burned_in_annotation": str(ds.get("BurnedInAnnotation", "")).upper() == "YES",
        "study_uid": str(ds.get("StudyInstanceUID", "")),
    }


# --- NIfTI -----------------------------------------------------------------------------------------------------

def read_nifti(path: str | Path) -> list[Volume]:
    """A 3D NIfTI -> one :class:`Volume`, a 4D one -> one per time point; reoriented from any affine."""
    path = Path(path)
    try:
        image = nib.load(path)
    except Exception as err:
        raise ReadError(path, f"not a readable NIfTI file ({type(err).__name__}: {err})") from err
    return display_volumes(image, path)


def display_volumes(image: nib.spatialimages.SpatialImage, path: str | Path) -> list[Volume]:
    """A nibabel image (any affine) -> :class:`Volume` s in the display layout, one per time point, with
    ``meta["affine"]``: the 4 x 4 map from display indices (z, y, x) to RAS+ millimetres, and the image's own grid
    (``meta["source_affine"]``, ``meta["source_shape"]``: its voxel axes, three of them), into which
    :func:`source_grid` puts display-layout values back."""
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
        out.append(Volume(_finite(Path(path), display), (float(zooms[2]), float(zooms[1]), float(zooms[0])),
                          {"affine": affine, "source_affine": source_affine, "source_shape": source_shape}))
    return out


def source_grid(display: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """Values in the display layout of :func:`display_volumes` ([Z, Y, X], e.g. a predicted label volume) put
    back into the voxel grid of the image they were read from (its ``meta["source_affine"]``), so that saved with
    that affine they lie where the image lies: the inverse of the reorientation :func:`read_nifti` applies."""
    canonical = display[::-1, ::-1, ::-1].transpose(2, 1, 0)  # [S->I, A->P, R->L] -> RAS+ (i, j, k)
    to_source = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.io_orientation(source_affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(canonical, to_source))


def read_dicom_series_display(paths: Sequence[str | Path]) -> Volume:
    """One single-frame DICOM series placed in patient space from its geometry (Image Position / Orientation
    Patient, Pixel Spacing) and reoriented to the display layout exactly as :func:`read_nifti` does, so that a
    NIfTI label volume drawn on it lines up whatever the acquisition orientation. ``meta`` as
    :func:`read_dicom_series`, plus ``affine`` (display indices -> RAS+ mm)."""
    paths = [Path(p) for p in paths]
    volume = read_dicom_series(paths)  # slices sorted descending along the slice normal
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    if len(headers) < 2 or any("ImagePositionPatient" not in h or "ImageOrientationPatient" not in h
                               for h in headers):
        raise ReadError(paths[0].parent, "a series needs two or more slices with Image Position and Orientation "
                                         "(Patient) to be placed in patient space")
    orientation = np.array(headers[0].ImageOrientationPatient, dtype=float)
    along_row, along_column = orientation[:3], orientation[3:]  # directions of increasing column / row index
    normal = np.cross(along_row, along_column)
    positions = sorted((np.array(h.ImagePositionPatient, dtype=float) for h in headers),
                       key=lambda position: -float(np.dot(normal, position)))
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    gaps = np.linalg.norm(np.diff(np.array(positions), axis=0), axis=1)
    if gaps.max() - gaps.min() > 0.01 + 0.001 * float(np.linalg.norm(step)):  # a missing slice would misplace labels
        raise ReadError(paths[0].parent, f"the slices are not evenly spaced (gaps from {gaps.min():.3g} to "
                                         f"{gaps.max():.3g} mm): a slice is missing, or the folder mixes series")
    row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = (along_row * column_spacing, along_column * row_spacing, step,
                                                      positions[0])
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    image = nib.Nifti1Image(np.ascontiguousarray(volume.values.transpose(2, 1, 0)), ras)  # (column, row, slice)
    display = display_volumes(image, paths[0].parent)[0]
    display.meta = {**volume.meta, **display.meta}
    display.slice_files = volume.slice_files  # the file of each slice k of the source grid (column, row, k)
    return display


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


def read_volume(path: str | Path, channel: int = 0, suv: bool = False,
                problems: list[Problem] | None = None) -> Volume:
    """An image volume in the display layout with its geometry: a NIfTI file (channel ``channel`` of a 4D one)
    or a folder holding exactly one single-frame DICOM series (:func:`read_dicom_series_display`; in SUV when
    ``suv``, from its tags by :func:`suv_values`; NIfTI PET is taken to be in SUV already, as AutoPET ships it).
    Files of the folder that are not readable DICOM go to ``problems`` (raised without it); the series is read
    without them."""
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
    volume = read_dicom_series_display(next(iter(series.values())))
    if suv:
        volume.values = suv_values(volume, path)
    return volume


# --- 2D images -------------------------------------------------------------------------------------------------

def read_npy(path: str | Path) -> np.ndarray:
    """A ``.npy`` array (never unpickled), finite."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ReadError(path, f"not a readable .npy array ({type(err).__name__}: {err})") from err
    if array.dtype.kind not in "buif":
        raise ReadError(path, f"expected a numeric array, found dtype {array.dtype}")
    return _finite(Path(path), array)


def is_array_picture(array: np.ndarray) -> bool:
    """Whether an array is an image: [H, W], or [H, W, 3 or 4] (RGB, RGBA)."""
    return array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))


def array_picture(array: np.ndarray) -> Picture:
    """An image array (:func:`is_array_picture`) as a :class:`Picture`, alpha dropped: integers over the full scale of
    their type (255 for 8 bit), floats over 1.0 when already in [0, 1], else over 255 (8-bit values stored as
    floats)."""
    array = array[..., :3] if array.ndim == 3 else array
    if array.dtype.kind in "ui":
        return Picture(array, float(np.iinfo(array.dtype).max if array.dtype.itemsize > 1 else 255))
    return Picture(array, 255.0 if array.max() > 1.0 else 1.0)


def read_picture(path: str | Path) -> Picture:
    """PNG / JPEG / BMP / TIFF in 8 or 16 bit, grey, RGB, RGBA (alpha dropped), palette (expanded to RGB),
    1-bit; float TIFFs keep their values (full scale 1.0); a ``.npy`` image array by :func:`array_picture`."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        array = read_npy(path)
        if not is_array_picture(array):
            raise ReadError(path, f"expected an image array [H, W] or [H, W, 3], found shape {array.shape} (give a "
                                  "volume as NIfTI or DICOM, which carry its geometry)")
        return array_picture(array)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            pixels = tifffile.imread(path)
        else:
            with Image.open(path) as image:
                image.load()
                pixels = _pil_pixels(image)
    except Exception as err:
        raise ReadError(path, f"not a readable image ({type(err).__name__}: {err})") from err
    if pixels.ndim == 3 and pixels.shape[2] in (2, 4):  # grey+alpha, RGBA: drop the alpha channel
        pixels = pixels[..., :-1] if pixels.shape[2] == 4 else pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3) or min(pixels.shape[:2]) < 1:
        raise ReadError(path, f"expected a grey or RGB image, found an array of shape {pixels.shape}")
    if pixels.dtype.kind == "f":
        return Picture(_finite(path, pixels.astype(np.float32)), 1.0)
    bits = 8 if pixels.dtype.itemsize == 1 else 16
    if pixels.dtype.itemsize > 2 and pixels.max() > 65535:
        raise ReadError(path, f"pixel values up to {pixels.max()} do not fit 16 bits")
    return Picture(pixels.astype(np.uint8 if bits == 8 else np.uint16), float((1 << bits) - 1))


def _pil_pixels(image: Image.Image) -> np.ndarray:
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode == "CMYK":
        image = image.convert("RGB")
    return np.asarray(image)


def read_mask_pixels(path: str | Path) -> np.ndarray:
    """A mask file's stored values: [H, W] for grey and palette images (palette indices, not colours), [H, W, 3]
    for colour ones (alpha dropped); RGB masks with grey values (R = G = B) come back as grey."""
    try:
        with Image.open(path) as image:
            image.load()
            pixels = np.asarray(image.convert("L") if image.mode == "1" else image)
    except Exception as err:
        raise ReadError(path, f"not a readable mask ({type(err).__name__}: {err})") from err
    if pixels.ndim == 3:
        pixels = pixels[..., 0] if pixels.shape[2] == 2 else pixels[..., :3]  # grey + alpha, RGBA
    if pixels.ndim == 3 and (pixels[..., :1] == pixels).all():
        pixels = pixels[..., 0]
    return pixels


def read_label_map(path: str | Path) -> np.ndarray:
    """A segmentation mask: [H, W] integer label values. Palette images keep their indices (not colours);
    RGB masks with grey values (R = G = B) are taken as grey."""
    path = Path(path)
    pixels = read_mask_pixels(path)
    if pixels.ndim == 3:
        raise ReadError(path, "an RGB mask must be grey (R = G = B) or be stored with a palette")
    return pixels.astype(np.int64)


# --- video -----------------------------------------------------------------------------------------------------

def read_video_frames(path: str | Path, stride: int = 30) -> Iterator[tuple[int, np.ndarray]]:
    """Every ``stride``-th frame (0, stride, 2*stride, ...) as (index, [H, W, 3] uint8 RGB)."""
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index % stride == 0:
                    yield index, frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, IndexError) as err:
        raise ReadError(path, f"not a readable video ({type(err).__name__}: {err})") from err
