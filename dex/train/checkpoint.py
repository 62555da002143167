"""Training checkpoints: written atomically, verified on load, kept as the last N plus milestones.

A checkpoint is one ``torch.save`` file of tensors and plain Python values only (model, optimizer, training
position, RNG states, config, code version), so it loads with ``torch.load(weights_only=True)``: nothing is ever
unpickled. ``index.json`` records each file's step and SHA-256; a file that fails its hash or does not load is
skipped, with a warning, in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("dex.train")
NAME = re.compile(r"^step-(\d+)\.pt$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


class CheckpointManager:
    def __init__(self, folder: str | Path, keep: int = 3) -> None:
        self.folder, self.keep = Path(folder), keep
        self.index_path = self.folder / "index.json"

    def _index(self) -> list[dict[str, Any]]:
        try:
            return json.loads(self.index_path.read_text())["checkpoints"]
        except FileNotFoundError:
            return []
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s is unreadable; falling back to the checkpoint files themselves", self.index_path)
            return []

    def save(self, state: dict[str, Any], step: int, milestone: bool = False) -> Path:
        """Write ``state`` as ``step-<step>.pt`` (temporary file, fsync, rename), record it, prune old ones."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:08d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
        entries = [e for e in self._index() if e["file"] != path.name]
        entries.append({"file": path.name, "step": step, "sha256": _sha256(path), "milestone": milestone})
        entries.sort(key=lambda e: e["step"])
        regular = [e for e in entries if not e["milestone"]]
        for old in regular[: max(0, len(regular) - self.keep)]:
            (self.folder / old["file"]).unlink(missing_ok=True)
            entries.remove(old)
        _write_json(self.index_path, {"checkpoints": entries})
        return path

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that verifies and loads, or None when there is none."""
        if not self.folder.is_dir():
            return None
        hashes = {e["file"]: e["sha256"] for e in self._index()}
        files = sorted((p for p in self.folder.iterdir() if NAME.match(p.name)), key=lambda p: p.name, reverse=True)
        for path in files:
            if path.name in hashes and _sha256(path) != hashes[path.name]:
                log.warning("checkpoint %s fails its SHA-256 check (corrupt or cut short); trying the previous one",
                            path)
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                log.warning("checkpoint %s does not load (%s); trying the previous one", path, err)
                continue
            state["path"] = str(path)
            return state
        return None
