"""``dex predict``: a fine-tuned model (``dex finetune``) run on new images, DICOM objects and series, and NIfTI
volumes.

Inputs are found and read as :mod:`dex.downstream.inputs` describes (the model folder's preprocessing drives the
reading; ``volume_normalization`` and ``slice_axis`` may be overridden), and fed in batches across inputs. A
segmentation model runs as its folder's ``inference`` block says: a Gaussian sliding window over each picture at its
own resolution (a model trained on patches) or over the picture resized to the model's input, with the test-time
mirroring it was planned with (:mod:`dex.downstream.windows`). ``tta`` overrides the mirroring: ``none``, ``flip``
(the picture and its left-right mirror image, averaged, mirrored back) or ``mirror`` (every combination of
left-right and up-down); ``auto`` keeps the model's (none for classification and for models without an inference
block).

- Classification: ``predictions.csv``: ``input``, ``slice`` (a volume's slice or a DICOM object's frame; empty for
  an image), ``predicted`` (the class name) and ``p_<class>`` for every class; an input of several slices or frames
  also has one aggregated row (``slice`` = ``all``): the mean of its slices' probabilities (our choice).
- Segmentation: label maps at the input's own resolution (predicted there by a model trained on patches; else the
  probabilities resized, bilinear, before the argmax, as fine-tuning's Dice scores them). An image gives an 8-bit
  PNG of class indices in ``masks/`` named after it
  (its frames: ``NAME_0003.png``); a volume or DICOM series is segmented slice by slice along the model's axis and
  written as ``masks/NAME.nii.gz``, a NIfTI label volume of the input's shape and affine (for a series: its geometry,
  the voxel axes column, row and slice in position order; :func:`dex.data.volumes.source_grid`). With ``dicom_seg`` a
  DICOM series of single-frame files (or a single-frame DICOM image) also gets ``masks/NAME.seg.dcm``, a DICOM
  Segmentation object (highdicom) referencing its source; a multi-frame volume gets the NIfTI only.
  ``predictions.csv`` lists ``input``, ``slice``, ``mask`` and the pixels (voxels) of each class.

Ground truth (``labels``: a folder of label volumes ``NAME.nii.gz`` and masks ``NAME.png``, or a CSV ``id,label``
for classification; or a task folder given as the input, whose ``split`` images are predicted against its masks or
labels) adds ``metrics.csv`` (per case) and ``metrics.json`` (the mean): Dice and HD95 of each class, in 3D (mm)
for volumes and in pixels for images (MONAI), or the classification metrics of fine-tuning. A task folder with a
``roi/`` folder is scored inside each image's region of interest (outside it, prediction and truth count as
background), as fine-tuning scores it; ``metrics.json`` names the rule (``scored``) and HD95's unit.

An input that cannot be read, a DICOM object of another modality than the model's, or a ground truth that does not
fit its input is listed in ``errors.csv`` with the reason, and the others carry on.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from dex.data.readers import Problem, ReadError, read_label_map
from dex.data.tasks import SPLITS, load_task, mask_labels, roi_mask
from dex.data.volumes import SLICE_AXES, read_label_volume, source_grid
from dex.downstream.inputs import Case, find_inputs, read_cases, reading, run_batched
from dex.downstream.metrics import classification_metrics, label_map, segmentation_case_metrics
from dex.downstream.task_model import TaskModel, load_model
from dex.downstream.windows import mirrored
from dex.files import write_csv, write_json

MASK_SUFFIXES = (".png", ".gif", ".bmp", ".tif", ".tiff")


class PredictSummary(NamedTuple):
    out: Path
    predicted: int  # inputs predicted (images, volumes, series)
    errors: int


TTA = {"auto": None, "none": "none", "flip": "x", "mirror": "xy"}  # --tta -> the mirroring of dex.downstream.windows


@torch.no_grad()
def probabilities(model: TaskModel, images: torch.Tensor, tta: str = "auto", batch_size: int = 8) -> torch.Tensor:
    """The model's class probabilities of model inputs [B, 3, H, W] ([B, C], or [B, C, H, W]), mirrored as ``tta``
    says (see the module); a segmentation model with an inference block runs its sliding window, ``batch_size``
    windows a forward."""
    if tta not in TTA:
        raise ValueError(f"tta must be one of {', '.join(TTA)}, got {tta!r}")
    if model.inference is not None:
        return model.predict(images, TTA[tta], batch_size)
    if model.task_type == "segmentation":  # a folder written before inference blocks: whole inputs
        return mirrored(lambda x: model.network(x).float(), TTA[tta] or "none")(images).softmax(1)
    if tta == "mirror":
        raise ValueError("tta mirror (up-down too) is for segmentation; a classifier takes none or flip")
    probs = model.predict(images)
    if tta == "flip":
        probs = (probs + model.predict(images.flip(-1))) / 2
    return probs


class GroundTruth:
    """Where a case's truth is: a ``labels`` folder (label volumes, masks) or CSV (``id,label``), or the task
    folders given as inputs (their masks and labels, by image file)."""

    def __init__(self, labels: str | Path | None) -> None:
        self.folder: Path | None = None
        self.table: dict[str, str] = {}
        self.by_source: dict[str, Any] = {}  # image file of a task -> its mask labels (callable) or class name
        self.regions: dict[str, Any] = {}  # image file of a task with roi/ -> its region of interest (callable)
        if labels is None:
            return
        labels = Path(labels)
        table = labels if labels.is_file() else labels / "labels.csv"
        if labels.is_file() or table.is_file():
            with open(table, newline="") as handle:
                rows = list(csv.DictReader(handle))
            if rows and not {"id", "label"} <= set(rows[0]):
                raise ValueError(f"{table}: expected the columns id and label, found {', '.join(rows[0])}")
            self.table = {row["id"]: row["label"] for row in rows}
        if labels.is_dir():
            self.folder = labels
        elif not labels.is_file():
            raise FileNotFoundError(f"{labels}: no such labels folder or file")

    @property
    def given(self) -> bool:
        return bool(self.folder or self.table or self.by_source)

    def add_task(self, folder: Path, split: str) -> list[Path]:
        """The image files of a task folder's ``split`` (``all``: every split), with their truth registered."""
        task = load_task(folder)
        ids = [i for name in SPLITS if split in (name, "all") for i in task.splits[name]]
        for item in ids:
            image = str(task.images[item])
            self.by_source[image] = (task.spec.classes[task.labels[item]] if task.spec.type == "classification"
                                     else (lambda item=item: mask_labels(task, item)))
            if task.rois:
                self.regions[image] = lambda item=item: roi_mask(task, item)
        return [task.images[i] for i in ids]

    def label(self, case: Case) -> str | None:
        if case.source in self.by_source:
            return self.by_source[case.source]
        return self.table.get(case.name.as_posix(), self.table.get(case.name.name))

    def labels(self, case: Case) -> np.ndarray | None:
        """The case's label map ([H, W] for an image, [Z, Y, X] in the display layout for a volume), or None; a
        truth that does not fit the case raises ReadError naming the file."""
        if case.source in self.by_source:
            return self.by_source[case.source]()
        if self.folder is None:
            return None
        if case.volume is None:
            for suffix in MASK_SUFFIXES:
                if (path := self.folder / case.name.with_name(case.name.name + suffix)).is_file():
                    return read_label_map(path)
            return None
        stem = case.name.name
        names = [stem, stem[:-5]] if stem.endswith("_0000") else [stem]  # nnU-Net: CASE_0000 is channel 0 of CASE
        for name in names:
            for suffix in (".nii.gz", ".nii"):
                if (path := self.folder / case.name.with_name(name + suffix)).is_file():
                    return read_label_volume(path, case.volume, case.source)
        return None


def _slice_name(index: int) -> str:
    return "" if index < 0 else str(index)


def write_label_volume(labels: np.ndarray, case: Case, path: Path) -> None:
    """A [Z, Y, X] display-layout label volume as NIfTI in the input's voxel grid, shape and affine."""
    affine = case.volume.meta["source_affine"]
    image = nib.Nifti1Image(source_grid(labels.astype(np.uint8), affine), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def write_dicom_seg(labels: np.ndarray, case: Case, classes: Sequence[str], path: Path) -> None:
    """A DICOM Segmentation object (highdicom, one binary segment per foreground class) of a series' [Z, Y, X]
    display-layout labels (or a single-frame image's [H, W] labels), referencing the source files.

    The segments' property category is SNOMED CT "Tissue" and their type a code of a private scheme ``99DEX`` whose
    meaning is the class name (ours: a model's class names are free text)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from dex._version import __version__

    sources = [pydicom.dcmread(f) for f in case.dicom_files]
    if case.volume is not None:  # source grid (column, row, slice k) -> frames [k, row, column]
        frames = source_grid(labels.astype(np.uint8), case.volume.meta["source_affine"]).transpose(2, 1, 0)
    else:
        frames = labels.astype(np.uint8)[None]
    algorithm = hd.AlgorithmIdentificationSequence(name="dex", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=name[:64], segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=hd.sr.CodedConcept(f"DEX{number}", "99DEX", name[:64]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for number, name in enumerate(classes[1:], start=1)]
    with warnings.catch_warnings():  # highdicom's remarks on the source's own attributes (e.g. its patient name)
        warnings.filterwarnings("ignore", message=".*person name", category=UserWarning)
        segmentation = hd.seg.Segmentation(
            source_images=sources, pixel_array=np.ascontiguousarray(frames), segment_descriptions=segments,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, series_instance_uid=hd.UID(), series_number=900,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="dex", manufacturer_model_name="dex predict",
            software_versions=__version__, device_serial_number="none", omit_empty_frames=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    segmentation.save_as(path)


def predict(model_dir: str | Path, inputs: Sequence[str | Path], out: str | Path, batch_size: int = 16,
            device: str = "cpu", tta: str = "auto", labels: str | Path | None = None,
            split: str = "test", dicom_seg: bool = False, volume_normalization: str | None = None,
            slice_axis: str | None = None) -> PredictSummary:
    """Run the model of ``model_dir`` on ``inputs`` and write ``out``; see the module's docstring."""
    if tta not in TTA:
        raise ValueError(f"tta must be one of {', '.join(TTA)}, got {tta!r}")
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or all, got {split!r}")
    model = load_model(model_dir, device)
    preprocessing = reading(model.preprocessing, volume_normalization, slice_axis)
    truth = GroundTruth(labels)
    paths = [file for item in map(Path, inputs)
             for file in (truth.add_task(item, split) if (item / "task.yaml").is_file() else [item])]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    errors: list[Problem] = []
    writer = _Writer(model, out, truth, dicom_seg, errors)
    native = preprocessing.fit == "native"  # pictures of their own sizes: one a forward, its windows batched
    run_batched(read_cases(find_inputs(paths, errors), preprocessing, errors), preprocessing.picture_input,
                lambda x: probabilities(model, x, tta, batch_size).cpu(), 1 if native else batch_size, writer.finish,
                device)
    writer.close()
    write_csv(out / "errors.csv", ["input", "reason"], errors)
    return PredictSummary(out, writer.cases, len(errors))


class _Writer:
    """Writes each case's outputs as soon as all its pictures are predicted, and the tables at the end."""

    def __init__(self, model: TaskModel, out: Path, truth: GroundTruth, dicom_seg: bool,
                 errors: list[Problem]) -> None:
        self.model, self.out, self.truth, self.dicom_seg, self.errors = model, out, truth, dicom_seg, errors
        self.segmentation = model.task_type == "segmentation"
        self.rows: list[list[Any]] = []
        self.metric_rows: list[list[Any]] = []
        self.scores: list[tuple[torch.Tensor, int]] = []  # classification: (probabilities, true class index)
        self.cases = 0

    def finish(self, case: Case, probs: list[torch.Tensor]) -> None:
        self.cases += 1
        (self._segmentation if self.segmentation else self._classification)(case, probs)

    def _classification(self, case: Case, probs: list[torch.Tensor]) -> None:
        classes = self.model.classes
        for (index, _), p in zip(case.pictures, probs):
            self.rows.append([case.source, _slice_name(index), classes[int(p.argmax())],
                              *(f"{v:.6f}" for v in p.tolist())])
        mean = torch.stack(probs).mean(0)
        if len(probs) > 1:
            self.rows.append([case.source, "all", classes[int(mean.argmax())], *(f"{v:.6f}" for v in mean.tolist())])
        label = self.truth.label(case)
        if label is None:
            return
        if label not in classes:
            self.errors.append(Problem(case.source, f"its label {label!r} is not one of the model's classes"))
            return
        self.scores.append((mean, classes.index(label)))
        self.metric_rows.append([case.source, label, classes[int(mean.argmax())]])

    def _segmentation(self, case: Case, probs: list[torch.Tensor]) -> None:
        classes = self.model.classes
        maps = [label_map(p, tuple(picture.pixels.shape[:2])).numpy().astype(np.uint8)
                for (_, picture), p in zip(case.pictures, probs)]
        if case.volume is not None:
            labels = np.stack(maps, axis=SLICE_AXES[case.axis])
            mask = Path("masks") / case.name.with_name(case.name.name + ".nii.gz")
            write_label_volume(labels, case, self.out / mask)
            self.rows.append([case.source, "all", mask.as_posix(), *np.bincount(labels.ravel(), minlength=len(
                classes)).tolist()])
        else:
            for (index, _), picture_labels in zip(case.pictures, maps):
                name = case.name.name if index < 0 else f"{case.name.name}_{index:04d}"
                mask = Path("masks") / case.name.with_name(name + ".png")
                (self.out / mask).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(picture_labels).save(self.out / mask)
                self.rows.append([case.source, _slice_name(index), mask.as_posix(),
                                  *np.bincount(picture_labels.ravel(), minlength=len(classes)).tolist()])
            labels = maps[0] if len(maps) == 1 else None  # the frames of a multi-frame object are not one case
        if self.dicom_seg and case.dicom_files and labels is not None:
            seg = self.out / "masks" / case.name.with_name(case.name.name + ".seg.dcm")
            write_dicom_seg(labels, case, classes, seg)
        if labels is not None:
            self._score_segmentation(case, labels)

    def _score_segmentation(self, case: Case, labels: np.ndarray) -> None:
        try:
            truth = self.truth.labels(case)
        except ReadError as err:
            self.errors.append(Problem(err.path, err.reason))
            return
        if truth is None:
            return
        if truth.shape != labels.shape:
            self.errors.append(Problem(case.source, f"its ground truth is {truth.shape}, the input {labels.shape}"))
            return
        if truth.min() < 0 or truth.max() >= len(self.model.classes):
            self.errors.append(Problem(case.source, f"its ground truth has values {int(truth.min())} to "
                                                    f"{int(truth.max())}, the model {len(self.model.classes)} classes"))
            return
        spacing = case.volume.spacing if case.volume is not None else (1.0, 1.0)
        if case.source in self.truth.regions:  # scored inside the task's region of interest only
            inside = self.truth.regions[case.source]()
            labels, truth = labels * inside, truth * inside
        dice, hd95 = segmentation_case_metrics(labels, truth, len(self.model.classes), spacing)
        for name, d, h in zip(self.model.classes[1:], dice, hd95):
            self.metric_rows.append([case.source, name, f"{d:.6f}", "" if math.isnan(h) else f"{h:.4f}",
                                     "mm" if case.volume is not None else "px"])

    def close(self) -> None:
        classes = self.model.classes
        if self.segmentation:
            write_csv(self.out / "predictions.csv", ["input", "slice", "mask", *(f"pixels_{c}" for c in classes)],
                      self.rows)
        else:
            write_csv(self.out / "predictions.csv", ["input", "slice", "predicted", *(f"p_{c}" for c in classes)],
                      self.rows)
        if not self.truth.given:
            return
        if self.segmentation:
            write_csv(self.out / "metrics.csv", ["input", "class", "dice", "hd95", "hd95_unit"], self.metric_rows)
            summary = {"cases": len({row[0] for row in self.metric_rows}), "dice": {}, "hd95": {}}
            for name in classes[1:]:
                rows = [row for row in self.metric_rows if row[1] == name]
                hd = [float(row[3]) for row in rows if row[3]]
                summary["dice"][name] = float(np.mean([float(row[2]) for row in rows])) if rows else math.nan
                summary["hd95"][name] = float(np.mean(hd)) if hd else math.nan
            summary["mean_dice"] = float(np.mean(list(summary["dice"].values()))) if classes[1:] else math.nan
            summary["scored"] = ("inside each image's region of interest (the task's roi/)" if self.truth.regions
                                 else "every pixel")
            summary["hd95_unit"] = "mm for volumes, pixels for images"
        else:
            write_csv(self.out / "metrics.csv", ["input", "label", "predicted"], self.metric_rows)
            summary = {"cases": len(self.scores)}
            if self.scores:
                probs = torch.stack([p for p, _ in self.scores])
                target = torch.tensor([t for _, t in self.scores])
                summary |= classification_metrics(probs.clamp_min(1e-12).log(), target)
        write_json(self.out / "metrics.json", summary)
