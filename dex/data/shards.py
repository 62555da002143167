"""Tar shards in the WebDataset layout: each sample is ``<key>.png`` and ``<key>.json`` (its metadata), stored
consecutively. Shards are written to ``<name>.tar.tmp`` and renamed by the curation's commit, so a ``.tar`` file
is always complete; headers carry no time stamps, so the same samples give the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ShardWriter:
    """Appends samples to ``<folder>/<prefix>-<seq>.tar.tmp``; :meth:`close` finishes the current shard."""

    def __init__(self, folder: Path, prefix: str, next_seq: int, max_samples: int) -> None:
        self.folder, self.prefix, self.seq, self.max_samples = folder, prefix, next_seq, max_samples
        self.folder.mkdir(parents=True, exist_ok=True)
        self._tar: tarfile.TarFile | None = None
        self.count = 0

    @property
    def name(self) -> str:
        return f"{self.prefix}-{self.seq:06d}.tar"

    @property
    def full(self) -> bool:
        return self.count >= self.max_samples

    def add(self, key: str, png: bytes, meta: dict[str, Any]) -> None:
        if self._tar is None:
            self._tar = tarfile.open(self.folder / (self.name + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
            self.count = 0
        for name, data in ((f"{key}.png", png), (f"{key}.json", json.dumps(meta, sort_keys=True).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> tuple[str, Path] | None:
        """Finish the open shard (flushed to disk); returns its final name and temporary path, or None."""
        if self._tar is None:
            return None
        self._tar.close()
        tmp = self.folder / (self.name + ".tmp")
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        result = (self.name, tmp)
        self._tar, self.seq = None, self.seq + 1
        return result


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for every sample of a shard, in stored order."""
    key, parts = None, {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.partition(".")
            if stem != key and key is not None:
                yield key, parts
                parts = {}
            key = stem
            parts[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, parts
