"""Writers in the formats real datasets use, byte-for-byte deterministic for the same inputs.

DICOM series (pydicom), NIfTI (nibabel), PNG 8/16 bit and JPEG (Pillow), TIFF (tifffile), MP4 video (PyAV), and
the index CSV that pairs images with their reports.
"""

from __future__ import annotations

import csv
import datetime
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import av
import nibabel as nib
import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
UID_ROOT = "1.2.826.0.1.3680043.10.1475."  # a root under which generate_uid's hashes are namespaced
REPORT_INDEX_COLUMNS = ("path", "modality", "anatomy", "report", "report_type")


def write_png(path: Path, image: np.ndarray) -> None:
    """uint8 or uint16, grey [H, W] or RGB [H, W, 3]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.dtype == np.uint16:
        Image.fromarray(image, mode=None).save(path, format="PNG")
    else:
        Image.fromarray(image.astype(np.uint8)).save(path, format="PNG")


def write_jpeg(path: Path, image: np.ndarray, quality: int = 92) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.astype(np.uint8)).save(path, format="JPEG", quality=quality)


def write_tiff(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, image, photometric="rgb" if image.ndim == 3 else "minisblack", metadata=None)


def write_report_index(path: Path, rows: Iterable[tuple[str, str]], modality: str, anatomy: str) -> None:
    """An image source's index CSV (REPORT_INDEX_COLUMNS): one row per (path relative to the CSV's folder, report),
    sorted by path, with the source's modality and anatomy; the report type is the modality."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(REPORT_INDEX_COLUMNS)
        writer.writerows((name, modality, anatomy, report, modality) for name, report in sorted(rows))


def write_nifti(path: Path, volume: np.ndarray, spacing: tuple[float, float, float], flip_x: bool = False) -> None:
    """Write ``volume`` [Z, Y, X] (the display layout: Z superior to inferior, Y anterior to posterior, X patient
    right to left) as NIfTI with a RAS+ affine that says so.

    With ``flip_x`` the first stored axis runs the other way (LAS) and the affine says that instead, so a reader
    has to apply the orientation to get the same anatomy back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(volume[::-1, ::-1, ::-1].transpose(2, 1, 0))  # (i: to Right, j: to Anterior, k: up)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    if flip_x:
        data = np.ascontiguousarray(data[::-1])
        affine[0, 0] = -spacing[2]
        affine[0, 3] = spacing[2] * (data.shape[0] - 1)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def _uid(*parts: Any) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts])


def write_dicom_series(
    folder: Path,
    stored: np.ndarray,
    *,
    modality: str,
    slope: float,
    intercept: float,
    spacing: tuple[float, float, float],
    case: str,
    seed: int,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write [Z, Y, X] stored values (uint16 or int16) as one DICOM file per slice.

    The real value of a pixel is ``stored * slope + intercept``. Slice z is at ``ImagePositionPatient`` z =
    -z * spacing[0] (superior first) and InstanceNumber counts from the bottom, so file order, instance
    order and position disagree, as they do in real exports. Identifying attributes hold fake values, for
    the curation's de-identification to remove.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = _uid(seed, case, "study"), _uid(seed, case, "series"), _uid(seed, case, "frame")
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else PET_IMAGE_STORAGE
    depth, rows, cols = stored.shape
    paths = []
    for z in range(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = _uid(seed, case, "slice", z)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID_ROOT + "1"
        path = folder / f"IM{z:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = modality
        ds.PatientName = f"PHANTOM^{case.upper()}"
        ds.PatientID = f"PID-{seed}-{case}"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.InstitutionName = "Phantom General Hospital"
        ds.ReferringPhysicianName = "DOCTOR^REFERRING"
        ds.AccessionNumber = f"ACC{seed}{case[-4:]}"
        ds.StudyID = "1"
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240102"
        ds.StudyTime = ds.SeriesTime = "110000"
        ds.BurnedInAnnotation = "NO"
        ds.SeriesNumber = 1
        ds.InstanceNumber = depth - z  # counts from the bottom
        ds.ImagePositionPatient = [0.0, 0.0, float(-z * spacing[0])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        ds.RescaleSlope = f"{slope:.6g}"
        ds.RescaleIntercept = f"{intercept:.6g}"
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(stored[z]).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def pet_dicom_attributes(weight_kg: float, dose_bq: float, minutes_after_injection: float) -> dict[str, Any]:
    """PET attributes from which SUV (body weight) can be computed: units, weight, injected dose, times."""
    info = pydicom.Dataset()
    info.RadionuclideTotalDose = f"{dose_bq:.6g}"
    info.RadionuclideHalfLife = "6586.2"  # F-18, seconds
    start = datetime.datetime(2024, 1, 2, 11, 0, 0) - datetime.timedelta(minutes=minutes_after_injection)
    info.RadiopharmaceuticalStartTime = start.strftime("%H%M%S")
    return {
        "Units": "BQML",
        "DecayCorrection": "START",
        "CorrectedImage": ["ATTN", "DECY"],
        "PatientWeight": f"{weight_kg:.4g}",
        "AcquisitionTime": "110000",
        "RadiopharmaceuticalInformationSequence": pydicom.Sequence([info]),
    }


def write_video(path: Path, frames: np.ndarray, fps: int = 30) -> None:
    """[T, H, W] or [T, H, W, 3] uint8 frames as H.264 MP4 (single-threaded, bit-exact muxing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=3)
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"threads": "1", "crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
