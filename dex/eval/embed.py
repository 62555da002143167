"""``dex embed``: an encoder's features of images, for retrieval, clustering or a probe of your own.

Per image: the class token and the mean of the patch tokens of the encoder's final normalised output
(``forward_features``), each as a row of a float32 matrix (``cls.npy`` and ``mean_patch.npy``, [N, D]), and
``index.csv`` naming the input of each row. Images are read and fed as the encoder's folder records
(:class:`dex.data.preprocess.Preprocessing`), in batches, in a stable order (the inputs as given, a folder's images
sorted by path). An image that cannot be read goes to ``errors.csv`` with the reason, and the others are embedded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from dex.data.readers import ReadError
from dex.data.stream import IMAGE_SUFFIXES
from dex.eval.encoders import EncoderSpec, encoder_preprocessing, load_encoder
from dex.files import write_csv


class EmbedSummary(NamedTuple):
    out: Path
    rows: int
    dim: int
    errors: int


def image_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files of ``inputs`` (files as given, folders' images sorted by path), in that order; a path that
    does not exist is a FileNotFoundError naming it."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


@torch.no_grad()
def features(encoder: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-token and mean-patch features of model inputs [B, 3, H, W]: two [B, D] float32 tensors."""
    tokens = encoder.forward_features(images).float()
    prefix = getattr(encoder, "num_prefix_tokens", 1)
    return tokens[:, 0], tokens[:, prefix:].mean(1)


def embed(encoder_source: str, inputs: Sequence[str | Path], out: str | Path, batch_size: int = 64,
          device: str = "cpu") -> EmbedSummary:
    """Embed the images of ``inputs`` with the encoder of ``encoder_source`` (any source ``dex benchmark`` takes,
    or a ``dex finetune`` model folder) into ``out``; see the module's docstring."""
    out = Path(out)
    spec = EncoderSpec("embedded", str(encoder_source))
    encoder = load_encoder(spec).to(device).eval()
    preprocessing = encoder_preprocessing(spec, encoder)
    files = image_inputs(inputs)
    out.mkdir(parents=True, exist_ok=True)
    cls_rows, mean_rows, index, errors, batch, names = [], [], [], [], [], []

    def flush() -> None:
        if batch:
            cls, mean = features(encoder, torch.stack(batch).to(device))
            cls_rows.append(cls.cpu().numpy())
            mean_rows.append(mean.cpu().numpy())
            index.extend(names)
            batch.clear()
            names.clear()

    for path in files:
        try:
            batch.append(preprocessing.read(path))
            names.append(str(path))
        except ReadError as err:
            errors.append((str(path), err.reason))
        if len(batch) == batch_size:
            flush()
    flush()
    dim = encoder.num_features
    cls = np.concatenate(cls_rows) if cls_rows else np.zeros((0, dim), np.float32)
    mean = np.concatenate(mean_rows) if mean_rows else np.zeros((0, dim), np.float32)
    np.save(out / "cls.npy", cls)
    np.save(out / "mean_patch.npy", mean)
    write_csv(out / "index.csv", ["row", "input"], list(enumerate(index)))
    write_csv(out / "errors.csv", ["input", "reason"], errors)
    return EmbedSummary(out, len(index), dim, len(errors))
