"""Tar shards in the WebDataset layout: each sample is ``<key>.png``, ``<key>.json`` (its metadata) and, for an
image-report pair, ``<key>.txt`` (the report), stored consecutively. Shards are written to ``<name>.tar.tmp`` and
renamed by the curation's commit, so a ``.tar`` file is always complete; headers carry no time stamps, so the same
samples give the same bytes. The writer measures each shard's size and SHA-256 as it writes, for the collection's
index (checked by ``dex data verify``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from dex.files import file_sha256

INDEX = "index.json"  # a collection's list of shards, with each one's sample counts, size and SHA-256


class ShardError(ValueError):
    """A shard that cannot be read, or holds other samples than the index says; ``str()`` names it."""


class ClosedShard(NamedTuple):
    name: str  # the final file name
    tmp: Path  # where it is until the commit renames it
    size: int  # bytes
    sha256: str


class _HashingFile:
    """A write-only file that keeps the SHA-256 and size of what went through it (all ``tarfile`` needs)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Appends samples to ``<folder>/<prefix>-<seq>.tar.tmp``; :meth:`close` finishes the current shard."""

    def __init__(self, folder: Path, prefix: str, next_seq: int, max_samples: int) -> None:
        self.folder, self.prefix, self.seq, self.max_samples = folder, prefix, next_seq, max_samples
        self.folder.mkdir(parents=True, exist_ok=True)
        self._tar: tarfile.TarFile | None = None
        self._file: _HashingFile | None = None
        self.count = 0

    @property
    def name(self) -> str:
        return f"{self.prefix}-{self.seq:06d}.tar"

    @property
    def full(self) -> bool:
        return self.count >= self.max_samples

    def add(self, key: str, png: bytes, meta: dict[str, Any], report: str | None = None) -> None:
        """Append ``<key>.png``, ``<key>.json`` and, for an image-report pair, ``<key>.txt`` (the report, UTF-8)."""
        if self._tar is None:
            self._file = _HashingFile(open(self.folder / (self.name + ".tmp"), "wb"))
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
            self.count = 0
        members = [(f"{key}.png", png), (f"{key}.json", json.dumps(meta, sort_keys=True).encode())]
        for name, data in members + ([(f"{key}.txt", report.encode())] if report is not None else []):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> ClosedShard | None:
        """Finish the open shard (flushed to disk); returns its name, temporary path, size and hash, or None."""
        if self._tar is None:
            return None
        self._tar.close()
        handle = self._file.handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        closed = ClosedShard(self.name, self.folder / (self.name + ".tmp"), self._file.size,
                             self._file.digest.hexdigest())
        self._tar, self._file, self.seq = None, None, self.seq + 1
        return closed


def read_index(folder: str | Path) -> dict[str, Any]:
    """A finished collection's ``index.json``; errors name the file."""
    path = Path(folder) / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing; finish the curation first (dex curate, or dex data stats after a "
                                "partitioned run)") from err
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a collection index ({type(err).__name__}: {err})") from err
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ValueError(f"{path}: not a collection index (no list of shards)")
    return index


def shard_problem(folder: str | Path, entry: dict[str, Any], check_hash: bool = False) -> str | None:
    """What is wrong with the shard an index ``entry`` describes: missing, not of its recorded size, or (with
    ``check_hash``, which reads the whole file) not of its recorded SHA-256; None when nothing is."""
    path = Path(folder) / "shards" / entry["name"]
    if not path.is_file():
        return "missing"
    if "bytes" in entry and path.stat().st_size != entry["bytes"]:
        return f"{path.stat().st_size} bytes where the index records {entry['bytes']} (cut short or replaced)"
    if check_hash and file_sha256(path) != entry.get("sha256"):
        return "its SHA-256 differs from the index's (corrupt)"
    return None


def iter_shard(path: str | Path, expected: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for every sample of a shard, in stored order.

    Raises :class:`ShardError` naming the shard when its bytes are cut or corrupt, or when ``expected`` is given and
    it holds another number of samples (``tarfile`` ends quietly at a corrupt header past the first member).
    """
    key, parts, count = None, {}, 0
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                stem, _, ext = member.name.partition(".")
                if stem != key and key is not None:
                    yield key, parts
                    count += 1
                    parts = {}
                key = stem
                parts[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ShardError(f"{path}: unreadable shard ({type(err).__name__}: {err})") from err
    if key is not None:
        yield key, parts
        count += 1
    if expected is not None and count != expected:
        raise ShardError(f"{path}: holds {count} samples where the index records {expected} (corrupt or cut)")


def collection_reports(folder: str | Path) -> list[str]:
    """Every report (``.txt`` member) of a finished collection's shards, in index and stored order; the samples the
    index excludes (cross-part near-duplicates) left out."""
    folder = Path(folder)
    index = read_index(folder)
    exclude = set(index.get("exclude", []))
    return [parts["txt"].decode() for shard in index["shards"]
            for key, parts in iter_shard(folder / "shards" / shard["name"], shard.get("stored"))
            if "txt" in parts and key not in exclude]
