"""MedVerse curation (App. C.1.1, Table 2): raw sources -> normalised 2D images in WebDataset tar shards.

One *unit* of work is one source-relative path: a file, or for DICOM a folder (each series in it is read as one
volume, or each file as one picture). Workers turn units into samples; the main process keeps them in order,
drops near-duplicates within each source, and writes shards. A shard is committed by appending one line to the
part's journal (``journal-<i>-of-<n>.jsonl``: the shard's manifest rows, size and SHA-256, and the outcome of every
unit whose samples are all committed), then renaming ``.tar.tmp`` to ``.tar``. A killed run resumes from the
journal: committed units are skipped, committed samples are not written again, uncommitted shards are discarded.

Nothing in the collection names a source file: a sample carries its recipe source and a salted hash of its unit's
path (``unit``), and its key is a salted hash too. What names files by path, for the curator only, lives in
``private/``: the salt, the part's private journal (each committed unit's path, the path of every image written,
dropped or quarantined), and the reports ``finalize`` makes from it (``paths.csv``, ``dropped.csv``,
``quarantine.csv``) and ``curate.log``.

``finalize`` (run by ``dex curate`` at the end and by ``dex data stats``) reads every part's journals and writes
``manifest.csv``, ``index.json`` (what the training loader reads; each shard's sample count, size and SHA-256),
``stats.md``/``stats.json`` (the paper's Table 2 regenerated from what was written) and the private reports.
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
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dex.config import ConfigError
from dex.data.dedup import NearDuplicateIndex, phash
from dex.data.journal import append_record, append_records, read_journal
from dex.data.normalize import VOLUME_NORMALIZERS, normalize_volume, scale_255
from dex.data.readers import (
    SLICE_AXES,
    Problem,
    ReadError,
    array_picture,
    group_dicom_series,
    is_array_picture,
    read_dicom_pictures,
    read_dicom_series,
    read_nifti,
    read_npy,
    read_picture,
    read_video_frames,
    suv_values,
)
from dex.data.recipe import MODALITIES, Recipe, Source, canonical_modality
from dex.data.shards import INDEX, ShardWriter, read_index, shard_problem
from dex.data.tasks import load_task
from dex.files import write_json
from dex.parallel import ordered_map

log = logging.getLogger("dex.curate")

#: Foreground (non-air) pixels of a slice, by normalisation, from (real values, normalised values); and the
#: smallest foreground ratio a slice must have (App. C.1.1: 0.05 for CT and MR, 0.01 for PET).
FOREGROUND = {
    "ct_hu": (lambda raw, norm: raw > -500.0, 0.05),  # the usual body threshold in HU
    "mr_percentile": (lambda raw, norm: norm > 0.1, 0.05),  # above the Rician noise floor of air
    "pet_raw": (lambda raw, norm: norm > 0.05, 0.01),
    "pet_suv": (lambda raw, norm: raw > 0.1, 0.01),  # SUV above a few counts of noise
}
#: Why an image is dropped, with the words stats.md uses.
DROP_LABELS = {"foreground": "too little foreground (volume slices)", "empty": "empty (all zero)",
               "constant": "constant", "small": "smaller than --min-size",
               "near-duplicate": "near-duplicate of a kept image"}
DROP_REASONS = tuple(DROP_LABELS)
QUARANTINED_EXIT = 3
PRIVATE = "private"  # the output's folder for what names source files; nothing else reads from it
#: Source fields that may name folders (roots, patterns, index files): kept out of the collection's journal.
PATH_FIELDS = ("root", "pattern", "index_csv")


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

def _salted(salt: str, text: str, length: int = 16) -> str:
    return hashlib.sha256(f"{salt}|{text}".encode()).hexdigest()[:length]


def unit_id(salt: str, unit: Unit) -> str:
    """The name of a unit in the collection: a salted hash of its source and path (the path never appears)."""
    return _salted(salt, f"unit|{unit.source}/{unit.key}")


def _study_hash(salt: str, study: str) -> str:
    return _salted(salt, study)


def _sample_key(salt: str, unit: Unit, series: str, index: int) -> str:
    return f"{unit.source}-{_salted(salt, f'sample|{unit.key}|{series}|{index}', 20)}"


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
        self.result = UnitResult(unit, unit_id(salt, unit))
        top = unit.key.split("/")[0] if "/" in unit.key else Path(unit.key).stem
        self.default_study = _study_hash(salt, f"{unit.source}/{top}")  # a folder or file per patient

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
        key = _sample_key(self.salt, self.unit, series, index)
        meta = {
            "key": key, "source": self.unit.source, "modality": self.unit.modality, "anatomy": self.unit.anatomy,
            "unit": self.result.unit_id, "index": index, "phash": f"{phash(image):016x}",
            "study": study or self.default_study, "height": height, "width": width, "channels": channels,
            "bits": bits, **({"report_type": self.unit.report_type} if self.unit.report is not None else {}),
        }
        self.result.samples.append((key, _encode_png(image, bits, self.options.png_level), meta, origin))

    def add_volume(self, values: np.ndarray, series: str = "", study: str | None = None,
                   slice_files: tuple[Path, ...] = (), label: str = "") -> None:
        """Slices of a [Z, Y, X] volume along the source's axis; ``slice_files`` (axial DICOM series) name the file
        of each slice in the private reports, else ``label`` + the slice number does."""
        normalization = self.source.normalization
        if normalization not in VOLUME_NORMALIZERS:
            raise ReadError(self.root / self.unit.key, f"a volume needs a volume normalisation, not {normalization!r}")
        normalised = normalize_volume(values, normalization)
        is_foreground, min_ratio = FOREGROUND[normalization]
        axis = SLICE_AXES[self.source.slice_axis]
        for index in range(values.shape[axis]):
            if slice_files and axis == 0:
                origin = (_relative(slice_files[index], self.root), "")
            else:
                origin = (self.unit.key, f"{label}{self.source.slice_axis} slice {index}")
            raw, norm = np.take(values, index, axis), np.take(normalised, index, axis)
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
    root, unit, source = work.root, work.unit, work.source
    unreadable: list[Problem] = []
    series_files = group_dicom_series([root / f for f in unit.files], unreadable)
    for series_uid, paths in sorted(series_files.items()):
        series = hashlib.sha1(series_uid.encode()).hexdigest()[:12]  # the UID itself is never stored
        try:
            if source.normalization in VOLUME_NORMALIZERS:
                volume = read_dicom_series(sorted(paths), unreadable)
                values = suv_values(volume, paths[0]) if source.normalization == "pet_suv" else volume.values
                _note_burned_in(work, volume.meta, paths[0])
                work.add_volume(values, series, _study_hash(work.salt, volume.meta["study_uid"]), volume.slice_files)
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
                                         _study_hash(work.salt, meta["study_uid"]),
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


# --- the run -----------------------------------------------------------------------------------------------------

SALT = re.compile(r"[0-9a-f]{32}")


def private_folder(out: str | Path) -> Path:
    """``OUT/private``, made readable by its owner only."""
    folder = Path(out) / PRIVATE
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _salt(out: Path) -> str:
    """The collection's salt (``private/salt.txt``), shared by every part: made in a temporary file and linked into
    place, so that it exists whole or not at all, whoever wins a race between parts and wherever a kill falls."""
    folder = private_folder(out)
    path = folder / "salt.txt"
    if not path.exists():
        tmp = folder / f".salt-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
                handle.write(secrets.token_hex(16) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)  # fails if another part linked its salt first: then that one is used
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    salt = path.read_text().strip()
    if not SALT.fullmatch(salt):
        raise ValueError(f"{path}: the salt is {'empty' if not salt else 'malformed'} (32 hex digits expected); "
                         "every hash of this collection depends on it: restore the file, or curate into a new folder")
    return salt


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


def _public_sources(recipe: Recipe, salt: str) -> tuple[list[dict[str, Any]], str]:
    """The sources as the collection may show them (no roots, patterns or index files), and a salted digest of
    everything about them, to tell on resume whether the recipe changed."""
    full = [asdict(s) for s in recipe.sources]
    public = [{k: v for k, v in s.items() if k not in PATH_FIELDS} for s in full]
    described = [full, [asdict(h) for h in recipe.hold_out]] if recipe.hold_out else full
    return public, _salted(salt, json.dumps(described, sort_keys=True), 64)


def curate(recipe_path: str | Path, out: str | Path, workers: int = 1, resume: bool = False, part: str = "0/1",
           options: CurateOptions | None = None, progress: bool = True) -> CurateSummary:
    """Curate the recipe's sources into ``out`` (this part only when ``part`` is i/N with N > 1)."""
    options = options or CurateOptions()
    recipe = Recipe.load(recipe_path)
    out = Path(out)
    index, parts = _parse_part(part)
    tag = f"{index}-of-{parts}"
    journal_path = out / f"journal-{tag}.jsonl"
    private_journal = out / PRIVATE / f"journal-{tag}.jsonl"
    if journal_path.exists() and not resume:
        raise ValueError(f"{out} already holds a curation ({journal_path.name}); pass --resume to continue it, "
                         "or choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    salt = _salt(out)
    shards_dir = out / "shards"
    records = read_journal(journal_path, repair=True)
    read_journal(private_journal, repair=True)  # only to cut a record a kill left half-written
    committed = _recover_shards(shards_dir, tag, records)
    done_units = {(o["source"], o["unit"]) for r in records for o in r["units"]}
    committed_keys = {row["key"] for r in records for row in r["rows"]}
    dedup: dict[str, NearDuplicateIndex] = defaultdict(lambda: NearDuplicateIndex(options.dedup_distance))
    for r in records:
        for row in r["rows"]:
            dedup[row["source"]].add(int(row["phash"], 16))

    skipped, jobs = [], []
    held_out = held_out_files(recipe)
    if held_out:
        log.info("hold_out: %d images of %d task split(s) kept out of the collection", len(held_out),
                 sum(len(h.splits) for h in recipe.hold_out))
    for source in recipe.sources:
        root = recipe.root_of(source)
        if root is None or not root.is_dir():
            skipped.append(source.name)
            log.warning("source %s: root %s is %s; skipped", source.name, source.root or "(empty)",
                        "not set" if root is None else "missing")
            continue
        for unit in discover_units(recipe, source, held_out):
            if part_of(unit, parts) == index and (unit.source, unit_id(salt, unit)) not in done_units:
                jobs.append((unit, source, str(root), salt, options))
    sources, digest = _public_sources(recipe, salt)
    header = {"type": "header", "recipe": recipe.name, "sources": sources, "sources_digest": digest,
              "dedup_distance": options.dedup_distance, "rows": [], "units": [], "shard": None}
    if not records:
        append_record(journal_path, header)
        records.append(header)
    elif ((records[0].get("sources_digest"), records[0]["dedup_distance"])
          != (header["sources_digest"], header["dedup_distance"])):
        raise ValueError(f"{recipe_path}: the recipe or options changed since {journal_path} was started; "
                         "resume with the same ones, or curate into a new folder")
    writer = ShardWriterForPart(shards_dir, tag, committed + 1, options.shard_samples, journal_path, private_journal)
    totals: Counter = Counter()
    with tqdm(total=len(jobs), desc=f"curate {tag}", unit="unit", disable=not progress) as bar:
        for result in ordered_map(process_unit, jobs, workers):
            for message in result.warnings:
                log.warning("%s", message)
            for problem in result.quarantined:
                log.warning("%s: %s: quarantined: %s", result.unit.source, problem.path, problem.reason)
            private = {"source": result.unit.source, "unit": result.unit_id, "path": result.unit.key,
                       "written": [], "dropped": list(result.dropped), "quarantined": list(result.quarantined)}
            for key, png, meta, origin in result.samples:
                if key in committed_keys:  # in a shard committed before a kill cut this unit short
                    private["written"].append((key, *origin))
                    continue
                if not dedup[meta["source"]].add(int(meta["phash"], 16)):
                    private["dropped"].append((*origin, "near-duplicate"))
                    continue
                writer.add(key, png, meta, result.unit.report)
                private["written"].append((key, *origin))
            outcome = {"source": result.unit.source, "unit": result.unit_id, "written": len(private["written"]),
                       "dropped": dict(Counter(reason for *_, reason in private["dropped"])),
                       "quarantined": len(result.quarantined)}
            writer.unit_done(outcome, private)
            totals.update({"written": outcome["written"], "quarantined": outcome["quarantined"]})
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
        quarantined=sum(o["quarantined"] for r in all_records for o in r["units"]), skipped_sources=skipped,
    )


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
    """Couples the shard writer with the journals: commit = private records, journal line, then rename."""

    def __init__(self, shards_dir: Path, tag: str, next_seq: int, max_samples: int, journal: Path,
                 private_journal: Path) -> None:
        self.writer = ShardWriter(shards_dir, tag, next_seq, max_samples)
        self.journal, self.private_journal = journal, private_journal
        self.rows: list[dict[str, Any]] = []
        self.done: list[dict[str, Any]] = []  # outcomes of units whose samples are all added
        self.private: list[dict[str, Any]] = []  # their path-bearing records

    def add(self, key: str, png: bytes, meta: dict[str, Any], report: str | None = None) -> None:
        self.writer.add(key, png, meta, report)
        self.rows.append(meta)
        if self.writer.full:
            self.commit()

    def unit_done(self, outcome: dict[str, Any], private: dict[str, Any]) -> None:
        self.done.append(outcome)
        self.private.append(private)

    def commit(self) -> None:
        closed = self.writer.close()
        if closed is None and not self.done:
            return
        if self.private:  # first, so that a committed unit always has its private record (duplicates are merged)
            append_records(self.private_journal, self.private)
        shard = {"shard": closed.name, "bytes": closed.size, "sha256": closed.sha256} if closed else {"shard": None}
        append_record(self.journal, {"type": "commit", **shard, "rows": self.rows, "units": self.done})
        if closed is not None:
            closed.tmp.replace(closed.tmp.with_suffix(""))
        self.rows, self.done, self.private = [], [], []

    def finish(self) -> None:
        self.commit()


# --- reports -----------------------------------------------------------------------------------------------------

MANIFEST_FIELDS = ["key", "source", "modality", "anatomy", "unit", "index", "height", "width", "channels", "bits",
                   "phash", "study", "report_type"]


def finalize(out: str | Path) -> dict[str, Any]:
    """Merge every part's journals into manifest.csv, index.json, stats.md / stats.json and the private reports
    (paths.csv, dropped.csv, quarantine.csv).

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
                shards.append({"name": record["shard"], "samples": len(keys), "stored": len(keys),
                               "bytes": record["bytes"], "sha256": record["sha256"], "keys": keys})
    private = _private_records(out, journals, {o["unit"] for o in outcomes})
    excluded = _cross_part_duplicates(rows, len(journals), distance)
    kept = [r for r in rows if r["key"] not in excluded]
    for shard in shards:
        shard["samples"] -= len(shard.pop("keys") & excluded)
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    stats = _stats(sources, kept, outcomes, len(excluded))
    report_types = Counter(r["report_type"] for r in kept if r.get("report_type"))
    index = {"shards": shards, "samples": len(kept), "exclude": sorted(excluded),
             "modalities": stats["modalities"], **({"report_types": dict(sorted(report_types.items()))}
                                                   if report_types else {})}
    write_json(out / INDEX, index)
    write_json(out / "stats.json", stats)
    (out / "stats.md").write_text(stats_markdown(stats))
    _write_private_reports(private_folder(out), private, excluded)
    return stats


def verify(out: str | Path) -> tuple[int, list[Problem]]:
    """Check every shard of a finished collection against ``index.json``: there, of its recorded size and SHA-256,
    and no other shard beside it. Returns the number of shards listed and the problems (shard, reason)."""
    out = Path(out)
    shards = read_index(out)["shards"]
    problems = [Problem(shard["name"], problem) for shard in shards
                if (problem := shard_problem(out, shard, check_hash=True))]
    listed = {shard["name"] for shard in shards}
    problems += [Problem(path.name, "not in index.json (left by an unfinished part? run dex data stats)")
                 for path in sorted((out / "shards").glob("*.tar")) if path.name not in listed]
    return len(shards), problems


def _private_records(out: Path, journals: list[Path], committed: set[str]) -> list[dict[str, Any]]:
    """The private record of every committed unit, once (a kill between the private and the main journal leaves a
    record of an uncommitted unit, and its redo a second one: the last wins)."""
    by_unit: dict[str, dict[str, Any]] = {}
    for journal in journals:
        for record in read_journal(out / PRIVATE / journal.name):
            if record["unit"] in committed:
                by_unit[record["unit"]] = record
    return list(by_unit.values())


def _write_private_reports(folder: Path, records: list[dict[str, Any]], excluded: set[str]) -> None:
    written, dropped, quarantined = [], [], []
    for record in sorted(records, key=lambda r: (r["source"], r["path"])):
        source = record["source"]
        for key, path, where in record["written"]:
            if key in excluded:  # a near-duplicate of an image of an earlier part
                dropped.append([source, path, where, "near-duplicate"])
            else:
                written.append([key, record["unit"], source, path, where])
        dropped += [[source, path, where, reason] for path, where, reason in record["dropped"]]
        quarantined += [[source, path, reason] for path, reason in record["quarantined"]]
    for name, header, table in (("paths.csv", ["key", "unit", "source", "path", "where"], written),
                                ("dropped.csv", ["source", "path", "where", "reason"], dropped),
                                ("quarantine.csv", ["source", "path", "reason"], quarantined)):
        with open(folder / name, "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(table)


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


def _stats(sources: dict[str, dict[str, Any]], rows, outcomes, cross_part: int) -> dict[str, Any]:
    written = Counter(r["source"] for r in rows)
    dropped: dict[str, Counter] = defaultdict(Counter)
    quarantined = Counter()
    for o in outcomes:
        dropped[o["source"]].update(o["dropped"])
        quarantined[o["source"]] += o["quarantined"]
    per_source = []
    for name, source in sources.items():
        per_source.append({
            "name": name, "modality": source["modality"], "anatomy": source["anatomy"],
            "normalization": source["normalization"], "images": written[name],
            "reported": source.get("reported_count"), "dropped": dict(dropped[name]),
            "quarantined": quarantined[name],
        })
    modalities = Counter(r["modality"] for r in rows)
    by_reason = sum(dropped.values(), Counter())
    if cross_part:
        by_reason["near-duplicate"] += cross_part
    return {"sources": per_source, "modalities": {m: modalities[m] for m in MODALITIES if modalities[m]},
            "total": len(rows), "cross_part_duplicates": cross_part,
            "dropped": {reason: by_reason[reason] for reason in DROP_REASONS if by_reason[reason]},
            "quarantined": sum(quarantined.values())}


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
    lines += ["", "| Dropped because | Images |", "| --- | ---: |"]
    lines += [f"| {DROP_LABELS[reason]} | {n:,} |" for reason, n in stats["dropped"].items()] or ["| (none) | 0 |"]
    lines += [f"| **Files quarantined** (unreadable) | {stats['quarantined']:,} |"]
    if stats["cross_part_duplicates"]:
        lines += ["", f"Near-duplicates across parts excluded at merge: {stats['cross_part_duplicates']}."]
    lines += ["", f"Every dropped image and quarantined file is listed, by path, in `{PRIVATE}/dropped.csv` and "
                  f"`{PRIVATE}/quarantine.csv`: for the curator only; never share `{PRIVATE}/`."]
    return "\n".join(lines) + "\n"
