"""The ``medmnist`` layout: a MedMNIST(+) 2D ``.npz`` with its own train / val / test split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dex.data.importers.writer import Item, TaskWriter, _one
from dex.data.tasks import SPLITS


def import_medmnist(npz_path: str | Path, writer: TaskWriter, classes: Sequence[str] = ()) -> list[str]:
    """A MedMNIST(+) 2D ``.npz`` (``train_images`` [N, H, W(, 3)] uint8, ``train_labels`` [N, 1], same for val
    and test). Label ``n`` is ``classes[n]``; without names the classes are ``"0"``, ``"1"``, ... up to the
    largest label. Returns the class list."""
    npz_path = Path(npz_path)
    try:
        data = np.load(npz_path, allow_pickle=False)
        arrays = {key: data[key] for key in data.files}
    except Exception as err:
        raise ValueError(f"{npz_path}: not a readable .npz ({type(err).__name__}: {err})") from err
    splits = [s for s in SPLITS if f"{s}_images" in arrays and f"{s}_labels" in arrays]
    if not splits:
        raise ValueError(f"{npz_path}: no train_images / train_labels arrays (found {sorted(arrays)})")
    top = 0
    for split in splits:
        pictures, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if pictures.ndim not in (3, 4) or (pictures.ndim == 4 and pictures.shape[3] != 3):
            raise ValueError(f"{npz_path}: {split}_images has shape {pictures.shape}; a 2D MedMNIST set is "
                             f"[N, H, W] or [N, H, W, 3] (3D MedMNIST is not a 2D task)")
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise ValueError(f"{npz_path}: {split}_labels has shape {labels.shape}: multi-label sets are not "
                             f"single-label classification tasks")
        top = max(top, int(labels.max()) + 1)
    classes = list(classes) or [str(n) for n in range(top)]
    if len(classes) < top:
        raise ValueError(f"{npz_path}: labels go up to {top - 1}, but only {len(classes)} class names were given")
    for split in splits:
        pictures, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        writer.run((f"{npz_path}:{split}[{n}]",
                    _one(Item(f"{split}_{n:06d}", np.ascontiguousarray(pictures[n].astype(np.uint8)),
                              label=classes[int(labels[n])], split=split)))
                   for n in range(len(pictures)))
    return classes
