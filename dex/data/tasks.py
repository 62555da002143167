"""Downstream task folders: writing them, and loading them with checks that fail fast and name the file.

The layout is the one of the real tasks under ``shared/data``: ``images/<id>.<ext>``, ``masks/<id>.png``
(segmentation, one label value per pixel), ``labels.csv`` with ``id,label`` (classification, class names),
``splits.csv`` with ``id,split`` (train / val / test), a ``README.md``, and ``task.yaml`` describing the task.
Optional: ``cases.csv`` (``id,case,slice``: the volume an image was cut from), and ``roi/<id>.<ext>``, a region of
interest per image (nonzero inside, e.g. a fundus photograph's field of view; :func:`roi_mask`): a task with a
``roi/`` folder needs one for every image.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from dex.config import STRICT, read_yaml, validate
from dex.data.normalize import SLICE_AXES, VOLUME_NORMALIZERS
from dex.data.recipe import canonical_modality

TASK_TYPES = ("segmentation", "classification")
CLASSIFICATION_METRICS = ["f1_macro", "accuracy", "balanced_accuracy", "auroc"]
SPLITS = ("train", "val", "test")


@STRICT
@dataclass
class TaskSpec:
    """``task.yaml``: what a task folder holds."""

    name: str
    type: Literal[TASK_TYPES]
    modality: str
    classes: list[str]  # segmentation: index = mask value; classification: the label names
    image_size: list[int]  # [H, W] of the stored images
    channels: int  # 1 (grey) or 3 (RGB)
    bit_depth: int = 8
    description: str = ""
    source: str = ""
    licence: str = ""
    metrics: list[str] = field(default_factory=list)
    mask_threshold: int | None = None  # binary masks stored as 0 / 255 (or lossy JPEG): foreground above this
    # images cut from volumes: the Table 2 rule they were normalised by and the slice axis (a model fine-tuned on
    # the task records both, so that dex predict cuts a new volume into slices the same way)
    volume_normalization: Literal[tuple(VOLUME_NORMALIZERS)] | None = None
    slice_axis: Literal[tuple(SLICE_AXES)] | None = None

    def __post_init__(self) -> None:
        self.modality = canonical_modality(self.modality)

    def save(self, folder: Path) -> None:
        (folder / "task.yaml").write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


def split_of(index: int, count: int) -> str:
    """Deterministic 60 / 20 / 20 split by position."""
    fraction = index / count
    return "train" if fraction < 0.6 else "val" if fraction < 0.8 else "test"


def write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def finish_task(folder: Path, spec: TaskSpec, ids: list[str], labels: dict[str, str] | None = None,
                splits: dict[str, str] | None = None) -> None:
    """Write task.yaml, splits.csv, labels.csv (classification) and README.md for images already in ``folder``.
    ``splits`` maps each id to its split; without it the ids are split 60 / 20 / 20 by position."""
    spec.save(folder)
    splits = splits or {i: split_of(n, len(ids)) for n, i in enumerate(ids)}
    write_csv(folder / "splits.csv", ("id", "split"), [(i, splits[i]) for i in ids])
    counts = {name: sum(splits[i] == name for i in ids) for name in SPLITS}
    classes = [f"{i} = {c}" if spec.type == "segmentation" else c for i, c in enumerate(spec.classes)]
    if spec.type == "classification":
        write_csv(folder / "labels.csv", ("id", "label"), [(i, labels[i]) for i in ids])
    lines = [
        f"# {spec.name}",
        "",
        f"- Modality: {spec.modality}.",
        f"- Task: {spec.type}. {spec.description}".rstrip(),
        f"- Classes: {', '.join(classes)}.",
        (f"- Images: {len(ids)}, {spec.image_size[0]} x {spec.image_size[1]}, {spec.channels} channel(s), "
         f"{spec.bit_depth}-bit; split {counts['train']} / {counts['val']} / {counts['test']} (train / val / test) "
         "in `splits.csv`."),
        f"- Source: {spec.source}. Licence: {spec.licence}.",
    ]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


@dataclass
class Task:
    """A loaded task: its description, and for each split the ids with their image (and mask or label)."""

    root: Path
    spec: TaskSpec
    splits: dict[str, list[str]]
    images: dict[str, Path]
    masks: dict[str, Path]  # segmentation
    labels: dict[str, int]  # classification: class index
    cases: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (case, slice index); cases.csv
    rois: dict[str, Path] = field(default_factory=dict)  # id -> its region of interest, roi/<id>.<ext>; empty: none

    @property
    def name(self) -> str:
        return self.spec.name


def _rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err})") from err


def _by_stem(folder: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            if path.stem in out:
                raise ValueError(f"{path}: two files share the id {path.stem!r} ({out[path.stem].name})")
            out[path.stem] = path
    return out


def _infer_spec(folder: Path, overrides: dict) -> TaskSpec:
    """A description for a folder without task.yaml: segmentation when there is masks/ (binary masks only),
    classification when there is labels.csv (classes: the sorted label names)."""
    from PIL import Image

    images = _by_stem(folder / "images")
    first = next(iter(images.values()))
    with Image.open(first) as image:
        size, channels = [image.height, image.width], 1 if image.mode in ("L", "I;16", "I", "1") else 3
        bits = 16 if image.mode in ("I;16", "I") else 8
    common = dict(name=folder.name, modality=overrides.get("modality", "unknown"), image_size=size,
                  channels=channels, bit_depth=bits, source=str(folder))
    if (folder / "masks").is_dir():
        with Image.open(next(iter(_by_stem(folder / "masks").values()))) as mask:
            top = int(np.asarray(mask.convert("L") if mask.mode == "1" else mask).max())
        return TaskSpec(type="segmentation", classes=["background", "foreground"], metrics=["dice"],
                        mask_threshold=top // 2 if top > 1 else None, **common)
    if (folder / "labels.csv").is_file():
        classes = sorted({row["label"] for row in _rows(folder / "labels.csv")})
        return TaskSpec(type="classification", classes=classes,
                        metrics=list(CLASSIFICATION_METRICS), **common)
    raise ValueError(f"{folder}: no task.yaml, and neither masks/ nor labels.csv to infer the task from")


def load_task(folder: str | Path, overrides: dict | None = None, seed: int = 0) -> Task:
    """Read and check a task folder. ``overrides`` replaces fields of its description (e.g. ``modality`` for a
    folder without task.yaml). Without splits.csv the ids are split 60/20/20 in a seeded order; a split file
    without a val split gives 20 % of train (seeded) to val."""
    folder = Path(folder)
    overrides = dict(overrides or {})
    if not (folder / "images").is_dir():
        raise ValueError(f"{folder}: no images/ folder")
    spec_path = folder / "task.yaml"
    described = (read_yaml(spec_path, "task description") if spec_path.is_file()
                 else dataclasses.asdict(_infer_spec(folder, overrides)))
    spec = validate(TaskSpec, {**described, **overrides}, str(spec_path if spec_path.is_file() else folder))
    images = _by_stem(folder / "images")
    masks, labels = {}, {}
    if spec.type == "segmentation":
        if not (folder / "masks").is_dir():
            raise ValueError(f"{folder}: a segmentation task needs masks/")
        masks = _by_stem(folder / "masks")
        missing = sorted(set(images) - set(masks))
        if missing:
            raise ValueError(f"{folder / 'images' / images[missing[0]].name}: no mask in {folder / 'masks'} "
                             f"({len(missing)} image(s) without one)")
    else:
        path = folder / "labels.csv"
        if not path.is_file():
            raise ValueError(f"{folder}: a classification task needs labels.csv")
        for line, row in enumerate(_rows(path), start=2):
            if row.get("label") not in spec.classes:
                raise ValueError(f"{path}:{line}: label {row.get('label')!r} is not one of {spec.classes}")
            if row["id"] not in images:
                raise ValueError(f"{path}:{line}: no image for id {row['id']!r} in {folder / 'images'}")
            labels[row["id"]] = spec.classes.index(row["label"])
        images = {i: p for i, p in images.items() if i in labels}
    ids = sorted(images)
    cases = _cases(folder, ids)
    rois = _by_stem(folder / "roi") if (folder / "roi").is_dir() else {}
    missing = sorted(set(ids) - set(rois)) if (folder / "roi").is_dir() else []
    if missing:
        raise ValueError(f"{folder / 'roi'}: no region of interest for image {missing[0]!r} ({len(missing)} image(s) "
                         "without one; a task with roi/ needs one for every image)")
    task = Task(folder, spec, _splits(folder, ids, seed, cases), images, masks, labels, cases, rois)
    if spec.type == "segmentation":
        for item in ids:
            _check_mask(task, item)
    return task


def _splits(folder: Path, ids: list[str], seed: int, cases: dict[str, tuple[str, int]]) -> dict[str, list[str]]:
    """The ids of each split; the val split carved out of train (when splits.csv has none) takes whole cases."""
    path = folder / "splits.csv"
    if path.is_file():
        splits: dict[str, list[str]] = {name: [] for name in SPLITS}
        for line, row in enumerate(_rows(path), start=2):
            if row.get("split") not in SPLITS:
                raise ValueError(f"{path}:{line}: split {row.get('split')!r} is not one of {SPLITS}")
            if row["id"] in ids:
                splits[row["split"]].append(row["id"])
        if not splits["val"] and splits["train"]:
            groups: dict[str, list[str]] = {}  # the slices of a case go together
            for item in splits["train"]:
                groups.setdefault(cases[item][0] if item in cases else item, []).append(item)
            units = list(groups.values())
            order = np.random.default_rng(seed).permutation(len(units))
            moved = {item for n in order[:max(1, len(units) // 5)] for item in units[n]}
            splits["val"] = sorted(moved)
            splits["train"] = [i for i in splits["train"] if i not in moved]
        return splits
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    return {name: sorted(order[i] for i in range(len(order)) if split_of(i, len(order)) == name) for name in SPLITS}


def _cases(folder: Path, ids: list[str]) -> dict[str, tuple[str, int]]:
    """``cases.csv`` (``id,case,slice``: the volume an image was cut from and its slice index) as id -> (case,
    slice); empty without the file. Every image needs a row, and ``splits.csv`` must put each case in one split
    (a split drawn by image would cut cases, so a task with cases needs the file)."""
    path, split_path = folder / "cases.csv", folder / "splits.csv"
    if not path.is_file():
        return {}
    if not split_path.is_file():
        raise ValueError(f"{path}: a task with cases needs {split_path.name} (a split drawn by image would put the "
                         "slices of one case in several splits)")
    known, split_of_id = set(ids), {row["id"]: row["split"] for row in _rows(split_path)}
    cases: dict[str, tuple[str, int]] = {}
    where: dict[str, tuple[str, int]] = {}  # case -> (split, line)
    seen: dict[tuple[str, int], int] = {}  # (case, slice) -> line
    for line, row in enumerate(_rows(path), start=2):
        item, case, index = row.get("id"), row.get("case"), row.get("slice")
        if not item or not case or index is None:
            raise ValueError(f"{path}:{line}: expected id,case,slice")
        if item not in known:
            raise ValueError(f"{path}:{line}: id {item!r} is not an image of the task")
        if item in cases:
            raise ValueError(f"{path}:{line}: id {item!r} is listed twice")
        if not index.strip().isdigit():
            raise ValueError(f"{path}:{line}: slice {index!r} is not a non-negative integer")
        key = (case, int(index))
        if key in seen:
            raise ValueError(f"{path}:{line}: slice {key[1]} of case {case!r} is already given on line {seen[key]}")
        seen[key] = line
        split = split_of_id.get(item)
        if split is not None:
            first = where.setdefault(case, (split, line))
            if first[0] != split:
                raise ValueError(f"{path}:{line}: case {case!r} is in {first[0]} (line {first[1]}) and in {split} "
                                 f"(id {item!r}) by {split_path.name}; a case must lie in one split")
        cases[item] = key
    missing = sorted(known - set(cases))
    if missing:
        raise ValueError(f"{path}: no row for image {missing[0]!r} ({len(missing)} image(s) without a case)")
    return cases


def _check_mask(task: Task, item: str) -> None:
    from PIL import Image

    from dex.data.readers import read_label_map

    mask_path, image_path = task.masks[item], task.images[item]
    with Image.open(image_path) as image:
        size = (image.height, image.width)
    labels = read_label_map(mask_path)
    if labels.shape != size:
        raise ValueError(f"{mask_path}: mask is {labels.shape[0]} x {labels.shape[1]}, its image {image_path.name} is "
                         f"{size[0]} x {size[1]}")
    if task.spec.mask_threshold is None and labels.max() >= len(task.spec.classes):
        raise ValueError(f"{mask_path}: label value {int(labels.max())} is outside the {len(task.spec.classes)} "
                         f"classes {task.spec.classes}")


def roi_mask(task: Task, item: str) -> np.ndarray | None:
    """An item's region of interest as [H, W] bool (True inside: nonzero in ``roi/<id>.<ext>``; any channel of a
    colour file), or None when the task has no ``roi/`` folder. A region of another size than the item's image (and
    so its mask) is a ValueError naming the file."""
    from PIL import Image

    from dex.data.readers import read_mask_pixels

    if not task.rois:
        return None
    path, image_path = task.rois[item], task.images[item]
    pixels = read_mask_pixels(path)
    inside = pixels.any(axis=2) if pixels.ndim == 3 else pixels != 0
    with Image.open(image_path) as image:
        size = (image.height, image.width)
    if inside.shape != size:
        mask = " and its mask" if item in task.masks else ""
        raise ValueError(f"{path}: region of interest is {inside.shape[0]} x {inside.shape[1]}, the image "
                         f"{image_path.name}{mask} {size[0]} x {size[1]}")
    return inside


def mask_labels(task: Task, item: str) -> np.ndarray:
    """The [H, W] class indices of an item's mask (thresholded for binary 0/255 masks)."""
    from dex.data.readers import read_label_map

    labels = read_label_map(task.masks[item])
    if task.spec.mask_threshold is not None:
        return (labels > task.spec.mask_threshold).astype(np.int64)
    return labels
