"""Turn the layouts public medical datasets are released in into dex task folders (see :mod:`dex.data.tasks`).

Layouts (``dex data import-task LAYOUT SRC OUT``):

- ``class-folders``: ``SRC/[split/]class/<image>`` (torchvision's ImageFolder; Kermany chest X-ray, OCTDL, the
  Kaggle brain-tumour MRI set). Top-level folders named like splits (train, Training, val, test, Testing, ...) give
  the split.
- ``csv``: a CSV naming each image (id or relative path) and its label (APTOS 2019, ISIC ground truth).
- ``pairs``: images and masks matched by name, in two folders or one (Kvasir-SEG, ISIC, BUSI ``X_mask.png``,
  CHASE ``X_1stHO.png``, FIVES).
- ``volumes``: image volumes (NIfTI, or a folder per DICOM series) and NIfTI label volumes (Medical Segmentation
  Decathlon, nnU-Net ``X_0000.nii.gz``, KiPA, FeTA, AutoPET, hospital series with labels drawn in 3D Slicer or
  ITK-SNAP) cut into 2D slices after the volume-wise Table 2 normalisation, split by case so that no patient is in
  two splits.
- ``medmnist``: a MedMNIST(+) 2D ``.npz`` (its own train / val / test split).

Every importer writes into ``OUT.partial`` with a journal of the source items done, and renames it to ``OUT`` at
the end: a killed import resumes where it was when run again with ``--resume``. An item that cannot be read or
does not fit (mask size, unknown label value) is recorded in ``problems.csv`` with the file and the reason, and
the import carries on.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dex.data.curate import AXES
from dex.data.dedup import near_duplicate_groups, phash
from dex.data.journal import read_journal
from dex.data.normalize import VOLUME_NORMALIZERS
from dex.data.readers import (
    Problem,
    ReadError,
    Volume,
    group_dicom_series,
    read_dicom_pictures,
    read_dicom_series_display,
    read_mask_pixels,
    read_nifti,
    read_picture,
    suv_values,
)
from dex.data.tasks import CLASSIFICATION_METRICS, SPLITS, TaskSpec, finish_task, split_of, write_csv

LAYOUTS = ("class-folders", "csv", "pairs", "volumes", "medmnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
COPIED_SUFFIXES = (".png", ".jpg", ".jpeg")  # stored as they are; the others are converted to PNG
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # PIL modes of one-channel images
SPLIT_ALIASES = {
    "train": "train", "training": "train", "tr": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "ts": "test",
}


@dataclass
class Item:
    """One image of the task: ``image`` is a file to store as it is (PNG / JPEG) or pixels to write as a PNG
    ([H, W] or [H, W, 3], uint8 or uint16)."""

    id: str
    image: Path | np.ndarray
    label: str | None = None  # classification
    mask: np.ndarray | None = None  # segmentation: [H, W] class indices
    split: str | None = None
    case: str | None = None  # a slice of a volume: the case's name
    slice: int | None = None  # and its index in the volume


#: A source unit: called with a list to append the :class:`Problem` of each bad file it skips, it returns the unit's
#: items (or raises a :class:`ReadError` when the unit cannot be imported at all).
MakeItems = Callable[[list[Problem]], list[Item]]


def _one(item: Item) -> MakeItems:
    """A source unit that is one item known in advance."""
    return lambda problems: [item]


@dataclass
class ImportSummary:
    out: Path
    images: int
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    splits: dict[str, int] = field(default_factory=dict)  # images per split
    duplicates: list[list[str]] = field(default_factory=list)  # near-duplicate groups (ids)
    across_splits: list[list[str]] = field(default_factory=list)  # those the source's split puts on both sides


# --- reading the sources -----------------------------------------------------------------------------------------

def _picture_pixels(path: Path) -> np.ndarray:
    """A 2D image file (or single-frame DICOM) as uint8 / uint16 pixels in the full range of their bit depth."""
    if path.suffix.lower() == ".dcm":
        frames, _ = read_dicom_pictures(path)
        if len(frames) != 1:
            raise ReadError(path, f"a multi-frame DICOM ({len(frames)} frames) is not one 2D image")
        picture = frames[0][1]
    else:
        picture = read_picture(path)
    pixels, full = picture.pixels, picture.max_value
    if pixels.dtype.kind == "f" or full not in (255.0, 65535.0):  # float, or e.g. 12-bit DICOM: stretch to 16 bit
        pixels = np.round(np.clip(pixels.astype(np.float64) / full, 0.0, 1.0) * 65535.0).astype(np.uint16)
    if pixels.ndim == 3 and pixels.dtype == np.uint16:
        raise ReadError(path, "16-bit RGB images cannot be stored as PNG; convert them to 8 bit first")
    return pixels


def _inspect(path: Path) -> tuple[tuple[int, int], str, int]:
    """(height, width), PIL mode and pHash of a PNG / JPEG, decoded in full so that a truncated file fails here."""
    try:
        with Image.open(path) as image:
            image.load()
            return (image.height, image.width), image.mode, phash(np.asarray(image.convert("F")))
    except Exception as err:
        raise ReadError(path, f"not a readable image ({type(err).__name__}: {err})") from err


def _parse_value(text: str) -> int | tuple[int, int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 3:
        return (parts[0], parts[1], parts[2])
    raise ValueError(f"mask value {text!r}: give one integer or R,G,B")


@dataclass
class MaskMapping:
    """How source mask values become class indices.

    ``values`` maps a source value (an integer, or an (R, G, B) colour) to a class index; every value found must
    be listed. Without it, values that are class indices are kept, and in a 2D mask with two classes anything
    above half the bit depth's range is foreground (0 / 255 masks, lossy JPEG masks). ``volume=True``: ``raw`` is
    a [Z, Y, X] label volume (no colours, no thresholding).
    """

    classes: list[str]
    values: dict[int | tuple[int, int, int], int] | None = None

    @classmethod
    def parse(cls, classes: Sequence[str], pairs: Sequence[str]) -> MaskMapping:
        """``pairs`` as given on the command line: ``VALUE=CLASS`` with VALUE ``255`` or ``255,0,0``."""
        classes = list(classes)
        if not pairs:
            return cls(classes)
        values: dict = {}
        for pair in pairs:
            value, sep, name = pair.partition("=")
            if not sep or name not in classes:
                raise ValueError(f"--mask-value {pair!r}: expected VALUE=CLASS with CLASS one of {classes}")
            try:
                values[_parse_value(value)] = classes.index(name)
            except ValueError as err:
                raise ValueError(f"--mask-value {pair!r}: {err}") from None
        return cls(classes, values)

    def __call__(self, path: Path, raw: np.ndarray, volume: bool = False) -> np.ndarray:
        colour = raw.ndim == 3 and not volume
        if self.values is None:
            if colour:
                raise ReadError(path, "a colour mask needs --mask-value R,G,B=CLASS for each colour")
            if raw.min(initial=0) >= 0 and int(raw.max(initial=0)) < len(self.classes):
                return raw.astype(np.int64)
            if not volume and len(self.classes) == 2 and raw.dtype.kind == "u":
                return (raw > np.iinfo(raw.dtype).max // 2).astype(np.int64)
            raise ReadError(path, f"mask values {sorted(np.unique(raw).tolist())[:8]} are not indices of the "
                                  f"{len(self.classes)} classes; give --mask-value VALUE=CLASS")
        out = np.full(raw.shape[:2] if colour else raw.shape, -1, dtype=np.int64)
        keys = raw.reshape(-1, raw.shape[2]) if colour else raw.reshape(-1, 1)
        for value, index in self.values.items():
            key = np.asarray(value if isinstance(value, tuple) else (value,))
            if key.size != keys.shape[1]:
                continue
            out.reshape(-1)[(keys == key).all(axis=1)] = index
        if (out < 0).any():
            unknown = np.unique(keys[out.reshape(-1) < 0], axis=0)[:4]
            shown = [tuple(int(v) for v in u) if len(u) > 1 else int(u[0]) for u in unknown]
            raise ReadError(path, f"mask values {shown} are not in the --mask-value map")
        return out


# --- writing the task folder ------------------------------------------------------------------------------------

class TaskWriter:
    """Writes ``OUT.partial/`` item by item with a journal of the source units done, then renames it to ``OUT``.

    ``settings`` (JSON-able: what the import was asked to do) are stored with the journal; resuming with other
    settings is refused, so one folder never mixes two imports."""

    def __init__(self, out: str | Path, resume: bool = False, overwrite: bool = False, workers: int = 1,
                 settings: dict | None = None) -> None:
        self.out, self.workers = Path(out), max(1, workers)
        self.partial = self.out.with_name(self.out.name + ".partial")
        if self.out.exists() and not overwrite:
            raise ValueError(f"{self.out}: already exists (give --overwrite to replace it)")
        if self.partial.exists() and not resume:
            shutil.rmtree(self.partial)
        (self.partial / "images").mkdir(parents=True, exist_ok=True)
        stored, settings = self.partial / "settings.json", json.loads(json.dumps(settings or {}))
        if stored.is_file() and json.loads(stored.read_text()) != settings:
            raise ValueError(f"{stored}: the interrupted import had other settings; run it again without --resume")
        stored.write_text(json.dumps(settings, indent=1, sort_keys=True))
        self.journal = self.partial / "journal.jsonl"
        self.items: dict[str, dict] = {}  # id -> {"file", "label", "split", "size", "mode", "phash"}
        self.done: set[str] = set()
        self.problems: list[tuple[str, str]] = []
        for record in read_journal(self.journal, repair=True):
            self.done.add(record["unit"])
            self.items.update(record["items"])
            self.problems.extend(tuple(p) for p in record["problems"])
        self._claimed, self._lock = set(self.items), threading.Lock()

    def run(self, units: Iterable[tuple[str, MakeItems]]) -> None:
        """``units``: (source key, :data:`MakeItems`). A unit that raises a :class:`ReadError` (or ``ValueError``) is
        recorded as a problem, with every bad file it reported; the others are written and journalled with the bad
        files they skipped (after their files, so a killed run redoes only units it had not journalled).
        ``self.workers`` threads read and encode (decoding, PNG encoding and zlib release the GIL); the journal keeps
        the units' order, so the folder does not depend on the number of workers."""
        with open(self.journal, "a") as journal, ThreadPoolExecutor(self.workers) as pool:
            pending: deque = deque()
            for key, make_items in units:
                if key in self.done:
                    continue
                pending.append((key, pool.submit(self._unit, key, make_items)))
                if len(pending) >= 4 * self.workers:
                    self._commit(*pending.popleft(), journal)
            while pending:
                self._commit(*pending.popleft(), journal)

    def _unit(self, key: str, make_items: MakeItems) -> tuple[dict, list]:
        items: dict[str, dict] = {}
        claimed: list[str] = []
        problems: list[Problem] = []
        try:
            for item in make_items(problems):
                with self._lock:
                    if item.id in self._claimed:
                        raise ReadError(key, f"two images would get the id {item.id!r}")
                    self._claimed.add(item.id)
                claimed.append(item.id)
                items[item.id] = self._write(item)
        except ValueError as err:  # ReadError is a ValueError
            for item_id, record in items.items():
                (self.partial / "images" / record["file"]).unlink(missing_ok=True)
                (self.partial / "masks" / f"{item_id}.png").unlink(missing_ok=True)
            with self._lock:
                self._claimed.difference_update(claimed)
            return {}, [*problems, err.problem if isinstance(err, ReadError) else Problem(key, str(err))]
        return items, problems

    def _commit(self, key: str, future: Future, journal) -> None:
        items, problems = future.result()
        self.items.update(items)
        self.problems.extend(problems)
        self.done.add(key)
        journal.write(json.dumps({"unit": key, "items": items, "problems": problems}) + "\n")
        journal.flush()

    def _write(self, item: Item) -> dict:
        copied = isinstance(item.image, Path) and item.image.suffix.lower() in COPIED_SUFFIXES
        if copied:
            size, mode, image_hash = _inspect(item.image)
            name = item.id + item.image.suffix.lower()
        else:
            pixels = _picture_pixels(item.image) if isinstance(item.image, Path) else item.image
            size, name = pixels.shape[:2], item.id + ".png"
            mode = "RGB" if pixels.ndim == 3 else "I;16" if pixels.dtype == np.uint16 else "L"
            image_hash = phash(pixels.astype(np.float32))
        if item.mask is not None and item.mask.shape != tuple(size):
            raise ReadError(item.image if isinstance(item.image, Path) else item.id,
                            f"its mask is {item.mask.shape[0]} x {item.mask.shape[1]}, the image is "
                            f"{size[0]} x {size[1]}")
        if copied:
            shutil.copyfile(item.image, self.partial / "images" / name)
        else:
            Image.fromarray(pixels).save(self.partial / "images" / name)
        if item.mask is not None:
            (self.partial / "masks").mkdir(exist_ok=True)
            dtype = np.uint8 if item.mask.max(initial=0) < 256 else np.uint16
            Image.fromarray(item.mask.astype(dtype)).save(self.partial / "masks" / f"{item.id}.png")
        return {"file": name, "label": item.label, "split": item.split, "size": list(size), "mode": mode,
                "phash": f"{image_hash:016x}", "case": item.case, "slice": item.slice}

    def finish(self, spec: TaskSpec, seed: int = 0, duplicate_distance: int = 2) -> ImportSummary:
        """Write task.yaml, labels.csv, splits.csv, README.md, problems.csv, duplicates.csv and, for slices of
        volumes, cases.csv (each image's case and slice index); rename to OUT.

        Images whose pHashes lie within ``duplicate_distance`` bits (transitively) form a group: re-exports,
        crops, copies of one scan under two names. Items without a split get one by a seeded 60 / 20 / 20 draw of
        whole groups (stratified by class for classification), so no group is on both sides of a split; items
        without a split in a group with a source split join it. Groups that the source's own split puts on both
        sides are counted and listed. ``duplicate_distance < 0`` turns grouping off."""
        if not self.items:
            raise ValueError(f"{self.partial}: no image could be imported ({len(self.problems)} problem(s); "
                             f"first: {self.problems[0] if self.problems else 'no source items found'})")
        ids = sorted(self.items)
        groups = [] if duplicate_distance < 0 else near_duplicate_groups(
            {i: int(self.items[i]["phash"], 16) for i in ids}, duplicate_distance)
        splits = _fill_splits({i: self.items[i]["split"] for i in ids}, {i: self.items[i]["label"] for i in ids},
                              groups, seed)
        across = [g for g in groups if len({splits[i] for i in g}) > 1]
        sizes = Counter(tuple(self.items[i]["size"]) for i in ids)
        modes = Counter(self.items[i]["mode"] for i in ids)
        spec.image_size = list(sizes.most_common(1)[0][0])
        spec.channels = 1 if modes.most_common(1)[0][0] in GREY_MODES else 3  # palettes are read as RGB
        spec.bit_depth = 16 if modes.most_common(1)[0][0] in ("I;16", "I") else 8
        if spec.type == "classification":
            found = sorted({self.items[i]["label"] for i in ids})
            spec.classes = spec.classes or found
            unknown = sorted(set(found) - set(spec.classes))
            if unknown:
                raise ValueError(f"labels {unknown} are not among the classes {spec.classes}")
        finish_task(self.partial, spec, ids, {i: self.items[i]["label"] for i in ids}, splits)
        notes = []
        if len(sizes) > 1:
            low, high = min(sizes), max(sizes)
            notes.append(f"- Image sizes vary ({len(sizes)} sizes, from {low[0]} x {low[1]} to {high[0]} x {high[1]}); "
                         "the most common is given above.")
        if groups:
            where = (f"{len(across)} group(s) lie on both sides of the source's own split" if across
                     else "each within one split")
            notes.append(f"- Near-duplicates (pHash within {duplicate_distance} bits): {len(groups)} group(s) of "
                         f"{sum(map(len, groups))} images in `duplicates.csv`; {where}.")
        sliced = [i for i in ids if self.items[i].get("case") is not None]
        if sliced:
            write_csv(self.partial / "cases.csv", ("id", "case", "slice"),
                      [(i, self.items[i]["case"], self.items[i]["slice"]) for i in sliced])
            notes.append(f"- Cases: the images are slices of {len({self.items[i]['case'] for i in sliced})} "
                         "volume(s); `cases.csv` gives each image's case and slice index (for per-case 3D Dice).")
        with open(self.partial / "README.md", "a") as handle:
            handle.writelines(line + "\n" for line in notes)
        write_csv(self.partial / "duplicates.csv", ("id", "group", "split"),
                  [(i, n, splits[i]) for n, group in enumerate(groups) for i in group])
        write_csv(self.partial / "problems.csv", ("file", "reason"), self.problems)
        self.journal.unlink()
        (self.partial / "settings.json").unlink()
        if self.out.exists():
            shutil.rmtree(self.out)
        self.partial.rename(self.out)
        return ImportSummary(self.out, len(ids), list(self.problems), dict(Counter(splits.values())), groups,
                             across)


def _fill_splits(splits: dict[str, str | None], labels: dict[str, str | None], groups: list[list[str]],
                 seed: int) -> dict[str, str]:
    """Every item's split: its own, else its group's (the most common source split in it), else a seeded 60 / 20
    / 20 draw of whole groups per class (a group counts once, under its first member's label)."""
    out = {i: s for i, s in splits.items() if s}
    units = groups + [[i] for i in sorted(set(splits) - {i for g in groups for i in g})]
    by_label: dict = {}
    for unit in units:
        given = Counter(out[i] for i in unit if i in out)
        if given:
            out.update({i: given.most_common(1)[0][0] for i in unit if i not in out})
        else:
            by_label.setdefault(labels[unit[0]], []).append(unit)
    rng = np.random.default_rng(seed)
    for key in sorted(by_label, key=str):
        members = sorted(by_label[key])
        for position, index in enumerate(rng.permutation(len(members))):
            out.update({i: split_of(position, len(members)) for i in members[index]})
    return out


def _read_split_file(path: str | Path | None) -> dict[str, str]:
    """An ``id,split`` CSV keyed by the source's names (image stems, or case names for volumes)."""
    if path is None:
        return {}
    out = {}
    with open(path, newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            split = SPLIT_ALIASES.get(str(row.get("split", "")).lower())
            if split is None or not row.get("id"):
                raise ValueError(f"{path}:{line}: expected id,split with split one of {SPLITS}")
            out[row["id"]] = split
    return out


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _unique_ids(paths: Sequence[Path], root: Path) -> dict[Path, str]:
    """File stems when they are unique, else the path below ``root`` with ``/`` as ``__``."""
    stems = Counter(p.stem for p in paths)
    if all(count == 1 for count in stems.values()):
        return {p: p.stem for p in paths}
    return {p: "__".join(p.relative_to(root).with_suffix("").parts) for p in paths}


def _clean(text: str) -> str:
    """An id safe as a file name and a CSV field."""
    return re.sub(r"[^A-Za-z0-9._()+-]+", "_", text).strip("_")


# --- the layouts ---------------------------------------------------------------------------------------------

def import_class_folders(src: str | Path, writer: TaskWriter, splits_file: str | Path | None = None) -> None:
    """``SRC/[split/]class/<image>``; deeper folders below a class folder are searched too."""
    src = Path(src)
    top = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in top if p.name.lower() in SPLIT_ALIASES]
    if split_dirs and len(split_dirs) != len(top):
        others = [p.name for p in top if p not in split_dirs]
        raise ValueError(f"{src}: mixes split folders ({[p.name for p in split_dirs]}) with others ({others})")
    roots = [(p, SPLIT_ALIASES[p.name.lower()]) for p in split_dirs] or [(src, None)]
    entries = []  # (path, class, split)
    for root, split in roots:
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entries += [(path, class_dir.name, split) for path in _images_in(class_dir)]
    if not entries:
        raise ValueError(f"{src}: no images in class folders ({', '.join(IMAGE_SUFFIXES)})")
    ids = _unique_ids([e[0] for e in entries], src)
    official = _read_split_file(splits_file)
    writer.run((str(path), _one(Item(_clean(ids[path]), path, label=label,
                                     split=official.get(ids[path], official.get(path.stem, split)))))
               for path, label, split in entries)


def import_csv(csv_path: str | Path, images: str | Path, writer: TaskWriter, id_column: str = "id",
               label_column: str = "label", split_column: str | None = None) -> None:
    """A CSV with an image name per row (a stem, a file name or a path below ``images``) and its label.

    A one-hot table (ISIC: ``image,MEL,NV,...`` with 0/1 or 0.0/1.0 entries) is read by giving ``label_column``
    as ``onehot:MEL,NV,...``.
    """
    csv_path, images = Path(csv_path), Path(images)
    by_stem: dict[str, Path] = {}
    for path in _images_in(images):
        by_stem.setdefault(path.stem, path)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    onehot = label_column.split(":", 1)[1].split(",") if label_column.startswith("onehot:") else None
    needed = [id_column] + (onehot or [label_column]) + ([split_column] if split_column else [])
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise ValueError(f"{csv_path}: no column(s) {missing}; the columns are {list(rows[0])}")

    def unit(line: int, row: dict[str, str]) -> MakeItems:
        def make(problems: list[Problem]) -> list[Item]:
            name = row[id_column]
            path = images / name if (images / name).is_file() else by_stem.get(Path(name).stem)
            if path is None:
                raise ReadError(f"{csv_path}:{line}", f"no image {name!r} in {images}")
            if onehot:
                hot = [c for c in onehot if float(row[c] or 0) == 1.0]
                if len(hot) != 1:
                    raise ReadError(f"{csv_path}:{line}", f"{len(hot)} of the one-hot columns are 1, not one")
                label = hot[0]
            else:
                label = row[label_column]
            split = SPLIT_ALIASES.get(row[split_column].lower()) if split_column else None
            if split_column and split is None:
                raise ReadError(f"{csv_path}:{line}", f"split {row[split_column]!r} is not one of {SPLITS}")
            return [Item(_clean(Path(name).stem), path, label=label, split=split)]
        return make

    writer.run((f"{csv_path}:{line}", unit(line, row)) for line, row in enumerate(rows, start=2))


def _name_regex(pattern: str) -> re.Pattern:
    """``{stem}_mask*`` -> a regex with a ``stem`` group; ``*`` stays within one path part."""
    body = re.escape(pattern).replace(r"\{stem\}", "(?P<stem>[^/]+?)").replace(r"\*", "[^/]*")
    return re.compile(f"^{body}$")


def _match_masks(candidates: Sequence[Path], root: Path, pattern: str) -> dict[str, list[Path]]:
    """Image stem -> the files whose name (without suffix; the path below ``root`` when the pattern has a ``/``)
    matches ``pattern``."""
    regex, out = _name_regex(pattern), {}
    for path in candidates:
        name = path.relative_to(root).with_suffix("").as_posix() if "/" in pattern else path.stem
        match = regex.match(name)
        if match:
            out.setdefault(match.group("stem"), []).append(path)
    return out


def _read_binary_mask(path: Path) -> np.ndarray:
    """A one-class mask as [H, W] bool: 0/1 or 0/255 (or lossy) grey, palette indices, or colour (any channel),
    by the two-class rule of :class:`MaskMapping`."""
    raw = read_mask_pixels(path)
    return MaskMapping(["background", "foreground"])(path, raw.max(axis=2) if raw.ndim == 3 else raw) > 0


def import_pairs(images: str | Path, writer: TaskWriter, mapping: MaskMapping, masks: str | Path | None = None,
                 mask_pattern: str = "{stem}", splits_file: str | Path | None = None,
                 class_patterns: Sequence[tuple[int, str]] = ()) -> None:
    """Images and masks matched by name. ``mask_pattern`` gives a mask's name from its image's stem, with ``*``
    for several masks of one image (BUSI ``{stem}_mask*``: their labels are merged by the maximum); with a ``/``
    it is a path below ``masks``. ``masks`` defaults to the images folder; files in it that are masks are not taken
    as images.

    ``class_patterns``: (class index, pattern) for releases with one binary mask per class (IDRiD's lesion
    folders, JSRT/SCR's organ folders): each class's pixels are painted in the order given, later classes over
    earlier ones; an image needs at least one of them."""
    images = Path(images)
    masks = Path(masks) if masks is not None else images
    if masks == images and mask_pattern == "{stem}" and not class_patterns:
        raise ValueError(f"{images}: masks in the image folder need a --mask-pattern such as {{stem}}_mask")
    candidates = _images_in(masks)
    per_class = [(index, _match_masks(candidates, masks, pattern)) for index, pattern in class_patterns]
    mask_files = {} if class_patterns else _match_masks(candidates, masks, mask_pattern)
    is_mask = {p for found in [mask_files, *(m for _, m in per_class)] for paths in found.values() for p in paths}
    sources = [p for p in _images_in(images) if p not in is_mask]
    if not sources:
        raise ValueError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    ids = _unique_ids(sources, images)
    official = _read_split_file(splits_file)
    wanted = " or ".join(pattern for _, pattern in class_patterns) or mask_pattern

    def read_layer(index: int, mask: Path) -> np.ndarray:
        return np.where(_read_binary_mask(mask), index, 0) if class_patterns else mapping(mask, read_mask_pixels(mask))

    def labels_of(path: Path, problems: list[Problem]) -> np.ndarray:
        if class_patterns:
            found = [(index, m) for index, matched in per_class for m in matched.get(path.stem, [])]
        else:
            found = [(0, m) for m in mask_files.get(path.stem, [])]
        if not found:
            raise ReadError(path, f"no mask named {wanted.replace('{stem}', path.stem)}.* in {masks}")
        layers, errors = [], []
        for index, mask in found:  # every bad mask is named, not only the first
            try:
                layers.append(read_layer(index, mask))
            except ReadError as err:
                errors.append(err)
        if len(found) == 1 and errors:
            raise errors[0]
        if errors:
            problems.extend(err.problem for err in errors)
            raise ReadError(path, f"{len(errors)} of its {len(found)} masks could not be read")
        if any(layer.shape != layers[0].shape for layer in layers):
            raise ReadError(found[0][1], f"the masks of {path.name} differ in size")
        out = layers[0]
        for layer in layers[1:]:  # one class per file: later over earlier; several masks of one image: union
            out = np.where(layer > 0, layer, out) if class_patterns else np.maximum(out, layer)
        return out

    def unit(path: Path) -> MakeItems:
        return lambda problems: [Item(_clean(ids[path]), path, mask=labels_of(path, problems),
                                      split=official.get(path.stem))]

    writer.run((str(path), unit(path)) for path in sources)


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
    geometry, so labels drawn on it in any viewer line up); a label volume must be in the image's space (same
    affine within 0.01 mm) or the case is a problem.

    The image is normalised as a volume (Table 2: ``ct_hu``, ``mr_percentile``, ``pet_suv``, ``pet_raw``) and
    stored as 16-bit PNG (the [0, 1] values times 65535), the label slice as a PNG of class indices. ``slices``:
    ``foreground`` keeps the slices with a labelled pixel, ``all`` every slice; then every ``stride``-th. Cases
    are split 60 / 20 / 20 (seeded) unless ``splits_file`` names their split.
    """
    if normalization not in VOLUME_NORMALIZERS:
        raise ValueError(f"normalisation {normalization!r}: one of {sorted(VOLUME_NORMALIZERS)}")
    if axis not in AXES or slices not in ("foreground", "all") or stride < 1:
        raise ValueError(f"axis one of {list(AXES)}, slices foreground or all, stride >= 1; got {axis!r}, "
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
    dim = AXES[axis]

    def unit(path: Path) -> MakeItems:
        def make(problems: list[Problem]) -> list[Item]:
            case = cases[path]
            if case not in label_files:
                raise ReadError(path, f"no label volume {case}.nii.gz in {labels}")
            volume = _read_volume(path, 0 if path in file_channel else channel, normalization, problems)
            label_volume = read_nifti(label_files[case])[0]
            if volume.values.shape != label_volume.values.shape:
                raise ReadError(label_files[case], f"label volume is {label_volume.values.shape}, the image "
                                                   f"{path.name} is {volume.values.shape} (after reorientation)")
            offset = float(np.abs(volume.meta["affine"] - label_volume.meta["affine"]).max())
            if offset > 0.01:
                raise ReadError(label_files[case], f"label volume is not in the space of the image {path.name} "
                                                   f"(their affines differ by up to {offset:.3g} mm)")
            raw = np.rint(label_volume.values).astype(np.int64)
            classes = mapping(label_files[case], raw, volume=True)
            normalised = VOLUME_NORMALIZERS[normalization](volume.values)
            keep = [i for i in range(raw.shape[dim]) if slices == "all" or np.take(classes, i, dim).any()][::stride]
            return [Item(f"{_clean(case)}_{i:04d}",
                         np.round(np.take(normalised, i, dim) * 65535.0).astype(np.uint16),
                         mask=np.take(classes, i, dim), split=official.get(case, drawn[case]), case=_clean(case),
                         slice=i) for i in keep]
        return make

    writer.run((str(path), unit(path)) for path in volumes)


def _read_volume(path: Path, channel: int, normalization: str, problems: list[Problem]) -> Volume:
    """A NIfTI file (channel ``channel`` of a 4D one) or a folder with one DICOM series (PET in SUV for
    ``pet_suv``; NIfTI PET is taken to be in SUV already, as AutoPET ships it). Files of the folder that are not
    readable DICOM go to ``problems``; the series is read without them."""
    if not path.is_dir():
        frames = read_nifti(path)
        if channel >= len(frames):
            raise ReadError(path, f"has {len(frames)} channel(s); --channel {channel} does not exist")
        return frames[channel]
    files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    series = group_dicom_series(files, problems)
    if len(series) != 1:
        raise ReadError(path, f"holds {len(series)} DICOM series; a case folder must hold exactly one")
    volume = read_dicom_series_display(next(iter(series.values())))
    if normalization == "pet_suv":
        volume.values = suv_values(volume, path)
    return volume


def import_medmnist(npz_path: str | Path, writer: TaskWriter, classes: Sequence[str] = ()) -> list[str]:
    """A MedMNIST(+) 2D ``.npz`` (``train_images`` [N, H, W(, 3)] uint8, ``train_labels`` [N, 1], same for val
    and test). Label ``n`` is ``classes[n]``; without names the classes are ``"0"``, ``"1"``, ... up to the
    largest label. Returns the class list."""
    npz_path = Path(npz_path)
    try:
        data = np.load(npz_path, allow_pickle=False)
        arrays = {key: data[key] for key in data.files}
    except Exception as err:
        raise ValueError(f"{npz_path}: not a readable .npz ({type(err).__name__}: {err})") from err
    splits = [s for s in SPLITS if f"{s}_images" in arrays and f"{s}_labels" in arrays]
    if not splits:
        raise ValueError(f"{npz_path}: no train_images / train_labels arrays (found {sorted(arrays)})")
    top = 0
    for split in splits:
        pictures, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if pictures.ndim not in (3, 4) or (pictures.ndim == 4 and pictures.shape[3] != 3):
            raise ValueError(f"{npz_path}: {split}_images has shape {pictures.shape}; a 2D MedMNIST set is "
                             f"[N, H, W] or [N, H, W, 3] (3D MedMNIST is not a 2D task)")
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise ValueError(f"{npz_path}: {split}_labels has shape {labels.shape}: multi-label sets are not "
                             f"single-label classification tasks")
        top = max(top, int(labels.max()) + 1)
    classes = list(classes) or [str(n) for n in range(top)]
    if len(classes) < top:
        raise ValueError(f"{npz_path}: labels go up to {top - 1}, but only {len(classes)} class names were given")
    for split in splits:
        pictures, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        writer.run((f"{npz_path}:{split}[{n}]",
                    _one(Item(f"{split}_{n:06d}", np.ascontiguousarray(pictures[n].astype(np.uint8)),
                              label=classes[int(labels[n])], split=split)))
                   for n in range(len(pictures)))
    return classes


@dataclass
class ImportOptions:
    """What ``dex data import-task`` takes besides the layout, the source and the output folder."""

    modality: str = "unknown"
    name: str = ""  # default: the output folder's name
    classes: list[str] = field(default_factory=list)  # segmentation: index = class; default background, foreground
    images: str | None = None  # csv: the image folder (default: the CSV's folder)
    masks: str | None = None  # pairs: the mask folder (default: the image folder)
    labels: str | None = None  # volumes: the label volume folder
    mask_pattern: str = "{stem}"
    mask_values: list[str] = field(default_factory=list)  # VALUE=CLASS
    class_masks: list[str] = field(default_factory=list)  # CLASS=PATTERN: one binary mask file per class
    id_column: str = "id"
    label_column: str = "label"
    split_column: str | None = None
    normalization: str = "ct_hu"
    axis: str = "axial"
    slices: str = "foreground"
    stride: int = 1
    channel: int = 0
    splits: str | None = None  # an id,split CSV with the source's official split
    seed: int = 0
    duplicate_distance: int = 2  # pHash bits within which images are grouped as near-duplicates; < 0: off
    description: str = ""
    source: str = ""
    licence: str = ""


def import_task(layout: str, src: str | Path, out: str | Path, options: ImportOptions | None = None,
                resume: bool = False, overwrite: bool = False, workers: int = 1) -> ImportSummary:
    """Import the dataset at ``src`` (laid out as ``layout``, one of :data:`LAYOUTS`) as a task folder ``out``
    with ``workers`` threads; the folder is the same whatever their number."""
    options = options or ImportOptions()
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: one of {LAYOUTS}")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    segmentation = layout in ("pairs", "volumes")
    class_masks = [pair.partition("=")[::2] for pair in options.class_masks]
    if any(not name or not pattern or "{stem}" not in pattern for name, pattern in class_masks):
        raise ValueError(f"--class-mask {options.class_masks}: expected CLASS=PATTERN with {{stem}} in the pattern")
    default = ["background", *(name for name, _ in class_masks)] if class_masks else ["background", "foreground"]
    classes = list(options.classes) or (default if segmentation else [])
    unknown = [name for name, _ in class_masks if name not in classes]
    if unknown:
        raise ValueError(f"--class-mask classes {unknown} are not among the classes {classes}")
    mapping = MaskMapping.parse(classes, options.mask_values)
    settings = {"layout": layout, "src": str(src), **dataclasses.asdict(options)}
    writer = TaskWriter(out, resume=resume, overwrite=overwrite, workers=workers, settings=settings)
    if layout == "class-folders":
        import_class_folders(src, writer, options.splits)
    elif layout == "csv":
        import_csv(src, options.images or src.parent, writer, options.id_column, options.label_column,
                   options.split_column)
    elif layout == "pairs":
        import_pairs(src, writer, mapping, options.masks, options.mask_pattern, options.splits,
                     [(classes.index(name), pattern) for name, pattern in class_masks])
    elif layout == "volumes":
        if options.labels is None:
            raise ValueError("the volumes layout needs --labels (the folder of label volumes)")
        import_volumes(src, options.labels, writer, mapping, options.normalization, options.axis, options.slices,
                       options.stride, options.channel, options.splits, options.seed)
    else:
        classes = import_medmnist(src, writer, classes)
    spec = TaskSpec(
        name=options.name or out.name, type="segmentation" if segmentation else "classification",
        modality=options.modality, classes=classes, image_size=[0, 0], channels=1,
        description=options.description, source=options.source or f"{src} ({layout} layout)",
        licence=options.licence or "see the source",
        metrics=["dice"] if segmentation else list(CLASSIFICATION_METRICS),
    )
    return writer.finish(spec, options.seed, options.duplicate_distance)
