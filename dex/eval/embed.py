"""``dex embed``: an encoder's features of images and volume slices, for retrieval, clustering or a probe of your own.

Per image, slice of a volume or frame of a DICOM object: the pooled feature (a ViT's class token, a Swin's average
of its final map) and the mean of the final normalised tokens
(:func:`dex.models.backbones.final_tokens`), each as a row of a float32 matrix (``cls.npy`` and
``mean_patch.npy``, [N, D]), and ``index.csv`` naming the input and slice of each row. Inputs are found and read as
:mod:`dex.eval.inputs` describes, driven by the encoder folder's preprocessing (a volume's Table 2 rule: the one the
folder records, given, or its modality's), and fed in batches, in a stable order (the inputs as given, a folder's
files sorted by path). An input that cannot be read goes to ``errors.csv`` with the reason, and the others are
embedded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from dex.data.readers import Problem
from dex.eval.encoders import EncoderSpec, encoder_preprocessing, load_encoder
from dex.eval.inputs import Case, find_inputs, read_cases, reading, run_batched
from dex.files import write_csv
from dex.models.backbones import pooled_and_mean


class EmbedSummary(NamedTuple):
    out: Path
    rows: int
    dim: int
    errors: int


def embed(encoder_source: str, inputs: Sequence[str | Path], out: str | Path, batch_size: int = 64,
          device: str = "cpu", volume_normalization: str | None = None, slice_axis: str | None = None) -> EmbedSummary:
    """Embed the images, DICOM objects and series and NIfTI volumes of ``inputs`` (found and read as
    :mod:`dex.eval.inputs` describes) with the encoder of ``encoder_source`` (any source ``dex benchmark`` takes,
    or a ``dex finetune`` model folder) into ``out``; see the module's docstring."""
    out = Path(out)
    spec = EncoderSpec("embedded", str(encoder_source))
    encoder = load_encoder(spec).to(device).eval()
    preprocessing = reading(encoder_preprocessing(spec, encoder), volume_normalization, slice_axis)
    errors: list[Problem] = []
    entries = find_inputs(inputs, errors)
    out.mkdir(parents=True, exist_ok=True)
    cls_rows, mean_rows, index = [], [], []

    def finish(case: Case, results: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for (slice_index, _), (cls, mean) in zip(case.pictures, results):
            cls_rows.append(cls.numpy())
            mean_rows.append(mean.numpy())
            index.append((len(index), case.source, "" if slice_index < 0 else slice_index))

    def compute(images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cls, mean = pooled_and_mean(encoder, images)
        return list(zip(cls.cpu(), mean.cpu()))

    run_batched(read_cases(entries, preprocessing, errors), preprocessing.picture_input, compute, batch_size, finish,
                device)
    dim = encoder.num_features
    np.save(out / "cls.npy", np.stack(cls_rows) if cls_rows else np.zeros((0, dim), np.float32))
    np.save(out / "mean_patch.npy", np.stack(mean_rows) if mean_rows else np.zeros((0, dim), np.float32))
    write_csv(out / "index.csv", ["row", "input", "slice"], index)
    write_csv(out / "errors.csv", ["input", "reason"], errors)
    return EmbedSummary(out, len(index), dim, len(errors))
