"""Readers for the formats medical image collections come in, built on pydicom, Pillow, tifffile and PyAV: DICOM
datasets and their pictures, PNG / JPEG / BMP / GIF / TIFF, NPY arrays, masks and video frames.

Volumes (NIfTI, DICOM series and multi-frame objects) are read by :mod:`dex.data.volumes`, on the DICOM helpers of
this module. Every failure is a :class:`ReadError` naming the file and the reason.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import av
import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom.pixels import apply_color_lut


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
class Picture:
    pixels: np.ndarray  # [H, W] or [H, W, 3], the stored integer (or float) values
    max_value: float  # the full-scale value of the stored type: 255 for 8 bit, 65535 for 16 bit, 1.0 for float


def finite(path: Path, values: np.ndarray) -> np.ndarray:
    """``values``, or a ReadError naming ``path`` when any is NaN or infinite."""
    if not np.isfinite(values).all():
        raise ReadError(path, "contains NaN or infinite values")
    return values


# --- DICOM -----------------------------------------------------------------------------------------------------

def read_dataset(path: Path) -> pydicom.Dataset:
    """A whole DICOM file (pixels included), or a ReadError that says why it is not one."""
    try:
        return pydicom.dcmread(path)
    except Exception as err:  # pydicom raises many kinds for truncated or foreign bytes
        raise ReadError(path, f"not a readable DICOM file ({type(err).__name__}: {err})") from err


def dicom_pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """The stored values of a grey dataset: [rows, columns], or [frames, rows, columns] for a multi-frame one."""
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


def read_dicom_pictures(path: str | Path, stride: int = 30) -> tuple[list[tuple[int, Picture]], dict[str, Any]]:
    """A 2D DICOM image (radiograph, ultrasound, secondary capture): grey or RGB, MONOCHROME1 inverted so that
    bright means dense, full scale ``2**BitsStored - 1``; a multi-frame object gives every ``stride``-th frame.

    Returns [(frame index, :class:`Picture`)] (frame index -1 for a single frame) and the non-identifying meta.
    """
    path = Path(path)
    ds = read_dataset(path)
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
    return out, dicom_meta(ds)


def dicom_meta(ds: pydicom.Dataset) -> dict[str, Any]:
    """The non-identifying facts downstream code needs, plus the study UID (for a salted hash, never stored raw)."""
    return {
        "modality": str(ds.get("Modality", "")),
        "units": str(ds.get("Units", "HU" if ds.get("Modality") == "CT" else "")),
        "suv_factor": suv_factor(ds),
        "burned_in_annotation": str(ds.get("BurnedInAnnotation", "")).upper() == "YES",
        "study_uid": str(ds.get("StudyInstanceUID", "")),
    }


# --- 2D images -------------------------------------------------------------------------------------------------

def read_npy(path: str | Path) -> np.ndarray:
    """A ``.npy`` array (never unpickled), finite."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ReadError(path, f"not a readable .npy array ({type(err).__name__}: {err})") from err
    if array.dtype.kind not in "buif":
        raise ReadError(path, f"expected a numeric array, found dtype {array.dtype}")
    return finite(Path(path), array)


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
    """PNG / JPEG / BMP / GIF / TIFF (any compression, see :func:`_stored_pixels`) in 8 or 16 bit, grey, RGB, RGBA
    (alpha dropped), palette (expanded to RGB), 1-bit (0 / 255); float TIFFs keep their values (full scale 1.0); a
    ``.npy`` image array by :func:`array_picture`."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        array = read_npy(path)
        if not is_array_picture(array):
            raise ReadError(path, f"expected an image array [H, W] or [H, W, 3], found shape {array.shape} (give a "
                                  "volume as NIfTI or DICOM, which carry its geometry)")
        return array_picture(array)
    try:
        pixels = _stored_pixels(path, palette_indices=False)
    except Exception as err:
        raise ReadError(path, f"not a readable image ({type(err).__name__}: {err})") from err
    if pixels.ndim == 3 and pixels.shape[2] in (2, 4):  # grey+alpha, RGBA: drop the alpha channel
        pixels = pixels[..., :-1] if pixels.shape[2] == 4 else pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3) or min(pixels.shape[:2]) < 1:
        raise ReadError(path, f"expected a grey or RGB image, found an array of shape {pixels.shape}")
    if pixels.dtype.kind == "f":
        return Picture(finite(path, pixels.astype(np.float32)), 1.0)
    bits = 8 if pixels.dtype.itemsize == 1 else 16
    if pixels.dtype.itemsize > 2 and pixels.max() > 65535:
        raise ReadError(path, f"pixel values up to {pixels.max()} do not fit 16 bits")
    return Picture(pixels.astype(np.uint8 if bits == 8 else np.uint16), float((1 << bits) - 1))


def _stored_pixels(path: Path, palette_indices: bool) -> np.ndarray:
    """The pixel array of an image file, for :func:`read_picture` and :func:`read_mask_pixels`.

    TIFFs are read by tifffile, which keeps every bit depth and sample format (16-bit colour, float), except palette
    TIFFs and those tifffile cannot decode: LZW, JPEG and CCITT compression (among others) need the optional
    imagecodecs package, so Pillow reads them, unless Pillow would keep fewer bits than the file stores (16-bit
    colour), which is an error. Other formats are read by Pillow. 1-bit images come back as 0 / 255, palette images
    as their indices (``palette_indices``) or colours (RGB, or RGBA with transparency), CMYK as RGB.
    """
    tiff_error = None
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            with tifffile.TiffFile(path) as tiff:
                if tiff.pages.first.photometric != tifffile.PHOTOMETRIC.PALETTE:
                    pixels = tiff.asarray()
                    return pixels.astype(np.uint8) * 255 if pixels.dtype == bool else pixels
        except ValueError as err:  # a codec tifffile lacks (or not a TIFF it can parse): Pillow may read it
            tiff_error = err
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "P" and not palette_indices:
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif image.mode in ("1", "CMYK"):
                image = image.convert("L" if image.mode == "1" else "RGB")
            pixels = np.asarray(image)
            stored = int(np.max(getattr(image, "tag_v2", {}).get(258, 0)))  # a TIFF's BitsPerSample
    except Exception as err:
        if tiff_error is None:
            raise
        raise ValueError(f"tifffile: {tiff_error}; Pillow: {err}") from err
    if stored > 8 * pixels.dtype.itemsize:
        raise ValueError(f"Pillow would read its {stored}-bit samples as {8 * pixels.dtype.itemsize}-bit, and "
                         f"tifffile cannot decode it ({tiff_error})")
    return pixels


def read_mask_pixels(path: str | Path) -> np.ndarray:
    """A mask file's stored values (any format of :func:`read_picture`): [H, W] for grey and palette images (palette
    indices, not colours), [H, W, 3] for colour ones (alpha dropped); RGB masks with grey values (R = G = B) come back
    as grey."""
    try:
        pixels = _stored_pixels(Path(path), palette_indices=True)
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
