"""Checkpoints of every job that trains, pretraining and fine-tuning alike: written atomically, verified on load, kept
as the last N plus milestones, with the random generators' state, and one rule for a resume whose settings changed.

A checkpoint is one ``torch.save`` file of tensors and plain Python values only (weights, optimiser, position, RNG
states, settings, code version), so it is read weights-only (:func:`dex.safeload.load_torch_file`): nothing is ever
unpickled. ``index.json`` records each file's step and SHA-256; a file that fails its hash, is refused or does not
load is skipped, with a warning, in favour of the previous one; when none is left, :class:`NoUsableCheckpointError`
names every file and why.

A job resumes only with the settings it was written with (:func:`check_same_settings`): a killed job goes on where it
was, so a changed setting, which would make the run differ from one that was not stopped, is refused by name. Only
the settings a job declares free (where files go, workers, logging: nothing that changes what is computed) may
differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dex.collectives import is_distributed
from dex.files import file_sha256, write_json
from dex.safeload import RefusedFileError, load_torch_file

log = logging.getLogger("dex.checkpoint")
NAME = re.compile(r"^step-(\d+)\.pt$")


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save(state)`` at ``path`` through a temporary file, fsync and rename: the file is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
    return path


def check_same_settings(saved: Mapping[str, Any], config: Any, where: str | Path) -> None:
    """Refuse to resume from the checkpoint ``where`` when a setting of the dataclass ``config`` other than the ones
    its class declares free (``resume_free``) differs from ``saved`` (the checkpoint's); a ValueError names each with
    both values. A key the checkpoint's version did not have yet counts as unchanged. Values are compared as JSON
    (tuples as lists)."""
    saved, current = (json.loads(json.dumps(values)) for values in (dict(saved), dataclasses.asdict(config)))
    changed = [f"{key} {saved[key]!r} -> {current[key]!r}" for key in sorted(current)
               if key not in config.resume_free and key in saved and saved[key] != current[key]]
    if changed:
        raise ValueError(f"{where}: cannot resume from it with other settings than it was written with "
                         f"({'; '.join(changed)}); resume with the same settings, or start a new run")


# --- random generators -------------------------------------------------------------------------------------------

def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state of torch's, NumPy's and Python's global generators (and CUDA's on a CUDA device), as tensors and
    plain values only, so that a checkpoint holding it loads with ``weights_only=True``."""
    numpy = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy[1].astype(np.int64)), "pos": int(numpy[2]),
                  "has_gauss": int(numpy[3]), "gauss": float(numpy[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    device = torch.device(device)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str = "cpu") -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    device = torch.device(device)
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def rank_rng_states(device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state` in rank order (each rank draws its own, e.g. for stochastic depth); in one
    process, a list of one."""
    mine = rng_state(device)
    if not is_distributed():
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def set_rank_rng_state(states: list[dict[str, Any]], device: torch.device | str = "cpu") -> None:
    """Restore this rank's state of :func:`rank_rng_states` (a run resumed on more ranks than it was written with
    gives the new ranks the first rank's)."""
    rank = dist.get_rank() if is_distributed() else 0
    set_rng_state(states[rank] if rank < len(states) else states[0], device)


# --- the last N checkpoints of a run -----------------------------------------------------------------------------

class NoUsableCheckpointError(ValueError):
    """Checkpoint files exist, but none verifies and loads (corrupt, cut short, refused as unsafe)."""


class CheckpointManager:
    """The checkpoints of one run in ``folder``: the last ``keep`` plus milestones (see the module's docstring)."""

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
        """Write ``state`` as ``step-<step>.pt`` (:func:`save_atomic`), record it, prune old ones."""
        path = save_atomic(state, self.folder / f"step-{step:08d}.pt")
        entries = [e for e in self._index() if e["file"] != path.name]
        entries.append({"file": path.name, "step": step, "sha256": file_sha256(path), "milestone": milestone})
        entries.sort(key=lambda e: e["step"])
        regular = [e for e in entries if not e["milestone"]]
        for old in regular[: max(0, len(regular) - self.keep)]:
            (self.folder / old["file"]).unlink(missing_ok=True)
            entries.remove(old)
        write_json(self.index_path, {"checkpoints": entries})
        return path

    def files(self) -> list[Path]:
        """The checkpoint files in the folder, newest first (whether they verify or not)."""
        if not self.folder.is_dir():
            return []
        return sorted((p for p in self.folder.iterdir() if NAME.match(p.name)), key=lambda p: p.name, reverse=True)

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that verifies and loads, or None when there are no checkpoint files.

        Raises :class:`NoUsableCheckpointError` when there are checkpoint files but none verifies and loads.
        """
        hashes = {e["file"]: e["sha256"] for e in self._index()}
        failed: list[str] = []
        for path in self.files():
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
