"""Append-only JSON-lines journals: what a batch job has committed, so that a killed job resumes where it was."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_journal(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of ``path`` up to a line cut off by a kill (that commit did not happen).

    ``repair`` (for the job that resumes, and only for it: another process may be appending) cuts the file back to
    its whole records; without that, the next record would be glued to the cut line and lost to every later read.
    """
    records, whole = [], 0
    if not path.exists():
        return records
    text = path.read_text()
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):  # cut by a kill, even if what is there parses
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        whole += len(line)
    if repair and whole < len(text):
        with open(path, "r+") as handle:
            handle.truncate(len(text[:whole].encode()))
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record and fsync, so a commit written is a commit kept."""
    append_records(path, [record])


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Append records and fsync once."""
    with open(path, "a") as handle:
        handle.writelines(json.dumps(record, sort_keys=True) + "\n" for record in records)
        handle.flush()
        os.fsync(handle.fileno())
