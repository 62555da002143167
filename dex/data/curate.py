"""MedVerse curation (App. C.1.1, Table 2): raw sources -> normalised 2D images in WebDataset tar shards.

One *unit* of work is one source-relative path: a file, or for DICOM a folder (each series in it is read as one
volume, or each file as one picture). Workers turn units into samples; the main process keeps them in order,
drops near-duplicates within each source, and writes shards. A shard is committed by appending one line to the
part's journal (``journal-<i>-of-<n>.jsonl``: the shard's manifest rows and the outcome of every unit whose
samples are all committed), then renaming ``.tar.tmp`` to ``.tar``. A killed run resumes from the journal: committed
units are skipped, committed samples are not written again, uncommitted shards are discarded.

``finalize`` (run by ``dex curate`` at the end and by ``dex data stats``) reads every part's journal and writes
``manifest.csv``, ``quarantine.csv``, ``index.json`` (what the training loader reads) and ``stats.md``/``stats.json``
(the paper's Table 2 regenerated from what was written).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import secrets
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dex.data.dedup import NearDuplicateIndex, phash
from dex.data.journal import append_record, read_journal
from dex.data.normalize import VOLUME_NORMALIZERS, scale_255
from dex.data.readers import (
    ReadError,
    group_dicom_series,
    read_dicom_pictures,
    read_dicom_series,
    read_nifti,
    read_picture,
    read_video_frames,
    suv_values,
)
from dex.data.recipe import MODALITIES, Recipe, Source
from dex.data.shards import ShardWriter

log = logging.getLogger("dex.curate")

#: Foreground (non-air) pixels of a slice, by normalisation, from (real values, normalised values); and the
#: smallest foreground ratio a slice must have (App. C.1.1: 0.05 for CT and MR, 0.01 for PET).
FOREGROUND = {
    "ct_hu": (lambda raw, norm: raw > -500.0, 0.05),  # the usual body threshold in HU
    "mr_percentile": (lambda raw, norm: norm > 0.1, 0.05),  # above the Rician noise floor of air
    "pet_raw": (lambda raw, norm: norm > 0.05, 0.01),
    "pet_suv": (lambda raw, norm: raw > 0.1, 0.01),  # SUV above a few counts of noise
}
AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
DROP_REASONS = ("foreground", "empty", "constant", "small", "near-duplicate")
QUARANTINED_EXIT = 3


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


@dataclass
class UnitResult:
    unit: Unit
    samples: list[tuple[str, bytes, dict[str, Any]]] = field(default_factory=list)  # (key, png, meta)
    dropped: Counter = field(default_factory=Counter)
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (source-relative path, reason)
    warnings: list[str] = field(default_factory=list)


# --- discovery ---------------------------------------------------------------------------------------------------

def discover_units(recipe: Recipe, source: Source) -> list[Unit]:
    """The units of one source, sorted by key. A missing root gives an empty list (reported by the caller)."""
    root = recipe.root_of(source)
    if root is None or not root.is_dir():
        return []
    if source.index_csv:
        return _units_from_csv(root, source)
    files = sorted(p for p in root.glob(source.pattern) if p.is_file())
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
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as err:
        raise ValueError(f"{path}: cannot read the index CSV of source {source.name!r} ({err})") from err
    units = []
    for line, row in enumerate(rows, start=2):
        if not row.get("path") or row.get("modality") not in MODALITIES:
            raise ValueError(f"{path}:{line}: needs a path and a modality in {list(MODALITIES)}, got {row}")
        units.append(Unit(source.name, row["path"], row["modality"], row.get("anatomy") or source.anatomy))
    return sorted(units, key=lambda u: u.key)


def part_of(unit: Unit, parts: int) -> int:
    """The partition a unit belongs to: stable across runs and machines."""
    return zlib.crc32(f"{unit.source}/{unit.key}".encode()) % parts


# --- one unit ----------------------------------------------------------------------------------------------------

def _study_hash(salt: str, study: str) -> str:
    return hashlib.sha256(f"{salt}|{study}".encode()).hexdigest()[:16]


def _sample_key(unit: Unit, series: str, index: int) -> str:
    digest = hashlib.sha1(f"{unit.key}|{series}|{index}".encode()).hexdigest()[:20]
    return f"{unit.source}-{digest}"


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


class _UnitWork:
    """Collects the samples of one unit."""

    def __init__(self, unit: Unit, source: Source, root: Path, salt: str, options: CurateOptions) -> None:
        self.unit, self.source, self.root, self.salt, self.options = unit, source, root, salt, options
        self.result = UnitResult(unit)
        top = unit.key.split("/")[0] if "/" in unit.key else Path(unit.key).stem
        self.default_study = _study_hash(salt, f"{unit.source}/{top}")  # a folder or file per patient

    def add(self, image: np.ndarray, index: int, bits: int, series: str = "", study: str | None = None) -> None:
        problem = _problem(image, self.options)
        if problem:
            self.result.dropped[problem] += 1
            return
        height, width = image.shape[:2]
        channels = image.shape[2] if image.ndim == 3 else 1
        if channels == 3:
            bits = 8  # PNG encoders take 16-bit grey but not 16-bit colour; colour images are 8-bit in practice
        key = _sample_key(self.unit, series, index)
        meta = {
            "key": key, "source": self.unit.source, "modality": self.unit.modality, "anatomy": self.unit.anatomy,
            "path": self.unit.key, "index": index, "phash": f"{phash(image):016x}",
            "study": study or self.default_study, "height": height, "width": width, "channels": channels,
            "bits": bits,
        }
        self.result.samples.append((key, _encode_png(image, bits, self.options.png_level), meta))

    def add_volume(self, values: np.ndarray, series: str = "", study: str | None = None) -> None:
        normalization = self.source.normalization
        if normalization not in VOLUME_NORMALIZERS:
            raise ReadError(self.root / self.unit.key, f"a volume needs a volume normalisation, not {normalization!r}")
        normalised = VOLUME_NORMALIZERS[normalization](values)
        is_foreground, min_ratio = FOREGROUND[normalization]
        axis = AXES[self.source.slice_axis]
        for index in range(values.shape[axis]):
            raw, norm = np.take(values, index, axis), np.take(normalised, index, axis)
            if is_foreground(raw, norm).mean() < min_ratio:
                self.result.dropped["foreground"] += 1
                continue
            self.add(norm, index, 16, series, study)

    def add_picture(self, pixels: np.ndarray, max_value: float, index: int = -1, series: str = "",
                    study: str | None = None) -> None:
        if self.source.normalization != "scale_255":
            raise ReadError(self.root / self.unit.key, f"a 2D image needs scale_255, not {self.source.normalization!r}")
        self.add(scale_255(pixels, max_value), index, 8 if max_value == 255 else 16, series, study)


def process_unit(unit: Unit, source: Source, root: str, salt: str, options: CurateOptions) -> UnitResult:
    """Read, normalise, slice, filter and encode one unit; a file that cannot be read is quarantined."""
    work = _UnitWork(unit, source, Path(root), salt, options)
    path = Path(root) / unit.key
    try:
        if source.format == "dicom":
            _process_dicom(work)
        elif source.format == "nifti":
            for t, volume in enumerate(read_nifti(path)):
                work.add_volume(volume.values, series=str(t))
        elif source.format == "npy":
            _process_npy(work, path)
        elif source.format == "video":
            for index, frame in read_video_frames(path, source.frame_stride):
                work.add_picture(frame, 255.0, index)
        else:
            picture = read_picture(path)
            work.add_picture(picture.pixels, picture.max_value)
    except ReadError as err:
        work.result.quarantined.append((_relative(err.path, root), err.reason))
        work.result.samples.clear()  # a unit is written whole or not at all
    except Exception as err:  # any other failure on this unit's bytes: record it and go on with the rest
        work.result.quarantined.append((unit.key, f"{type(err).__name__}: {err}"))
        work.result.samples.clear()
    return work.result


def _relative(path: str, root: str) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def _process_dicom(work: _UnitWork) -> None:
    root, unit, source = work.root, work.unit, work.source
    for series_uid, paths in sorted(group_dicom_series([root / f for f in unit.files]).items()):
        series = hashlib.sha1(series_uid.encode()).hexdigest()[:12]  # the UID itself is never stored
        if source.normalization in VOLUME_NORMALIZERS:
            volume = read_dicom_series(sorted(paths))
            values = suv_values(volume, paths[0]) if source.normalization == "pet_suv" else volume.values
            _note_burned_in(work, volume.meta, paths[0])
            work.add_volume(values, series, _study_hash(work.salt, volume.meta["study_uid"]))
        else:
            for path in sorted(paths):
                frames, meta = read_dicom_pictures(path, source.frame_stride)
                _note_burned_in(work, meta, path)
                for index, picture in frames:
                    file_series = f"{series}/{path.name}"
                    work.add_picture(picture.pixels, picture.max_value, index, file_series,
                                     _study_hash(work.salt, meta["study_uid"]))


def _note_burned_in(work: _UnitWork, meta: dict[str, Any], path: Path) -> None:
    if meta["burned_in_annotation"]:
        work.result.warnings.append(
            f"{work.unit.source}: {_relative(str(path), str(work.root))}: BurnedInAnnotation is YES; the pixels may "
            "show identifying text, which curation does not remove")


def _process_npy(work: _UnitWork, path: Path) -> None:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ReadError(path, f"not a readable .npy array ({type(err).__name__}: {err})") from err
    if not np.isfinite(array).all():
        raise ReadError(path, "contains NaN or infinite values")
    is_picture = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if is_picture and work.source.normalization == "scale_255":
        array = array[..., :3] if array.ndim == 3 else array
        if array.dtype.kind in "ui":
            work.add_picture(array, float(np.iinfo(array.dtype).max if array.dtype.itemsize > 1 else 255))
        else:  # floats: already in [0, 1], or 8-bit values stored as floats
            work.add_picture(array, 255.0 if array.max() > 1.0 else 1.0)
    elif array.ndim == 3:
        work.add_volume(array.astype(np.float32))
    else:
        raise ReadError(path, f"expected a 2D image or a 3D volume, found shape {array.shape}")


# --- the run -----------------------------------------------------------------------------------------------------

def _salt(out: Path) -> str:
    """The run's salt for study hashes: created once, atomically, and shared by every part."""
    path = out / "salt.txt"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(16) + "\n")
    return path.read_text().strip()


def _parse_part(part: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", part)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"--part must be i/N with 0 <= i < N, got {part!r}")
    return int(match.group(1)), int(match.group(2))


@dataclass
class CurateSummary:
    written: int
    dropped: dict[str, int]
    quarantined: int
    skipped_sources: list[str]


def curate(recipe_path: str | Path, out: str | Path, workers: int = 1, resume: bool = False, part: str = "0/1",
           options: CurateOptions | None = None, progress: bool = True) -> CurateSummary:
    """Curate the recipe's sources into ``out`` (this part only when ``part`` is i/N with N > 1)."""
    options = options or CurateOptions()
    recipe = Recipe.load(recipe_path)
    out = Path(out)
    index, parts = _parse_part(part)
    tag = f"{index}-of-{parts}"
    journal_path = out / f"journal-{tag}.jsonl"
    if journal_path.exists() and not resume:
        raise ValueError(f"{out} already holds a curation ({journal_path.name}); pass --resume to continue it, "
                         "or choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    salt = _salt(out)
    shards_dir = out / "shards"
    records = read_journal(journal_path, repair=True)
    committed = _recover_shards(shards_dir, tag, records)
    done_units = {(o["source"], o["unit"]) for r in records for o in r["units"]}
    committed_keys = {row["key"] for r in records for row in r["rows"]}
    dedup: dict[str, NearDuplicateIndex] = defaultdict(lambda: NearDuplicateIndex(options.dedup_distance))
    for r in records:
        for row in r["rows"]:
            dedup[row["source"]].add(int(row["phash"], 16))

    skipped, jobs = [], []
    for source in recipe.sources:
        root = recipe.root_of(source)
        if root is None or not root.is_dir():
            skipped.append(source.name)
            log.warning("source %s: root %s is %s; skipped", source.name, source.root or "(empty)",
                        "not set" if root is None else "missing")
            continue
        for unit in discover_units(recipe, source):
            if part_of(unit, parts) == index and (unit.source, unit.key) not in done_units:
                jobs.append((unit, source, str(root), salt, options))
    header = {"type": "header", "recipe": recipe.name, "sources": [asdict(s) for s in recipe.sources],
              "dedup_distance": options.dedup_distance, "rows": [], "units": [], "shard": None}
    if not records:
        append_record(journal_path, header)
        records.append(header)
    elif (records[0]["sources"], records[0]["dedup_distance"]) != (header["sources"], header["dedup_distance"]):
        raise ValueError(f"{recipe_path}: the recipe or options changed since {journal_path} was started; "
                         "resume with the same ones, or curate into a new folder")
    writer = ShardWriterForPart(shards_dir, tag, committed + 1, options.shard_samples, journal_path)
    totals: Counter = Counter()
    results = _map(jobs, workers)
    with tqdm(total=len(jobs), desc=f"curate {tag}", unit="unit", disable=not progress) as bar:
        for result in results:
            for message in result.warnings:
                log.warning("%s", message)
            outcome = {"source": result.unit.source, "unit": result.unit.key, "written": 0,
                       "dropped": dict(result.dropped), "quarantined": result.quarantined}
            for key, png, meta in result.samples:
                if key in committed_keys:
                    continue
                if not dedup[meta["source"]].add(int(meta["phash"], 16)):
                    outcome["dropped"]["near-duplicate"] = outcome["dropped"].get("near-duplicate", 0) + 1
                    continue
                writer.add(key, png, meta)
                outcome["written"] += 1
            writer.unit_done(outcome)
            totals.update({"written": outcome["written"], "quarantined": len(result.quarantined)})
            totals.update({f"dropped:{k}": v for k, v in outcome["dropped"].items()})
            bar.update()
            bar.set_postfix(written=totals["written"], quarantined=totals["quarantined"])
    writer.finish()
    if parts == 1:
        finalize(out)
    all_records = read_journal(journal_path)
    dropped = Counter()
    for r in all_records:
        for o in r["units"]:
            dropped.update(o["dropped"])
    return CurateSummary(
        written=sum(len(r["rows"]) for r in all_records), dropped=dict(dropped),
        quarantined=sum(len(o["quarantined"]) for r in all_records for o in r["units"]), skipped_sources=skipped,
    )


def _map(jobs: list[tuple], workers: int) -> Iterator[UnitResult]:
    """Results in job order (so the output does not depend on the number of workers), with a bounded number of
    units in flight so memory stays flat however many units there are."""
    if workers <= 1:
        yield from (process_unit(*job) for job in jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(process_unit, *job))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _recover_shards(shards_dir: Path, tag: str, records: list[dict[str, Any]]) -> int:
    """Make the shard folder agree with the journal; returns the last committed shard number (0 if none).

    A committed shard whose rename was interrupted is renamed now; a ``.tmp`` the journal does not name was cut
    by a kill and is removed, as is a ``.tar`` the journal does not name.
    """
    names = {r["shard"] for r in records if r.get("shard")}
    if shards_dir.is_dir():
        for path in shards_dir.glob(f"{tag}-*.tar.tmp"):
            final = path.with_suffix("")
            if final.name in names:
                path.replace(final)
            else:
                path.unlink()
        for path in shards_dir.glob(f"{tag}-*.tar"):
            if path.name not in names:
                path.unlink()
    missing = sorted(n for n in names if not (shards_dir / n).is_file())
    if missing:
        raise ValueError(f"{shards_dir}: the journal names shards that are gone: {missing[:5]}")
    return max((int(n.rsplit("-", 1)[1].split(".")[0]) for n in names), default=0)


class ShardWriterForPart:
    """Couples the shard writer with the journal: commit = journal line, then rename."""

    def __init__(self, shards_dir: Path, tag: str, next_seq: int, max_samples: int, journal: Path) -> None:
        self.writer = ShardWriter(shards_dir, tag, next_seq, max_samples)
        self.journal = journal
        self.rows: list[dict[str, Any]] = []
        self.done: list[dict[str, Any]] = []  # outcomes of units whose samples are all added

    def add(self, key: str, png: bytes, meta: dict[str, Any]) -> None:
        self.writer.add(key, png, meta)
        self.rows.append(meta)
        if self.writer.full:
            self.commit()

    def unit_done(self, outcome: dict[str, Any]) -> None:
        self.done.append(outcome)

    def commit(self) -> None:
        closed = self.writer.close()
        if closed is None and not self.done:
            return
        name, tmp = closed if closed else (None, None)
        append_record(self.journal, {"type": "commit", "shard": name, "rows": self.rows, "units": self.done})
        if tmp is not None:
            tmp.replace(tmp.with_suffix(""))
        self.rows, self.done = [], []

    def finish(self) -> None:
        self.commit()


# --- reports -----------------------------------------------------------------------------------------------------

def finalize(out: str | Path) -> dict[str, Any]:
    """Merge every part's journal into manifest.csv, quarantine.csv, index.json and stats.md / stats.json.

    Near-duplicates across parts (each part deduplicates only its own units) are excluded here, keeping the first
    in part order.
    """
    out = Path(out)
    journals = sorted(out.glob("journal-*-of-*.jsonl"))
    if not journals:
        raise ValueError(f"{out}: no curation journal found (run dex curate first)")
    sources: dict[str, dict[str, Any]] = {}
    rows, outcomes, shards = [], [], []
    distance = 0
    for path in journals:
        for record in read_journal(path):
            if record["type"] == "header":
                sources.update({s["name"]: s for s in record["sources"]})
                distance = record["dedup_distance"]
                continue
            rows += record["rows"]
            outcomes += record["units"]
            if record["shard"]:
                keys = {row["key"] for row in record["rows"]}
                shards.append({"name": record["shard"], "samples": len(keys), "keys": keys})
    excluded = _cross_part_duplicates(rows, len(journals), distance)
    kept = [r for r in rows if r["key"] not in excluded]
    for shard in shards:
        shard["samples"] -= len(shard.pop("keys") & excluded)
    fields = ["key", "source", "modality", "anatomy", "path", "index", "height", "width", "channels", "bits",
              "phash", "study"]
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    with open(out / "quarantine.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["source", "path", "reason"])
        writer.writerows([o["source"], path, reason] for o in outcomes for path, reason in o["quarantined"])
    stats = _stats(sources, kept, outcomes, len(excluded))
    index = {"shards": shards, "samples": len(kept), "exclude": sorted(excluded),
             "modalities": stats["modalities"]}
    _write_json(out / "index.json", index)
    _write_json(out / "stats.json", stats)
    (out / "stats.md").write_text(stats_markdown(stats))
    return stats


def _cross_part_duplicates(rows: list[dict[str, Any]], parts: int, distance: int) -> set[str]:
    if parts <= 1:
        return set()
    seen: dict[str, NearDuplicateIndex] = {}
    excluded = set()
    for row in rows:
        index = seen.setdefault(row["source"], NearDuplicateIndex(distance))
        if not index.add(int(row["phash"], 16)):
            excluded.add(row["key"])
    return excluded


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def _stats(sources: dict[str, dict[str, Any]], rows, outcomes, cross_part: int) -> dict[str, Any]:
    written = Counter(r["source"] for r in rows)
    dropped: dict[str, Counter] = defaultdict(Counter)
    quarantined = Counter()
    for o in outcomes:
        dropped[o["source"]].update(o["dropped"])
        quarantined[o["source"]] += len(o["quarantined"])
    per_source = []
    for name, source in sources.items():
        per_source.append({
            "name": name, "modality": source["modality"], "anatomy": source["anatomy"],
            "normalization": source["normalization"], "images": written[name],
            "reported": source.get("reported_count"), "dropped": dict(dropped[name]),
            "quarantined": quarantined[name],
        })
    modalities = Counter(r["modality"] for r in rows)
    return {"sources": per_source, "modalities": {m: modalities[m] for m in MODALITIES if modalities[m]},
            "total": len(rows), "cross_part_duplicates": cross_part}


NORMALIZATION_LABELS = {
    "ct_hu": "(clip(x, [-200, 400]) + 200) / 600", "mr_percentile": "clip(x, [p1, p99]), min-max",
    "pet_raw": "clip(x, [p1, p99]), z-score, min-max", "pet_suv": "clip(x, [0, 20]) / 20",
    "scale_255": "x / 255 (16-bit: x / 65535)",
}


def stats_markdown(stats: dict[str, Any]) -> str:
    """Table 2 of the paper, regenerated from what was written, with what was dropped and why."""
    lines = ["# Curated collection", "",
             "| Dataset | Modality | Anatomy | Images (slices) | Paper reports | Normalization | Dropped | Quarantined |",
             "| --- | --- | --- | ---: | ---: | --- | --- | ---: |"]
    for s in stats["sources"]:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "-"
        reported = f"{s['reported']:,}" if s["reported"] is not None else "-"
        lines.append(f"| {s['name']} | {s['modality']} | {s['anatomy']} | {s['images']:,} | {reported} | "
                     f"{NORMALIZATION_LABELS[s['normalization']]} | {dropped} | {s['quarantined']} |")
    lines.append(f"| **Total** | | | **{stats['total']:,}** | | | | |")
    lines += ["", "| Modality | Images |", "| --- | ---: |"]
    lines += [f"| {m} | {n:,} |" for m, n in stats["modalities"].items()]
    if stats["cross_part_duplicates"]:
        lines += ["", f"Near-duplicates across parts excluded at merge: {stats['cross_part_duplicates']}."]
    return "\n".join(lines) + "\n"
