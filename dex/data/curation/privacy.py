"""What keeps a curated collection from naming its source files: the salt, the salted hashes that name units, samples
and studies instead of paths and UIDs, the sources as the collection may show them, and ``private/``, the curator's
folder for everything that does name files (the private journals and the reports made from them)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dex.data.journal import read_journal
from dex.data.recipe import Recipe

PRIVATE = "private"  # the output's folder for what names source files; nothing else reads from it
#: Source fields that may name folders (roots, patterns, index files): kept out of the collection's journal.
PATH_FIELDS = ("root", "pattern", "index_csv")
SALT = re.compile(r"[0-9a-f]{32}")


def salted(salt: str, text: str, length: int = 16) -> str:
    return hashlib.sha256(f"{salt}|{text}".encode()).hexdigest()[:length]


def unit_id(salt: str, source: str, key: str) -> str:
    """The name of a unit (source ``source``, source-relative path ``key``) in the collection: a salted hash of its
    source and path (the path never appears)."""
    return salted(salt, f"unit|{source}/{key}")


def study_hash(salt: str, study: str) -> str:
    return salted(salt, study)


def sample_key(salt: str, source: str, key: str, series: str, index: int) -> str:
    return f"{source}-{salted(salt, f'sample|{key}|{series}|{index}', 20)}"


def private_folder(out: str | Path) -> Path:
    """``OUT/private``, made readable by its owner only."""
    folder = Path(out) / PRIVATE
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


@contextmanager
def private_log(out: str | Path) -> Iterator[Path]:
    """While in the block, the ``dex`` loggers' records also go to ``OUT/private/curate.log`` (curation's warnings
    name source files, so its log is the curator's only); yields the log's path."""
    path = private_folder(out) / "curate.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("dex")
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()


def read_salt(out: Path) -> str:
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


def public_sources(recipe: Recipe, salt: str) -> tuple[list[dict[str, Any]], str]:
    """The sources as the collection may show them (no roots, patterns or index files), and a salted digest of
    everything about them, to tell on resume whether the recipe changed."""
    full = [asdict(s) for s in recipe.sources]
    public = [{k: v for k, v in s.items() if k not in PATH_FIELDS} for s in full]
    described = [full, [asdict(h) for h in recipe.hold_out]] if recipe.hold_out else full
    return public, salted(salt, json.dumps(described, sort_keys=True), 64)


def private_records(out: Path, journals: list[Path], committed: set[str]) -> list[dict[str, Any]]:
    """The private record of every committed unit, once (a kill between the private and the main journal leaves a
    record of an uncommitted unit, and its redo a second one: the last wins)."""
    by_unit: dict[str, dict[str, Any]] = {}
    for journal in journals:
        for record in read_journal(out / PRIVATE / journal.name):
            if record["unit"] in committed:
                by_unit[record["unit"]] = record
    return list(by_unit.values())


def write_private_reports(folder: Path, records: list[dict[str, Any]], excluded: set[str]) -> None:
    """``paths.csv`` (where each written image came from), ``dropped.csv`` and ``quarantine.csv`` in ``folder``, from
    the units' private records; ``excluded``: the keys of near-duplicates found across parts, reported as dropped."""
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
