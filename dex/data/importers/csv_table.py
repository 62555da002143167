"""The ``csv`` layout: a CSV naming each image and its label (or one-hot label columns)."""

from __future__ import annotations

import csv
from pathlib import Path

from dex.data.importers.writer import SPLIT_ALIASES, Item, MakeItems, TaskWriter, _clean, _images_in
from dex.data.readers import Problem, ReadError
from dex.data.tasks import SPLITS


def import_csv(csv_path: str | Path, images: str | Path, writer: TaskWriter, id_column: str = "id",
               label_column: str = "label", split_column: str | None = None) -> None:
    """A CSV with an image name per row (a stem, a file name or a path below ``images``) and its label.

    A one-hot table (ISIC: ``image,MEL,NV,...`` with 0/1 or 0.0/1.0 entries) is read by giving ``label_column``
    as ``onehot:MEL,NV,...``.
    """
    csv_path, images = Path(csv_path), Path(images)
    by_stem: dict[str, Path] = {}
    for path in _images_in(images):
        by_stem.setdefault(path.stem, path)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    onehot = label_column.split(":", 1)[1].split(",") if label_column.startswith("onehot:") else None
    needed = [id_column] + (onehot or [label_column]) + ([split_column] if split_column else [])
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise ValueError(f"{csv_path}: no column(s) {missing}; the columns are {list(rows[0])}")

    def unit(line: int, row: dict[str, str]) -> MakeItems:
        def make(problems: list[Problem]) -> list[Item]:
            name = row[id_column]
            path = images / name if (images / name).is_file() else by_stem.get(Path(name).stem)
            if path is None:
                raise ReadError(f"{csv_path}:{line}", f"no image {name!r} in {images}")
            if onehot:
                hot = [c for c in onehot if float(row[c] or 0) == 1.0]
                if len(hot) != 1:
                    raise ReadError(f"{csv_path}:{line}", f"{len(hot)} of the one-hot columns are 1, not one")
                label = hot[0]
            else:
                label = row[label_column]
            split = SPLIT_ALIASES.get(row[split_column].lower()) if split_column else None
            if split_column and split is None:
                raise ReadError(f"{csv_path}:{line}", f"split {row[split_column]!r} is not one of {SPLITS}")
            return [Item(_clean(Path(name).stem), path, label=label, split=split)]
        return make

    writer.run((f"{csv_path}:{line}", unit(line, row)) for line, row in enumerate(rows, start=2))
