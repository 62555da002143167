"""The inputs of ``dex predict`` and ``dex embed``: images, DICOM objects and series, and NIfTI volumes, found in the
paths given and read as a model's :class:`~dex.data.preprocess.Preprocessing` records.

An input is a file or a folder (searched recursively, in sorted order). Files are taken by kind:

- images: PNG, JPEG, BMP, TIFF, and NPY holding a 2D array: one picture each;
- NIfTI volumes (``.nii``, ``.nii.gz``), in any orientation: read into the display layout of
  :mod:`dex.data.volumes` (:func:`~dex.data.volumes.read_nifti`);
- DICOM files (``.dcm``, or any file with the DICOM preamble), grouped by SeriesInstanceUID from their headers, never
  by file name: a CT, MR or PET series of two or more single-frame files, and a CT, MR or PET multi-frame object with
  per-frame functional groups (enhanced CT / MR / PET), is a volume, placed in patient space by its geometry and
  brought to the same display layout (:func:`dex.data.volumes.read_dicom_volume`; uneven gaps, a missing slice, are
  refused); any other DICOM object (a radiograph, an ultrasound still or cine, one CT slice, a multi-frame object
  without functional groups) gives its frames as pictures, as stored. A DICOM object of another modality than the
  model's is refused.

A folder's files of other kinds are passed over; a file given by name that is none of these is refused.

A volume (and a CT, MR or PET DICOM object) is normalised whole by the Table 2 rule (the preprocessing's
``volume_normalization``, else the rule of its modality, :data:`dex.data.normalize.MODALITY_VOLUME_NORMALIZATION`:
the DICOM Modality, or the model's) and cut along ``slice_axis`` (an anatomical plane, whatever the acquisition) into
16-bit slices: :func:`normalize_volume` and :func:`volume_slice`, as ``dex data import-task volumes`` made the slices
a model was trained on, and as curation cut the pretraining images.

Every case is named for its outputs by its path below the input folder (a file given by name: its name), without the
suffix; a DICOM series by its folder; cases that would share a name are told apart by their kind (``case_0000_nii``,
``case_0000_dicom``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import torch
from torch import Tensor

from dex.data.preprocess import Preprocessing
from dex.data.readers import Picture, Problem, ReadError, group_dicom_series, read_dicom_pictures, read_picture
from dex.data.stream import IMAGE_SUFFIXES
from dex.data.volumes import (
    MODALITY_VOLUME_NORMALIZATION,
    SLICE_AXES,
    Volume,
    normalize_volume,
    read_dicom_volume,
    read_nifti,
    suv_values,
    volume_slice,
)

PICTURE_SUFFIXES = (*IMAGE_SUFFIXES, ".npy")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: DICOM Modality codes and the modality (:data:`dex.data.recipe.MODALITIES`) each stands for.
DICOM_MODALITIES = {"CT": "CT", "MR": "MR", "PT": "PET", "CR": "X-ray", "DX": "X-ray", "US": "US", "OP": "Fundus",
                    "OPT": "OCT", "SM": "Pathology", "ES": "Endoscopy", "XC": "Photo"}
VOLUME_MODALITIES = ("CT", "MR", "PET")


@dataclass
class Case:
    """One input, read: an image (``volume`` None; one picture, or the frames of a DICOM object) or a volume.

    ``pictures``: (slice or frame index, -1 for a plain image; the picture), in order; for a volume, its slices
    along the preprocessing's ``slice_axis`` as 16-bit pictures of the normalised volume. ``volume``: the volume in
    the display layout with its geometry (``meta["affine"]``, ``meta["source_affine"]``, ``meta["source_shape"]``).
    ``dicom_files``: the DICOM files it came from (a series: the file of each slice of its source grid; none for a
    multi-frame volume, whose frames a DICOM Segmentation would have to follow in their stored order).
    """

    source: str
    name: Path
    pictures: list[tuple[int, Picture]]
    volume: Volume | None = None
    axis: str = "axial"
    dicom_files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class _Entry:
    kind: Literal["picture", "nifti", "dicom", "series"]
    paths: tuple[Path, ...]
    name: Path
    source: str


def _strip_suffix(path: Path) -> Path:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path.with_suffix("")


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in PICTURE_SUFFIXES:
        return "picture"
    return "dicom" if _is_dicom(path) else None


def find_inputs(inputs: Sequence[str | Path], errors: list[Problem]) -> list[_Entry]:
    """The cases of ``inputs`` (see the module's docstring), not yet read, with unique names; unreadable DICOM
    headers and files given by name of no known kind go to ``errors``. A path that does not exist is a
    FileNotFoundError naming it."""
    entries: list[_Entry] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif item.is_file():
            files = [item]
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
        base = item if item.is_dir() else None
        dicoms = []
        for path in files:
            kind = _kind(path)
            if kind == "dicom":
                dicoms.append(path)
            elif kind:
                name = _strip_suffix(path.relative_to(base) if base else Path(path.name))
                entries.append(_Entry(kind, (path,), name, str(path)))
            elif base is None:
                errors.append(Problem(str(path), "not an image (PNG, JPEG, BMP, TIFF, NPY), NIfTI or DICOM file"))
        entries += _dicom_entries(dicoms, base, errors)
    return _unique_names(entries)


def _dicom_entries(files: list[Path], base: Path | None, errors: list[Problem]) -> list[_Entry]:
    entries = []
    for paths in sorted(group_dicom_series(files, errors).values()):
        paths = sorted(paths)
        header = pydicom.dcmread(paths[0], stop_before_pixels=True)
        modality = DICOM_MODALITIES.get(str(header.get("Modality", "")))
        frames = int(header.get("NumberOfFrames", 1) or 1)
        if modality in VOLUME_MODALITIES and len(paths) > 1 and frames == 1:
            folder = Path(os.path.commonpath(paths))
            folder = folder if folder.is_dir() else folder.parent
            name = folder.relative_to(base) if base and folder != base else Path(folder.name)
            entries.append(_Entry("series", tuple(paths), name, str(folder)))
        else:
            placed = modality in VOLUME_MODALITIES and frames > 1 and "PerFrameFunctionalGroupsSequence" in header
            entries += [_Entry("series" if placed else "dicom", (p,),
                               _strip_suffix(p.relative_to(base) if base else Path(p.name)), str(p)) for p in paths]
    return entries


def _unique_names(entries: list[_Entry]) -> list[_Entry]:
    """Cases of one name (``case_0000.nii.gz`` and a DICOM series folder ``case_0000``; ``a.png`` and ``a.nii.gz``)
    are told apart by what they are: ``case_0000_nii`` and ``case_0000_dicom``, ``a_png`` and ``a_nii``; cases alike
    in that too (two series in one folder) get ``_2``, ``_3``, ... after it."""
    names = Counter(entry.name for entry in entries)
    tagged = [entry if names[entry.name] == 1 else _Entry(entry.kind, entry.paths, entry.name.with_name(
        f"{entry.name.name}_{_kind_tag(entry)}"), entry.source) for entry in entries]
    seen: dict[Path, int] = {}
    out = []
    for entry in tagged:
        count = seen[entry.name] = seen.get(entry.name, 0) + 1
        out.append(entry if count == 1 else _Entry(entry.kind, entry.paths, entry.name.with_name(
            f"{entry.name.name}_{count}"), entry.source))
    return out


def _kind_tag(entry: _Entry) -> str:
    """``nii``, ``dicom`` (a series or object), or an image's suffix (``png``, ``jpg``, ``npy``, ...)."""
    if entry.kind == "nifti":
        return "nii"
    if entry.kind in ("series", "dicom"):
        return "dicom"
    return entry.paths[0].suffix.lower().lstrip(".")


def _check_modality(path: str | Path, code: str, preprocessing: Preprocessing) -> str:
    """The modality of DICOM Modality ``code``; a ReadError when both it and the model's are known and differ."""
    modality = DICOM_MODALITIES.get(code, "")
    if modality and preprocessing.modality and modality != preprocessing.modality:
        raise ReadError(path, f"DICOM modality {code} ({modality}) is not the model's ({preprocessing.modality})")
    return modality


def _volume_rule(path: str | Path, preprocessing: Preprocessing, modality: str = "") -> str:
    rule = preprocessing.volume_normalization or MODALITY_VOLUME_NORMALIZATION.get(
        modality or preprocessing.modality, "")
    if not rule:
        raise ReadError(path, "no volume normalisation: the model records none and the volume's modality is not "
                              "CT, MR or PET (give --volume-normalization)")
    return rule


def _slices(values: np.ndarray, rule: str, preprocessing: Preprocessing, axis: str) -> list[tuple[int, Picture]]:
    normalised = normalize_volume(values, rule, preprocessing.ct_window)
    return [(i, Picture(volume_slice(normalised, i, axis), 65535.0)) for i in range(values.shape[SLICE_AXES[axis]])]


def reading(preprocessing: Preprocessing, volume_normalization: str | None = None,
            slice_axis: str | None = None) -> Preprocessing:
    """A model's preprocessing with the volume rule and slice axis given on the command line, where given."""
    changes = {k: v for k, v in (("volume_normalization", volume_normalization), ("slice_axis", slice_axis)) if v}
    return Preprocessing.from_dict({**preprocessing.to_dict(), **changes})


def read_case(entry: _Entry, preprocessing: Preprocessing) -> Case:
    """Read one case; a file that cannot be read, or a DICOM object of another modality, raises ReadError."""
    path, axis = entry.paths[0], preprocessing.slice_axis
    if entry.kind == "picture":
        return Case(entry.source, entry.name, [(-1, read_picture(path))])
    if entry.kind == "nifti":
        frames = read_nifti(path)
        if len(frames) != 1:
            raise ReadError(path, f"a 4D NIfTI of {len(frames)} frames: give each as a 3D volume")
        volume = frames[0]
        return Case(entry.source, entry.name, _slices(volume.values, _volume_rule(path, preprocessing),
                                                      preprocessing, axis), volume, axis)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    modality = _check_modality(entry.source, str(header.get("Modality", "")), preprocessing)
    if entry.kind == "series":
        volume = read_dicom_volume(entry.paths)
        rule = _volume_rule(entry.source, preprocessing, modality)
        if rule == "pet_suv":
            volume.values = suv_values(volume, entry.source)
        return Case(entry.source, entry.name, _slices(volume.values, rule, preprocessing, axis), volume, axis,
                    volume.slice_files)
    if modality in VOLUME_MODALITIES:  # one CT / MR / PET object: its frames, normalised as a volume in real units
        volume = read_dicom_volume([path], strict=False)  # one slice, or frames without geometry: as stored
        rule = _volume_rule(path, preprocessing, modality)
        values = suv_values(volume, path) if rule == "pet_suv" else volume.values
        frames = _slices(values, rule, preprocessing, "axial")
    else:
        frames, _ = read_dicom_pictures(path, stride=1)
    if len(frames) == 1:
        frames = [(-1, frames[0][1])]
    return Case(entry.source, entry.name, frames, dicom_files=(path,))


def read_cases(entries: Iterable[_Entry], preprocessing: Preprocessing, errors: list[Problem]) -> Iterator[Case]:
    """The cases of ``entries``, read one at a time; one that cannot be read goes to ``errors`` and the others
    carry on."""
    for entry in entries:
        try:
            yield read_case(entry, preprocessing)
        except ReadError as err:
            errors.append(Problem(entry.source, err.reason))


def run_batched(cases: Iterable[Case], to_input: Callable[[Picture], Tensor],
                compute: Callable[[Tensor], Sequence[Any]], batch_size: int,
                finish: Callable[[Case, list[Any]], None], device: str | torch.device = "cpu") -> None:
    """Every picture of every case as a model input (``to_input``), in batches of ``batch_size`` across cases, through
    ``compute`` ([B, ...] -> B results); ``finish(case, results)`` is called once a case has all of its results, in
    the cases' order."""
    batch: list[Tensor] = []
    owners: list[Case] = []  # the case of each batch item
    pending: list[tuple[Case, list[Any]]] = []  # cases not yet finished, in order, with their results so far

    def flush() -> None:
        results = list(compute(torch.stack(batch).to(device))) if batch else []
        for case, result in zip(owners, results):
            next(r for c, r in pending if c is case).append(result)
        batch.clear()
        owners.clear()
        while pending and len(pending[0][1]) == len(pending[0][0].pictures):
            finish(*pending.pop(0))

    for case in cases:
        pending.append((case, []))
        for _, picture in case.pictures:
            batch.append(to_input(picture))
            owners.append(case)
            if len(batch) == batch_size:
                flush()
        if not case.pictures:
            flush()
    flush()
