"""``dex predict``: a fine-tuned model (``dex finetune``) run on new images.

Images (PNG / JPEG / BMP / TIFF files, or folders of them sorted by path) are read and fed as the model's folder
records (its :class:`~dex.data.preprocess.Preprocessing`), in batches; ``tta="flip"`` averages the probabilities of
each image and of its mirror image (mirrored back).

- Classification: ``predictions.csv``: ``input``, ``predicted`` (the class name) and ``p_<class>`` for every class.
- Segmentation: a label map per image at the image's own size (the probabilities resized, bilinear, before the
  argmax, as fine-tuning's Dice scores it), as an 8-bit PNG of class indices in ``masks/``, named after the input
  (its path below the folder it was found in); ``predictions.csv`` lists ``input``, ``mask`` and the pixels of each
  class.

An input that cannot be read is listed in ``errors.csv`` with the reason, and the others are predicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image

from dex.data.readers import ReadError, read_picture
from dex.eval.embed import image_inputs
from dex.eval.metrics import label_map
from dex.eval.task_model import TaskModel, load_model
from dex.files import write_csv


class PredictSummary(NamedTuple):
    out: Path
    predicted: int
    errors: int


def _named_inputs(inputs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(file, name) of every image: a folder's images are named by their path below it, a file by its name."""
    named = []
    for item in map(Path, inputs):
        for path in image_inputs([item]):
            named.append((path, path.relative_to(item) if item.is_dir() else Path(path.name)))
    return named


@torch.no_grad()
def probabilities(model: TaskModel, images: torch.Tensor, tta: Literal["none", "flip"] = "none") -> torch.Tensor:
    """The model's class probabilities of model inputs [B, 3, H, W] ([B, C], or [B, C, H, W]); with ``flip`` the
    mean of the image's and its mirror image's (mirrored back)."""
    probs = model.predict(images)
    if tta == "flip":
        mirrored = model.predict(images.flip(-1))
        probs = (probs + (mirrored.flip(-1) if probs.ndim == 4 else mirrored)) / 2
    return probs


def predict(model_dir: str | Path, inputs: Sequence[str | Path], out: str | Path, batch_size: int = 16,
            device: str = "cpu", tta: Literal["none", "flip"] = "none") -> PredictSummary:
    """Run the model of ``model_dir`` on the images of ``inputs`` and write ``out``; see the module's docstring."""
    if tta not in ("none", "flip"):
        raise ValueError(f"tta must be none or flip, got {tta!r}")
    model = load_model(model_dir, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    segmentation = model.task_type == "segmentation"
    rows, errors, batch = [], [], []

    def flush() -> None:
        if not batch:
            return
        probs = probabilities(model, torch.stack([x for _, _, x, _ in batch]).to(device), tta).cpu()
        for (path, name, _, size), p in zip(batch, probs):
            if segmentation:
                labels = label_map(p, size).numpy().astype(np.uint8)
                mask = (Path("masks") / name).with_suffix(".png")
                (out / mask).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(labels).save(out / mask)
                counts = np.bincount(labels.ravel(), minlength=len(model.classes))
                rows.append([str(path), mask.as_posix(), *counts.tolist()])
            else:
                rows.append([str(path), model.classes[int(p.argmax())], *(f"{v:.6f}" for v in p.tolist())])
        batch.clear()

    for path, name in _named_inputs(inputs):
        try:
            image = model.preprocessing.scale(read_picture(path))
        except ReadError as err:
            errors.append((str(path), err.reason))
            continue
        batch.append((path, name, model.preprocessing.to_input(image), tuple(image.shape[-2:])))
        if len(batch) == batch_size:
            flush()
    flush()
    header = ["input", "mask", *(f"pixels_{c}" for c in model.classes)] if segmentation else [
        "input", "predicted", *(f"p_{c}" for c in model.classes)]
    write_csv(out / "predictions.csv", header, rows)
    write_csv(out / "errors.csv", ["input", "reason"], errors)
    return PredictSummary(out, len(rows), len(errors))

