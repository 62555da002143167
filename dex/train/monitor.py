"""What a run reports: a JSONL log and TensorBoard scalars on the main rank, per-layer routing statistics, and a
warning when a layer's routing collapses onto few experts."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("dex.train")


def normalised_entropy(distribution: list[float]) -> float:
    """Entropy of a distribution over R experts divided by log R: 1 when balanced, 0 when all on one expert."""
    total = sum(distribution)
    if total <= 0 or len(distribution) < 2:
        return 1.0
    entropy = -sum(p / total * math.log(p / total) for p in distribution if p > 0)
    return entropy / math.log(len(distribution))


class RunMonitor:
    """Writes ``log.jsonl`` (one row per logged step) and TensorBoard scalars under ``tensorboard/``.

    On resume the log keeps only the rows up to the resumed step, so a replayed step is logged once. A layer whose
    long-term usage has a normalised entropy under ``collapse_threshold`` for ``collapse_patience`` logged steps
    in a row gets a warning (in the log file's row and through ``logging``).
    """

    def __init__(self, out_dir: Path, enabled: bool, start_step: int = 0, tensorboard: bool = True,
                 collapse_threshold: float = 0.5, collapse_patience: int = 5) -> None:
        self.enabled, self.threshold, self.patience = enabled, collapse_threshold, collapse_patience
        self.low_streak: dict[int, int] = {}
        self.writer = None
        if not enabled:
            return
        self.path = out_dir / "log.jsonl"
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def log(self, row: dict[str, Any]) -> None:
        """``row`` holds scalars plus ``usage_entropy`` and ``load`` (lists over layers)."""
        if not self.enabled:
            return
        warnings = []
        for layer, value in enumerate(row.get("usage_entropy", [])):
            self.low_streak[layer] = self.low_streak.get(layer, 0) + 1 if value < self.threshold else 0
            if self.low_streak[layer] == self.patience:
                warnings.append(f"layer {layer}: routing collapsed (usage entropy {value:.2f} of its maximum for "
                                f"{self.patience} logged steps)")
        for message in warnings:
            log.warning("step %d: %s", row["step"], message)
        if warnings:
            row = {**row, "warnings": warnings}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            step = row["step"]
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)
            for layer, value in enumerate(row.get("usage_entropy", [])):
                self.writer.add_scalar(f"routing/entropy_layer{layer:02d}", value, step)
            for layer, load in enumerate(row.get("load", [])):
                if load:
                    self.writer.add_scalar(f"routing/max_load_layer{layer:02d}", max(load), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
