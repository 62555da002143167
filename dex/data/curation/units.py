"""Units of curation work: finding them in a recipe's sources, and turning one into samples (read, normalise, cut into
slices, filter, encode).

One *unit* is one source-relative path: a file, or for DICOM a folder (each series in it is read as one volume, or
each file as one picture). Volumes, DICOM or NIfTI, are read and cut by :mod:`dex.data.volumes`, so a source's
``slice_axis`` names true anatomical planes whatever the acquisition orientation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dex.config import ConfigError
from dex.data.curation.privacy import sample_key, study_hash, unit_id
from dex.data.dedup import phash
from dex.data.normalize import VOLUME_NORMALIZERS, scale_255
from dex.data.readers import (
    Problem,
    ReadError,
    array_picture,
    group_dicom_series,
    is_array_picture,
    read_dicom_pictures,
    read_npy,
    read_picture,
    read_video_frames,
)
from dex.data.recipe import MODALITIES, Recipe, Source, canonical_modality
from dex.data.tasks import load_task
from dex.data.volumes import SLICE_AXES, Volume, cut, normalize_volume, read_dicom_volume, read_nifti, suv_values

#: Foreground (non-air) pixels of a slice, by normalisation, from (real values, normalised values); and the
#: smallest foreground ratio a slice must have (App. C.1.1: 0.05 for CT and MR, 0.01 for PET).
FOREGROUND = {
    "ct_hu": (lambda raw, norm: raw > -500.0, 0.05),  # the usual body threshold in HU
    "mr_percentile": (lambda raw, norm: norm > 0.1, 0.05),  # above the Rician noise floor of air
    "pet_raw": (lambda raw, norm: norm > 0.05, 0.01),
    "pet_suv": (lambda raw, norm: raw > 0.1, 0.01),  # SUV above a few counts of noise
}


@dataclass
class CurateOptions:
    min_size: int = 32  # images with a side under this many pixels are dropped as abnormally small
    dedup_distance: int = 2  # pHash bits within which two images of a source are near-duplicates
    shard_samples: int = 1000
    png_level: int = 3  # zlib level of the PNG encoder: 1 fast ... 9 small


@dataclass(frozen=True)
class Unit:
    source: str
    key: str  # source-relative path: a file, or a folder for DICOM
    modality: str
    anatomy: str
    files: tuple[str, ...] = ()  # DICOM: the folder's files (source-relative)
    report: str | None = None  # an image-report pair's report (an index CSV with a report column), else None
    report_type: str = ""  # the pair's report type (the index CSV's, else the modality)


@dataclass
class UnitResult:
    """What one unit gave. ``where`` texts say which image of a file it is ("slice 12", "frame 30", "" for a 2D
    image); they and the paths go to the private reports only."""

    unit: Unit
    unit_id: str  # the salted hash that names the unit in the collection
    samples: list[tuple[str, bytes, dict[str, Any], tuple[str, str]]] = field(default_factory=list)
    # ^ (key, png, meta, (source-relative path, where))
    dropped: list[tuple[str, str, str]] = field(default_factory=list)  # (path, where, reason)
    quarantined: list[Problem] = field(default_factory=list)  # (source-relative path, reason)
    warnings: list[str] = field(default_factory=list)


# --- discovery ---------------------------------------------------------------------------------------------------

def held_out_files(recipe: Recipe) -> set[Path]:
    """The resolved paths of the images of every task split the recipe holds out (``hold_out``)."""
    held = set()
    for entry in recipe.hold_out:
        try:
            task = load_task(recipe.resolve(entry.task), seed=entry.seed)
        except ValueError as err:
            raise ConfigError(f"{recipe.path}: hold_out task {entry.task!r}: {err}") from err
        held |= {task.images[i].resolve() for split in entry.splits for i in task.splits[split]}
    return held


def discover_units(recipe: Recipe, source: Source, held_out: set[Path] = frozenset()) -> list[Unit]:
    """The units of one source, sorted by key, without the files in ``held_out`` (resolved paths: the images of
    the recipe's held-out task splits). A missing root gives an empty list (reported by the caller)."""
    root = recipe.root_of(source)
    if root is None or not root.is_dir():
        return []
    if source.index_csv:
        units = _units_from_csv(root, source)
        return [u for u in units if (root / u.key).resolve() not in held_out]
    files = sorted(p for p in root.glob(source.pattern) if p.is_file() and p.resolve() not in held_out)
    if source.format == "dicom":
        by_folder: dict[str, list[str]] = defaultdict(list)
        for path in files:
            by_folder[path.parent.relative_to(root).as_posix()].append(path.relative_to(root).as_posix())
        return [Unit(source.name, folder, source.modality, source.anatomy, tuple(paths))
                for folder, paths in sorted(by_folder.items())]
    return [Unit(source.name, p.relative_to(root).as_posix(), source.modality, source.anatomy) for p in files]


def _units_from_csv(root: Path, source: Source) -> list[Unit]:
    path = root / source.index_csv
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as err:
        raise ValueError(f"{path}: cannot read the index CSV of source {source.name!r} ({err})") from err
    paired = bool(rows) and "report" in rows[0]
    units = []
    for line, row in enumerate(rows, start=2):
        modality = canonical_modality(row.get("modality") or source.modality)
        if not row.get("path") or modality not in MODALITIES:
            raise ValueError(f"{path}:{line}: needs a path and a modality in {list(MODALITIES)}, got {row}")
        report = (row.get("report") or "") if paired else None
        units.append(Unit(source.name, row["path"], modality, row.get("anatomy") or source.anatomy,
                          report=report, report_type=(row.get("report_type") or modality) if paired else ""))
    return sorted(units, key=lambda u: u.key)


def part_of(unit: Unit, parts: int) -> int:
    """The partition a unit belongs to: stable across runs and machines."""
    return zlib.crc32(f"{unit.source}/{unit.key}".encode()) % parts


# --- one unit ----------------------------------------------------------------------------------------------------

def _encode_png(image: np.ndarray, bits: int, level: int) -> bytes:
    top = (1 << bits) - 1
    array = np.round(np.clip(image, 0, 1) * top).astype(np.uint8 if bits == 8 else np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def _problem(image: np.ndarray, options: CurateOptions) -> str | None:
    if image.size == 0 or not image.any():
        return "empty"
    if min(image.shape[:2]) < options.min_size:
        return "small"
    if float(image.max()) - float(image.min()) < 1e-6:
        return "constant"
    return None


def _relative(path: str | Path, root: str | Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


class _UnitWork:
    """Collects the samples of one unit."""

    def __init__(self, unit: Unit, source: Source, root: Path, salt: str, options: CurateOptions) -> None:
        self.unit, self.source, self.root, self.salt, self.options = unit, source, root, salt, options
        self.result = UnitResult(unit, unit_id(salt, unit.source, unit.key))
        top = unit.key.split("/")[0] if "/" in unit.key else Path(unit.key).stem
        self.default_study = study_hash(salt, f"{unit.source}/{top}")  # a folder or file per patient

    def quarantine(self, problem: Problem) -> None:
        self.result.quarantined.append(Problem(_relative(problem.path, self.root), problem.reason))

    def add(self, image: np.ndarray, index: int, bits: int, series: str = "", study: str | None = None,
            origin: tuple[str, str] | None = None) -> None:
        origin = origin or (self.unit.key, "")
        problem = _problem(image, self.options)
        if problem:
            self.result.dropped.append((*origin, problem))
            return
        height, width = image.shape[:2]
        channels = image.shape[2] if image.ndim == 3 else 1
        if channels == 3:
            bits = 8  # PNG encoders take 16-bit grey but not 16-bit colour; colour images are 8-bit in practice
        key = sample_key(self.salt, self.unit.source, self.unit.key, series, index)
        meta = {
            "key": key, "source": self.unit.source, "modality": self.unit.modality, "anatomy": self.unit.anatomy,
            "unit": self.result.unit_id, "index": index, "phash": f"{phash(image):016x}",
            "study": study or self.default_study, "height": height, "width": width, "channels": channels,
            "bits": bits, **({"report_type": self.unit.report_type} if self.unit.report is not None else {}),
        }
        self.result.samples.append((key, _encode_png(image, bits, self.options.png_level), meta, origin))

    def add_volume(self, values: np.ndarray, series: str = "", study: str | None = None,
                   volume: Volume | None = None, label: str = "") -> None:
        """Slices of a [Z, Y, X] volume along the source's axis. Where ``volume`` (the one ``values`` came from) has a
        file for the slice (:meth:`dex.data.volumes.Volume.slice_file`: a DICOM series cut along its own slices), the
        private reports name that file, else ``label`` + the slice number."""
        normalization = self.source.normalization
        if normalization not in VOLUME_NORMALIZERS:
            raise ReadError(self.root / self.unit.key, f"a volume needs a volume normalisation, not {normalization!r}")
        normalised = normalize_volume(values, normalization)
        is_foreground, min_ratio = FOREGROUND[normalization]
        axis = self.source.slice_axis
        for index in range(values.shape[SLICE_AXES[axis]]):
            file = volume.slice_file(axis, index) if volume is not None else None
            origin = (_relative(file, self.root), "") if file else (self.unit.key, f"{label}{axis} slice {index}")
            raw, norm = cut(values, index, axis), cut(normalised, index, axis)
            if is_foreground(raw, norm).mean() < min_ratio:
                self.result.dropped.append((*origin, "foreground"))
                continue
            self.add(norm, index, 16, series, study, origin)

    def add_picture(self, pixels: np.ndarray, max_value: float, index: int = -1, series: str = "",
                    study: str | None = None, origin: tuple[str, str] | None = None) -> None:
        if self.source.normalization != "scale_255":
            raise ReadError(self.root / self.unit.key, f"a 2D image needs scale_255, not {self.source.normalization!r}")
        self.add(scale_255(pixels, max_value), index, 8 if max_value == 255 else 16, series, study, origin)


def process_unit(unit: Unit, source: Source, root: str, salt: str, options: CurateOptions) -> UnitResult:
    """Read, normalise, slice, filter and encode one unit. A file that cannot be read is quarantined: a unit that is
    one file is then written not at all; a DICOM folder loses only its bad files (and a series that cannot be
    assembled), never the good series next to them."""
    work = _UnitWork(unit, source, Path(root), salt, options)
    path = Path(root) / unit.key
    if unit.report is not None and not unit.report.strip():
        work.quarantine(Problem(unit.key, "empty report (an image-report pair needs its report)"))
        return work.result
    try:
        if source.format == "dicom":
            _process_dicom(work)
        elif source.format == "nifti":
            volumes = read_nifti(path)
            for t, volume in enumerate(volumes):
                work.add_volume(volume.values, series=str(t), label=f"time {t}, " if len(volumes) > 1 else "")
        elif source.format == "npy":
            _process_npy(work, path)
        elif source.format == "video":
            for index, frame in read_video_frames(path, source.frame_stride):
                work.add_picture(frame, 255.0, index, origin=(unit.key, f"frame {index}"))
        else:
            picture = read_picture(path)
            work.add_picture(picture.pixels, picture.max_value)
    except Exception as err:  # any failure on this unit's bytes: record it and go on with the other units
        problem = err.problem if isinstance(err, ReadError) else Problem(unit.key, f"{type(err).__name__}: {err}")
        work.quarantine(problem)
        work.result.samples.clear()  # a unit that fails as a whole is written not at all
        work.result.dropped.clear()
    return work.result


def _process_dicom(work: _UnitWork) -> None:
    """Each series of a DICOM folder: a volume (read with ``strict=False``: a bad slice costs only itself, and a
    series that cannot be placed in patient space is cut in its stored plane), or its files as pictures."""
    root, unit, source = work.root, work.unit, work.source
    unreadable: list[Problem] = []
    series_files = group_dicom_series([root / f for f in unit.files], unreadable)
    for series_uid, paths in sorted(series_files.items()):
        series = hashlib.sha1(series_uid.encode()).hexdigest()[:12]  # the UID itself is never stored
        try:
            if source.normalization in VOLUME_NORMALIZERS:
                volume = read_dicom_volume(sorted(paths), unreadable, strict=False)
                values = suv_values(volume, paths[0]) if source.normalization == "pet_suv" else volume.values
                _note_burned_in(work, volume.meta, paths[0])
                work.add_volume(values, series, study_hash(work.salt, volume.meta["study_uid"]), volume)
            else:
                for path in sorted(paths):
                    try:
                        frames, meta = read_dicom_pictures(path, source.frame_stride)
                    except ReadError as err:
                        unreadable.append(err.problem)
                        continue
                    _note_burned_in(work, meta, path)
                    name = _relative(path, root)
                    for index, picture in frames:
                        work.add_picture(picture.pixels, picture.max_value, index, f"{series}/{path.name}",
                                         study_hash(work.salt, meta["study_uid"]),
                                         (name, f"frame {index}" if index >= 0 else ""))
        except ReadError as err:  # the series as a whole (slices of several sizes, a wrong normalisation) ...
            if {str(path) for path in paths} - {problem.path for problem in unreadable}:  # ... not its bad files
                work.quarantine(err.problem)
    for problem in unreadable:
        work.quarantine(problem)


def _note_burned_in(work: _UnitWork, meta: dict[str, Any], path: Path) -> None:
    if meta["burned_in_annotation"]:
        work.result.warnings.append(
            f"{work.unit.source}: {_relative(path, work.root)}: BurnedInAnnotation is YES; the pixels may "
            "show identifying text, which curation does not remove")


def _process_npy(work: _UnitWork, path: Path) -> None:
    array = read_npy(path)
    if is_array_picture(array) and work.source.normalization == "scale_255":
        picture = array_picture(array)
        work.add_picture(picture.pixels, picture.max_value)
    elif array.ndim == 3:
        work.add_volume(array.astype(np.float32))
    else:
        raise ReadError(path, f"expected a 2D image or a 3D volume, found shape {array.shape}")
