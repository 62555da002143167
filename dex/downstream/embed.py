"""``dex embed``: an encoder's features of images and volume slices, for retrieval, clustering or a probe of your own.

Per image, slice of a volume or frame of a DICOM object: the pooled feature (a ViT's class token, a Swin's average
of its final map) and the mean of the final normalised tokens
(:func:`dex.models.backbones.final_tokens`), each as a row of a float32 matrix (``cls.npy`` and
``mean_patch.npy``, [N, D]), and ``index.csv`` naming the input and slice of each row. Inputs are found and read as
:mod:`dex.downstream.inputs` describes, driven by the encoder folder's preprocessing (a volume's Table 2 rule: the one
the folder records, given, or its modality's), and fed in batches, in a stable order (the inputs as given, a folder's
files sorted by path). An input that cannot be read goes to ``errors.csv`` with the reason, and the others are
embedded.

A vision-language model (a MedMoE ``dex export`` or run folder, with ``heads/`` and ``text/``) adds each image's
global embedding in the space it shares with reports (``shared.npy``, [N, E]: the image u of Eq. 4's InfoNCE), and
embeds texts: every line of a ``.txt`` file, or the ``report`` column of a ``.csv``, gives a row of
``text_shared.npy`` ([M, E], the report w), named in ``text_index.csv`` by file and line (1-based; a CSV's header
is line 1), never by its text. Image and text rows compare by cosine similarity, as ``dex vl-eval`` ranks them. An
empty text goes to ``errors.csv`` and the others are embedded.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from dex.data.readers import Problem
from dex.downstream.encoders import EncoderSpec, encoder_preprocessing, load_encoder
from dex.downstream.inputs import Case, find_inputs, read_cases, reading, run_batched
from dex.files import write_csv
from dex.models.backbones import pooled_and_mean
from dex.train.runs import load_kept


class EmbedSummary(NamedTuple):
    out: Path
    rows: int
    dim: int
    errors: int
    texts: int = 0


def read_texts(files: Sequence[str | Path], errors: list[Problem]) -> list[tuple[str, int, str]]:
    """(file, line, text) of every text of ``files``: each line of a ``.txt`` file, the ``report`` column of a
    ``.csv`` (read as UTF-8). An empty text is recorded in ``errors`` as ``FILE:LINE``; a file that is neither, or
    a CSV without a ``report`` column, is a ValueError naming it."""
    texts = []
    for file in map(Path, files):
        if file.suffix.lower() == ".txt":
            rows = enumerate(file.read_text(encoding="utf-8").splitlines(), start=1)
        elif file.suffix.lower() == ".csv":
            with open(file, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                if "report" not in (reader.fieldnames or []):
                    raise ValueError(f"{file}: no 'report' column (columns: {reader.fieldnames})")
                rows = [(reader.line_num, row["report"] or "") for row in reader]
        else:
            raise ValueError(f"{file}: texts come as a .txt file (one per line) or a .csv with a 'report' column")
        for line, text in rows:
            if text.strip():
                texts.append((str(file), line, text))
            else:
                errors.append(Problem(f"{file}:{line}", "empty text"))
    return texts


def _vision_language(source: str, needed: bool) -> nn.Module | None:
    """The whole model of ``source`` when its method keeps more than the encoder (a vision-language model: a MedMoE
    export or run folder), else None; texts given to an image encoder are a ValueError."""
    model = load_kept(source)
    if model is None and needed:
        raise ValueError(f"{source}: texts need a vision-language model (a MedMoE export or run folder, with heads/ "
                         "and text/); this is an image encoder")
    return model


def embed(encoder_source: str, inputs: Sequence[str | Path], out: str | Path, batch_size: int = 64,
          device: str = "cpu", volume_normalization: str | None = None, slice_axis: str | None = None,
          texts: Sequence[str | Path] = ()) -> EmbedSummary:
    """Embed the images, DICOM objects and series and NIfTI volumes of ``inputs`` (found and read as
    :mod:`dex.downstream.inputs` describes) with the encoder of ``encoder_source`` (any source ``dex benchmark`` takes,
    or a ``dex finetune`` model folder), and the ``texts`` files with a vision-language model, into ``out``; see
    the module's docstring."""
    out = Path(out)
    spec = EncoderSpec("embedded", str(encoder_source))
    encoder = load_encoder(spec).to(device).eval()
    model = _vision_language(str(encoder_source), bool(texts))
    if model is not None:
        model.to(device)
    errors: list[Problem] = []
    text_rows = read_texts(texts, errors)  # a bad texts file is refused before any image is read
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[np.ndarray, ...]] = []
    index: list[tuple] = []
    if inputs:
        preprocessing = reading(encoder_preprocessing(spec, encoder), volume_normalization, slice_axis)
        entries = find_inputs(inputs, errors)

        def finish(case: Case, results: list[tuple[torch.Tensor, ...]]) -> None:
            for (slice_index, _), features in zip(case.pictures, results):
                rows.append(tuple(f.numpy() for f in features))
                index.append((len(index), case.source, "" if slice_index < 0 else slice_index))

        @torch.no_grad()
        def compute(images: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
            features = pooled_and_mean(encoder, images)
            if model is not None:
                features = (*features, model.encode_images(images))
            return list(zip(*(f.float().cpu() for f in features)))

        run_batched(read_cases(entries, preprocessing, errors), preprocessing.picture_input, compute, batch_size,
                    finish, device)
        dims = [encoder.num_features] * 2 + ([model.config.embed_dim] if model is not None else [])
        for position, (name, dim) in enumerate(zip(("cls", "mean_patch", "shared"), dims)):
            np.save(out / f"{name}.npy", np.stack([row[position] for row in rows]) if rows
                    else np.zeros((0, dim), np.float32))
        write_csv(out / "index.csv", ["row", "input", "slice"], index)
    if texts:
        with torch.no_grad():
            embedded = [model.encode_texts([text for *_, text in text_rows[i:i + batch_size]]).float().cpu()
                        for i in range(0, len(text_rows), batch_size)]
        np.save(out / "text_shared.npy", torch.cat(embedded).numpy() if embedded
                else np.zeros((0, model.config.embed_dim), np.float32))
        write_csv(out / "text_index.csv", ["row", "file", "line"],
                  [(row, file, line) for row, (file, line, _) in enumerate(text_rows)])
    write_csv(out / "errors.csv", ["input", "reason"], errors)
    return EmbedSummary(out, len(index), encoder.num_features, len(errors), len(text_rows))
