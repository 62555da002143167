"""The resumable task-folder writer the importers share: :class:`Item`, :class:`TaskWriter` (``OUT.partial`` with a
journal of the source units done, renamed to ``OUT`` at the end), :class:`ImportSummary`, split filling, and the
image helpers of the layouts."""

from __future__ import annotations

import csv
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

from dex.data.dedup import IMPORT_DUPLICATE_DISTANCE, IMPORT_HASH_SIZE, near_duplicate_groups, phash
from dex.data.journal import read_journal
from dex.data.readers import Problem, ReadError, read_dicom_pictures, read_picture
from dex.data.tasks import SPLITS, TaskSpec, finish_task, split_of, write_csv

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
COPIED_SUFFIXES = (".png", ".jpg", ".jpeg")  # stored as they are; the others are converted to PNG
MASK_SUFFIXES = (".png", ".gif", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")  # masks and regions of interest
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
    roi: np.ndarray | None = None  # a region of interest: [H, W] bool, True inside
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
            return (image.height, image.width), image.mode, phash(np.asarray(image.convert("F")), IMPORT_HASH_SIZE)
    except Exception as err:
        raise ReadError(path, f"not a readable image ({type(err).__name__}: {err})") from err


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
                (self.partial / "roi" / f"{item_id}.png").unlink(missing_ok=True)
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
            image_hash = phash(pixels.astype(np.float32), IMPORT_HASH_SIZE)
        for kind, layer in (("mask", item.mask), ("region of interest", item.roi)):
            if layer is not None and layer.shape != tuple(size):
                raise ReadError(item.image if isinstance(item.image, Path) else item.id,
                                f"its {kind} is {layer.shape[0]} x {layer.shape[1]}, the image is "
                                f"{size[0]} x {size[1]}")
        if copied:
            shutil.copyfile(item.image, self.partial / "images" / name)
        else:
            Image.fromarray(pixels).save(self.partial / "images" / name)
        if item.mask is not None:
            (self.partial / "masks").mkdir(exist_ok=True)
            dtype = np.uint8 if item.mask.max(initial=0) < 256 else np.uint16
            Image.fromarray(item.mask.astype(dtype)).save(self.partial / "masks" / f"{item.id}.png")
        if item.roi is not None:
            (self.partial / "roi").mkdir(exist_ok=True)
            Image.fromarray(item.roi.astype(np.uint8) * 255).save(self.partial / "roi" / f"{item.id}.png")
        return {"file": name, "label": item.label, "split": item.split, "size": list(size), "mode": mode,
                "phash": f"{image_hash:0{IMPORT_HASH_SIZE ** 2 // 4}x}", "case": item.case, "slice": item.slice}

    def finish(self, spec: TaskSpec, seed: int = 0,
               duplicate_distance: int = IMPORT_DUPLICATE_DISTANCE) -> ImportSummary:
        """Write task.yaml, labels.csv, splits.csv, README.md, problems.csv, duplicates.csv and, for slices of
        volumes, cases.csv (each image's case and slice index); rename to OUT.

        Images whose 256-bit pHashes lie within ``duplicate_distance`` bits (transitively) form a group: re-saved
        and resized copies, one scan under two names (the rule, and the margins measured for it, in
        :mod:`dex.data.dedup`). Items without a split get one by a seeded 60 / 20 / 20 draw of whole groups
        (stratified by class for classification), so no group is on both sides of a split; items without a split in
        a group with a source split join it. Groups that the source's own split puts on both sides are counted and
        listed. ``duplicate_distance < 0`` turns grouping off."""
        if not self.items:
            raise ValueError(f"{self.partial}: no image could be imported ({len(self.problems)} problem(s); "
                             f"first: {self.problems[0] if self.problems else 'no source items found'})")
        ids = sorted(self.items)
        groups = [] if duplicate_distance < 0 else near_duplicate_groups(
            {i: int(self.items[i]["phash"], 16) for i in ids}, duplicate_distance, IMPORT_HASH_SIZE ** 2)
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
            notes.append(f"- Near-duplicates (256-bit pHash within {duplicate_distance} bits): {len(groups)} "
                         f"group(s) of {sum(map(len, groups))} images in `duplicates.csv`; {where}.")
        if (self.partial / "roi").is_dir():
            notes.append("- Regions of interest: `roi/<id>.png` for every image, 255 inside.")
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


def _images_in(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files below ``folder`` (recursively) with one of ``suffixes``, hidden ones left out."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
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
