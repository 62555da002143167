"""Downstream task folders.

The layout is the one of the real tasks under ``shared/data``: ``images/<id>.<ext>``, ``masks/<id>.png``
(segmentation, one label value per pixel), ``labels.csv`` with ``id,label`` (classification, class names),
``splits.csv`` with ``id,split`` (train / val / test), a ``README.md``, and ``task.yaml`` describing the task.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TASK_TYPES = ("segmentation", "classification")
SPLITS = ("train", "val", "test")


@dataclass
class TaskSpec:
    """``task.yaml``: what a task folder holds."""

    name: str
    type: str  # segmentation | classification
    modality: str
    classes: list[str]  # segmentation: index = mask value; classification: the label names
    image_size: list[int]  # [H, W] of the stored images
    channels: int  # 1 (grey) or 3 (RGB)
    bit_depth: int = 8
    description: str = ""
    source: str = ""
    licence: str = ""
    metrics: list[str] = field(default_factory=list)

    def save(self, folder: Path) -> None:
        (folder / "task.yaml").write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


def split_of(index: int, count: int) -> str:
    """Deterministic 60 / 20 / 20 split by position."""
    fraction = index / count
    return "train" if fraction < 0.6 else "val" if fraction < 0.8 else "test"


def write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def finish_task(folder: Path, spec: TaskSpec, ids: list[str], labels: dict[str, str] | None = None) -> None:
    """Write task.yaml, splits.csv, labels.csv (classification) and README.md for images already in ``folder``."""
    spec.save(folder)
    write_csv(folder / "splits.csv", ("id", "split"), [(i, split_of(n, len(ids))) for n, i in enumerate(ids)])
    if spec.type == "classification":
        write_csv(folder / "labels.csv", ("id", "label"), [(i, labels[i]) for i in ids])
    lines = [
        f"# {spec.name}",
        "",
        f"- Modality: {spec.modality}.",
        f"- Task: {spec.type}. {spec.description}",
        f"- Classes: {', '.join(f'{i} = {c}' if spec.type == 'segmentation' else c for i, c in enumerate(spec.classes))}.",
        f"- Images: {len(ids)}, {spec.image_size[0]} x {spec.image_size[1]}, {spec.channels} channel(s), "
        f"{spec.bit_depth}-bit; split 60/20/20 in `splits.csv`.",
        f"- Source: {spec.source}. Licence: {spec.licence}.",
    ]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
