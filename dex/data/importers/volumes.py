"""The ``volumes`` layout: image volumes (NIfTI or DICOM series) and NIfTI label volumes, cut into 2D slices."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dex.data.importers.masks import MaskMapping
from dex.data.importers.writer import Item, MakeItems, TaskWriter, _clean, _read_split_file
from dex.data.normalize import VOLUME_NORMALIZERS
from dex.data.readers import Problem, ReadError
from dex.data.tasks import split_of
from dex.data.volumes import SLICE_AXES, cut, normalize_volume, read_label_volume, read_volume, volume_slice


def _case_name(path: Path) -> str:
    name = path.name
    if path.is_dir():
        return name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def import_volumes(images: str | Path, labels: str | Path, writer: TaskWriter, mapping: MaskMapping,
                   normalization: str, axis: str = "axial", slices: str = "foreground", stride: int = 1,
                   channel: int = 0, splits_file: str | Path | None = None, seed: int = 0) -> None:
    """Image volumes and their NIfTI label volumes (same name, or the nnU-Net ``CASE_0000`` for ``CASE``) as 2D
    slices. An image volume is a NIfTI file or a folder holding one DICOM series (placed in patient space from its
    geometry, so labels drawn on it in any viewer line up; :func:`dex.data.volumes.read_volume`); a label volume must
    be in the image's space (same affine within 0.01 mm) or the case is a problem. ``axis`` names an anatomical plane
    whatever the acquisition: both are cut in the display layout of :mod:`dex.data.volumes`.

    The image is normalised as a volume (Table 2: ``ct_hu``, ``mr_percentile``, ``pet_suv``, ``pet_raw``) and
    stored as 16-bit PNG (the [0, 1] values times 65535), the label slice as a PNG of class indices. ``slices``:
    ``foreground`` keeps the slices with a labelled pixel, ``all`` every slice; then every ``stride``-th. Cases
    are split 60 / 20 / 20 (seeded) unless ``splits_file`` names their split.
    """
    if normalization not in VOLUME_NORMALIZERS:
        raise ValueError(f"normalisation {normalization!r}: one of {sorted(VOLUME_NORMALIZERS)}")
    if axis not in SLICE_AXES or slices not in ("foreground", "all") or stride < 1:
        raise ValueError(f"axis one of {list(SLICE_AXES)}, slices foreground or all, stride >= 1; got {axis!r}, "
                         f"{slices!r}, {stride}")
    images, labels = Path(images), Path(labels)
    volumes = sorted(p for p in images.iterdir() if not p.name.startswith(".")
                     and (p.name.endswith((".nii", ".nii.gz")) or p.is_dir()))
    label_files = {_case_name(p): p for p in labels.iterdir() if p.name.endswith((".nii", ".nii.gz"))}
    if not volumes:
        raise ValueError(f"{images}: no NIfTI volumes (.nii, .nii.gz) or DICOM series folders")
    cases, file_channel = {}, {}  # image file -> case; nnU-Net: CASE_0001 is channel 1 of CASE
    for path in volumes:
        name = _case_name(path)
        match = re.fullmatch(r"(.+)_(\d{4})", name)
        if name not in label_files and match and match.group(1) in label_files:
            name, file_channel[path] = match.group(1), int(match.group(2))
        cases[path] = name
    volumes = [p for p in volumes if file_channel.get(p, channel) == channel]
    official = _read_split_file(splits_file)
    order = sorted(set(cases.values()))
    drawn = {order[i]: split_of(n, len(order))
             for n, i in enumerate(np.random.default_rng(seed).permutation(len(order)))}
    dim = SLICE_AXES[axis]

    def unit(path: Path) -> MakeItems:
        def make(problems: list[Problem]) -> list[Item]:
            case = cases[path]
            if case not in label_files:
                raise ReadError(path, f"no label volume {case}.nii.gz in {labels}")
            volume = read_volume(path, 0 if path in file_channel else channel, normalization == "pet_suv", problems)
            raw = read_label_volume(label_files[case], volume, path.name)
            classes = mapping(label_files[case], raw, volume=True)
            normalised = normalize_volume(volume.values, normalization)
            keep = [i for i in range(raw.shape[dim]) if slices == "all" or cut(classes, i, axis).any()][::stride]
            return [Item(f"{_clean(case)}_{i:04d}",
                         volume_slice(normalised, i, axis),
                         mask=cut(classes, i, axis), split=official.get(case, drawn[case]), case=_clean(case),
                         slice=i) for i in keep]
        return make

    writer.run((str(path), unit(path)) for path in volumes)

