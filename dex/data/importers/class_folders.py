"""The ``class-folders`` layout: ``SRC/[split/]class/<image>`` (torchvision's ImageFolder)."""

from __future__ import annotations

from pathlib import Path

from dex.data.importers.writer import (
    IMAGE_SUFFIXES,
    SPLIT_ALIASES,
    Item,
    TaskWriter,
    _clean,
    _images_in,
    _one,
    _read_split_file,
    _unique_ids,
)


def import_class_folders(src: str | Path, writer: TaskWriter, splits_file: str | Path | None = None) -> None:
    """``SRC/[split/]class/<image>``; deeper folders below a class folder are searched too."""
    src = Path(src)
    top = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in top if p.name.lower() in SPLIT_ALIASES]
    if split_dirs and len(split_dirs) != len(top):
        others = [p.name for p in top if p not in split_dirs]
        raise ValueError(f"{src}: mixes split folders ({[p.name for p in split_dirs]}) with others ({others})")
    roots = [(p, SPLIT_ALIASES[p.name.lower()]) for p in split_dirs] or [(src, None)]
    entries = []  # (path, class, split)
    for root, split in roots:
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entries += [(path, class_dir.name, split) for path in _images_in(class_dir)]
    if not entries:
        raise ValueError(f"{src}: no images in class folders ({', '.join(IMAGE_SUFFIXES)})")
    ids = _unique_ids([e[0] for e in entries], src)
    official = _read_split_file(splits_file)
    writer.run((str(path), _one(Item(_clean(ids[path]), path, label=label,
                                     split=official.get(ids[path], official.get(path.stem, split)))))
               for path, label, split in entries)
