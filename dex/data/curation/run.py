"""A curation run (one part of it, with ``--part i/N``): its units through the workers, in order, into shards
committed by the part's journals, and how a killed run resumes from them.

A shard is committed by appending one line to the part's journal (``journal-<i>-of-<n>.jsonl``: the shard's manifest
rows, size and SHA-256, and the outcome of every unit whose samples are all committed), after the private journal's
lines for those units, then renaming ``.tar.tmp`` to ``.tar``. A killed run resumes from the journal: committed units
are skipped, committed samples are not written again, uncommitted shards are discarded. A part that has written every
unit ends its journal with an ``end`` record, without which :func:`~dex.data.curation.collection.finalize` refuses
to merge the parts.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dex.config import parse_part
from dex.data.curation.collection import finalize
from dex.data.curation.privacy import PRIVATE, public_sources, read_salt, unit_id
from dex.data.curation.units import (
    CurateOptions,
    UnitResult,
    discover_units,
    held_out_files,
    part_of,
    process_unit,
)
from dex.data.dedup import NearDuplicateIndex
from dex.data.journal import append_record, append_records, read_journal
from dex.data.recipe import Recipe
from dex.data.shards import ShardWriter
from dex.parallel import ordered_map

log = logging.getLogger("dex.curate")


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
    index, parts = parse_part(part)
    tag = f"{index}-of-{parts}"
    journal = out / f"journal-{tag}.jsonl"
    if journal.exists() and not resume:
        raise ValueError(f"{out} already holds a curation ({journal.name}); pass --resume to continue it, "
                         "or choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    salt = read_salt(out)
    done = _committed(out, tag, options.dedup_distance)
    skipped, jobs = _jobs(recipe, salt, options, index, parts, done.units)
    _start_journal(recipe, recipe_path, journal, done.records, salt, options)
    writer = ShardWriterForPart(out / "shards", tag, done.last_shard + 1, options.shard_samples, journal,
                                out / PRIVATE / f"journal-{tag}.jsonl")
    totals: Counter = Counter()
    with tqdm(total=len(jobs), desc=f"curate {tag}", unit="unit", disable=not progress) as bar:
        for result in ordered_map(process_unit, jobs, workers):
            outcome = _write_unit(result, writer, done)
            totals.update({"written": outcome["written"], "quarantined": outcome["quarantined"]})
            bar.update()
            bar.set_postfix(written=totals["written"], quarantined=totals["quarantined"])
    writer.finish()
    if not any(r["type"] == "end" for r in done.records):
        append_record(journal, {"type": "end", "rows": [], "units": [], "shard": None})
    if parts == 1:
        finalize(out)
    return _summary(journal, skipped)


@dataclass
class _Committed:
    """What a part's journal holds from earlier runs (nothing on a first run)."""

    records: list[dict[str, Any]]
    last_shard: int  # the number of the last committed shard, 0 if none
    units: set[tuple[str, str]]  # (source, unit id) of every committed unit
    keys: set[str]  # every committed sample
    dedup: dict[str, NearDuplicateIndex]  # per source, seeded with the committed samples' hashes


def _committed(out: Path, tag: str, dedup_distance: int) -> _Committed:
    """Read the part's journals (cutting a record a kill left half-written) and make its shards agree with them."""
    records = read_journal(out / f"journal-{tag}.jsonl", repair=True)
    read_journal(out / PRIVATE / f"journal-{tag}.jsonl", repair=True)  # only to cut a record a kill left half-written
    last_shard = _recover_shards(out / "shards", tag, records)
    dedup: dict[str, NearDuplicateIndex] = defaultdict(lambda: NearDuplicateIndex(dedup_distance))
    for r in records:
        for row in r["rows"]:
            dedup[row["source"]].add(int(row["phash"], 16))
    return _Committed(records, last_shard, {(o["source"], o["unit"]) for r in records for o in r["units"]},
                      {row["key"] for r in records for row in r["rows"]}, dedup)


def _jobs(recipe: Recipe, salt: str, options: CurateOptions, index: int, parts: int,
          done: set[tuple[str, str]]) -> tuple[list[str], list[tuple]]:
    """The sources skipped (no root), and the arguments of :func:`process_unit` for every unit of this part that is
    not committed yet."""
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
            if part_of(unit, parts) == index and (unit.source, unit_id(salt, unit.source, unit.key)) not in done:
                jobs.append((unit, source, str(root), salt, options))
    return skipped, jobs


def _start_journal(recipe: Recipe, recipe_path: str | Path, journal: Path, records: list[dict[str, Any]], salt: str,
                   options: CurateOptions) -> None:
    """Write the part's header on a first run; on a resume, refuse a recipe or options that changed since."""
    sources, digest = public_sources(recipe, salt)
    header = {"type": "header", "recipe": recipe.name, "sources": sources, "sources_digest": digest,
              "dedup_distance": options.dedup_distance, "rows": [], "units": [], "shard": None}
    if not records:
        append_record(journal, header)
        records.append(header)
    elif ((records[0].get("sources_digest"), records[0]["dedup_distance"])
          != (header["sources_digest"], header["dedup_distance"])):
        raise ValueError(f"{recipe_path}: the recipe or options changed since {journal} was started; "
                         "resume with the same ones, or curate into a new folder")


def _write_unit(result: UnitResult, writer: ShardWriterForPart, done: _Committed) -> dict[str, Any]:
    """One unit's samples into the shards, except those committed before a kill cut the unit short and the
    near-duplicates of samples kept before; then its outcome (returned) and private record, committed with the
    shard that holds its last sample."""
    for message in result.warnings:
        log.warning("%s", message)
    for problem in result.quarantined:
        log.warning("%s: %s: quarantined: %s", result.unit.source, problem.path, problem.reason)
    private = {"source": result.unit.source, "unit": result.unit_id, "path": result.unit.key,
               "written": [], "dropped": list(result.dropped), "quarantined": list(result.quarantined)}
    for key, png, meta, origin in result.samples:
        if key in done.keys:  # in a shard committed before a kill cut this unit short
            private["written"].append((key, *origin))
            continue
        if not done.dedup[meta["source"]].add(int(meta["phash"], 16)):
            private["dropped"].append((*origin, "near-duplicate"))
            continue
        writer.add(key, png, meta, result.unit.report)
        private["written"].append((key, *origin))
    outcome = {"source": result.unit.source, "unit": result.unit_id, "written": len(private["written"]),
               "dropped": dict(Counter(reason for *_, reason in private["dropped"])),
               "quarantined": len(result.quarantined)}
    writer.unit_done(outcome, private)
    return outcome


def _summary(journal: Path, skipped: list[str]) -> CurateSummary:
    records = read_journal(journal)
    dropped = Counter()
    for r in records:
        for o in r["units"]:
            dropped.update(o["dropped"])
    return CurateSummary(
        written=sum(len(r["rows"]) for r in records), dropped=dict(dropped),
        quarantined=sum(o["quarantined"] for r in records for o in r["units"]), skipped_sources=skipped,
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
