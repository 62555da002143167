"""Training checkpoints: written atomically, verified on load, kept as the last N plus milestones.

A checkpoint is one ``torch.save`` file of tensors and plain Python values only (model, optimizer, training
position, RNG states, config, code version), so it is read weights-only (:func:`dex.safeload.load_torch_file`):
nothing is ever unpickled. ``index.json`` records each file's step and SHA-256; a file that fails its hash, is
refused or does not load is skipped, with a warning, in favour of the previous one; when none is left,
:class:`NoUsableCheckpointError` names every file and why.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from dex.files import file_sha256, write_json
from dex.safeload import RefusedFileError, load_torch_file

log = logging.getLogger("dex.train")
NAME = re.compile(r"^step-(\d+)\.pt$")


class NoUsableCheckpointError(ValueError):
    """Checkpoint files exist, but none verifies and loads (corrupt, cut short, refused as unsafe)."""


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
        entries.append({"file": path.name, "step": step, "sha256": file_sha256(path), "milestone": milestone})
        entries.sort(key=lambda e: e["step"])
        regular = [e for e in entries if not e["milestone"]]
        for old in regular[: max(0, len(regular) - self.keep)]:
            (self.folder / old["file"]).unlink(missing_ok=True)
            entries.remove(old)
        write_json(self.index_path, {"checkpoints": entries})
        return path

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that verifies and loads, or None when there are no checkpoint files.

        Raises :class:`NoUsableCheckpointError` when there are checkpoint files but none verifies and loads.
        """
        if not self.folder.is_dir():
            return None
        hashes = {e["file"]: e["sha256"] for e in self._index()}
        files = sorted((p for p in self.folder.iterdir() if NAME.match(p.name)), key=lambda p: p.name, reverse=True)
        failed: list[str] = []
        for path in files:
            if path.name in hashes and file_sha256(path) != hashes[path.name]:
                failed.append(f"{path.name} fails its SHA-256 check (corrupt or cut short)")
                continue
            try:
                state = load_torch_file(path)
            except RefusedFileError as err:
                failed.append(f"{path.name} is refused as unsafe (it holds {err.held}, which is not unpickled)")
                continue
            except (ValueError, FileNotFoundError) as err:
                failed.append(f"{path.name} does not load ({str(err).removeprefix(f'{path}: ')})")
                continue
            if not isinstance(state, dict):
                failed.append(f"{path.name} does not hold a checkpoint (a {type(state).__name__})")
                continue
            for reason in failed:
                log.warning("checkpoint %s/%s; using %s instead", self.folder, reason, path.name)
            state["path"] = str(path)
            return state
        if failed:
            raise NoUsableCheckpointError(f"{self.folder}: no checkpoint verifies and loads: " + "; ".join(failed))
        return None
