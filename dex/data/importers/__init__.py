"""Turn the layouts public medical datasets are released in into dex task folders (see :mod:`dex.data.tasks`).

Layouts (``dex data import-task LAYOUT SRC OUT``):

- ``class-folders``: ``SRC/[split/]class/<image>`` (torchvision's ImageFolder; Kermany chest X-ray, OCTDL, the
  Kaggle brain-tumour MRI set). Top-level folders named like splits (train, Training, val, test, Testing, ...) give
  the split.
- ``csv``: a CSV naming each image (id or relative path) and its label (APTOS 2019, ISIC ground truth).
- ``pairs``: images and masks matched by name, in two folders or one (Kvasir-SEG, ISIC, BUSI ``X_mask.png``,
  CHASE ``X_1stHO.png``, FIVES), or by the id before the first ``_`` (DRIVE ``21_training.tif`` and
  ``21_manual1.gif``), with an optional region of interest per image (DRIVE's field-of-view masks).
- ``volumes``: image volumes (NIfTI, or a folder per DICOM series) and NIfTI label volumes (Medical Segmentation
  Decathlon, nnU-Net ``X_0000.nii.gz``, KiPA, FeTA, AutoPET, hospital series with labels drawn in 3D Slicer or
  ITK-SNAP) cut into 2D slices after the volume-wise Table 2 normalisation, split by case so that no patient is in
  two splits.
- ``medmnist``: a MedMNIST(+) 2D ``.npz`` (its own train / val / test split).

Every importer writes into ``OUT.partial`` with a journal of the source items done, and renames it to ``OUT`` at
the end: a killed import resumes where it was when run again with ``--resume``. An item that cannot be read or
does not fit (mask size, unknown label value) is recorded in ``problems.csv`` with the file and the reason, and
the import carries on. A relative folder or file given by a flag (``--images``, ``--masks``, ``--rois``,
``--labels``, ``--splits``) is taken below SRC (the CSV's folder for the csv layout) when it is there, else from the
working directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dex.data.dedup import IMPORT_DUPLICATE_DISTANCE, IMPORT_HASH_SIZE
from dex.data.importers.class_folders import import_class_folders
from dex.data.importers.csv_table import import_csv
from dex.data.importers.masks import MaskMapping
from dex.data.importers.medmnist import import_medmnist
from dex.data.importers.pairs import import_pairs
from dex.data.importers.volumes import import_volumes
from dex.data.importers.writer import (
    COPIED_SUFFIXES,
    GREY_MODES,
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    SPLIT_ALIASES,
    ImportSummary,
    Item,
    MakeItems,
    TaskWriter,
)
from dex.data.normalize import SLICE_AXES
from dex.data.tasks import CLASSIFICATION_METRICS, TaskSpec

__all__ = [
    "COPIED_SUFFIXES", "GREY_MODES", "IMAGE_SUFFIXES", "LAYOUTS", "MASK_SUFFIXES", "SPLIT_ALIASES", "ImportOptions",
    "ImportSummary", "Item", "MakeItems", "MaskMapping", "TaskWriter", "import_class_folders", "import_csv",
    "import_medmnist", "import_pairs", "import_task", "import_volumes",
]

LAYOUTS = ("class-folders", "csv", "pairs", "volumes", "medmnist")


def _option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, help: str,
            **flag: Any) -> Any:
    """A field of :class:`ImportOptions` with what its ``dex data import-task`` flag needs in the field's metadata:
    ``help``, and where they apply ``flag`` (when it is not ``--field-name``), ``choices``, ``metavar``,
    ``required`` and ``separator`` (a list given as one value split at it, not as a repeated flag)."""
    return field(default=default, default_factory=factory, metadata={"help": help, **flag})


@dataclass
class ImportOptions:
    """What ``dex data import-task`` takes besides the layout, the source and the output folder: each field is a
    flag (``--field-name``, help text in the field's metadata; see :func:`_option`)."""

    modality: str = _option("unknown", required=True,
                            help="imaging modality: CT, PET, MR, X-ray, US, Fundus, OCT, Pathology, Endoscopy, "
                                 "Photo (any case), or another name")
    name: str = _option("", help="task name (default: the output folder's name)")
    classes: list[str] = _option(factory=list, separator=",",
                                 help="comma-separated class names; segmentation: in mask index order (default "
                                      "background,foreground); classification: fixes the order (default: sorted)")
    images: str | None = _option(None, help="csv, pairs: the image folder (default: the CSV's folder; pairs: SRC)")
    masks: str | None = _option(None, help="pairs: the mask folder (default: the image folder); PNG, GIF, BMP, TIFF "
                                           "or JPEG masks")
    rois: str | None = _option(None, help="pairs: a folder of regions of interest, one per image, nonzero inside "
                                          "(e.g. fundus field-of-view masks), stored as roi/<id>.png")
    labels: str | None = _option(None, help="volumes: the folder of label volumes")
    mask_pattern: str = _option("{stem}", help="pairs: a mask's name from its image's stem, e.g. {stem}_mask* "
                                               "(* for several masks per image, merged); default {stem}, and masks in "
                                               "a folder of their own named otherwise (DRIVE 21_manual1 for "
                                               "21_training) are paired by the name before the first '_' when no "
                                               "two images and no two masks share it")
    roi_pattern: str = _option("{stem}", help="pairs: a region of interest's name from its image's stem, e.g. "
                                              "{stem}_mask; default {stem}, else as for masks")
    mask_values: list[str] = _option(factory=list, flag="--mask-value", metavar="VALUE=CLASS",
                                     help="a mask value (255, or R,G,B for colour masks) and its class; repeat for "
                                          "each")
    class_masks: list[str] = _option(factory=list, flag="--class-mask", metavar="CLASS=PATTERN",
                                     help="pairs, one binary mask per class: the class and its masks' name pattern "
                                          "below --masks, e.g. 'microaneurysm=1. Microaneurysms/{stem}_MA'; repeat "
                                          "for each class (later ones painted over earlier ones)")
    id_column: str = _option("id", help="csv: the column naming the image (id)")
    label_column: str = _option("label", help="csv: the label column (label), or onehot:A,B,C for one-hot columns")
    split_column: str | None = _option(None, help="csv: a column with the split (train / val / test)")
    normalization: str = _option("ct_hu", choices=["ct_hu", "mr_percentile", "pet_suv", "pet_raw"],
                                 help="volumes: Table 2 normalisation (ct_hu)")
    axis: str = _option("axial", choices=list(SLICE_AXES), help="volumes: slice axis (axial)")
    slices: str = _option("foreground", choices=["foreground", "all"],
                          help="volumes: keep slices with a label (foreground, the default) or all")
    stride: int = _option(1, help="volumes: keep every n-th slice (1)")
    channel: int = _option(0, help="volumes: the channel of 4D or nnU-Net multi-file images (0)")
    splits: str | None = _option(None, help="an id,split CSV with the dataset's own split (ids: image stems or "
                                            "volume case names)")
    seed: int = _option(0, help="seed of the 60/20/20 split where the source has none (0)")
    duplicate_distance: int = _option(IMPORT_DUPLICATE_DISTANCE,
                                      help=f"bits of a {IMPORT_HASH_SIZE ** 2}-bit pHash within which images count "
                                           f"as near-duplicates (re-saved or resized copies) and share a split "
                                           f"({IMPORT_DUPLICATE_DISTANCE}; -1: off)")  # any value < 0: off
    description: str = _option("", help="one line on the task for its README")
    source: str = _option("", help="where the data comes from (citation or address)")
    licence: str = _option("", help="the data's licence")


def import_task(layout: str, src: str | Path, out: str | Path, options: ImportOptions | None = None,
                resume: bool = False, overwrite: bool = False, workers: int = 1) -> ImportSummary:
    """Import the dataset at ``src`` (laid out as ``layout``, one of :data:`LAYOUTS`) as a task folder ``out``
    with ``workers`` threads; the folder is the same whatever their number."""
    options = options or ImportOptions()
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: one of {LAYOUTS}")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if options.rois is not None and layout != "pairs":
        raise ValueError(f"--rois {options.rois}: regions of interest are imported with the pairs layout only")
    images, masks, rois, labels, splits = (_below_src(src, flag, getattr(options, flag))
                                           for flag in ("images", "masks", "rois", "labels", "splits"))
    segmentation = layout in ("pairs", "volumes")
    class_masks = [pair.partition("=")[::2] for pair in options.class_masks]
    if any(not name or not pattern or "{stem}" not in pattern for name, pattern in class_masks):
        raise ValueError(f"--class-mask {options.class_masks}: expected CLASS=PATTERN with {{stem}} in the pattern")
    default = ["background", *(name for name, _ in class_masks)] if class_masks else ["background", "foreground"]
    classes = list(options.classes) or (default if segmentation else [])
    unknown = [name for name, _ in class_masks if name not in classes]
    if unknown:
        raise ValueError(f"--class-mask classes {unknown} are not among the classes {classes}")
    mapping = MaskMapping.parse(classes, options.mask_values)
    settings = {"layout": layout, "src": str(src), "phash_bits": IMPORT_HASH_SIZE ** 2, **dataclasses.asdict(options)}
    writer = TaskWriter(out, resume=resume, overwrite=overwrite, workers=workers, settings=settings)
    if layout == "class-folders":
        import_class_folders(src, writer, splits)
    elif layout == "csv":
        import_csv(src, images or src.parent, writer, options.id_column, options.label_column, options.split_column)
    elif layout == "pairs":
        import_pairs(images or src, writer, mapping, masks, options.mask_pattern, splits,
                     [(classes.index(name), pattern) for name, pattern in class_masks], rois, options.roi_pattern)
    elif layout == "volumes":
        if labels is None:
            raise ValueError("the volumes layout needs --labels (the folder of label volumes)")
        import_volumes(src, labels, writer, mapping, options.normalization, options.axis, options.slices,
                       options.stride, options.channel, splits, options.seed)
    else:
        classes = import_medmnist(src, writer, classes)
    spec = TaskSpec(
        name=options.name or out.name, type="segmentation" if segmentation else "classification",
        modality=options.modality, classes=classes, image_size=[0, 0], channels=1,
        description=options.description, source=options.source or f"{src} ({layout} layout)",
        licence=options.licence or "see the source",
        metrics=["dice"] if segmentation else list(CLASSIFICATION_METRICS),
        **({"volume_normalization": options.normalization, "slice_axis": options.axis} if layout == "volumes" else {}),
    )
    return writer.finish(spec, options.seed, options.duplicate_distance)


def _below_src(src: Path, flag: str, given: str | None) -> Path | None:
    """The path a flag gives: a relative one is taken below SRC (SRC's folder when SRC is a file) when it is there,
    else from the working directory; one found in neither place is an error naming the flag."""
    if given is None:
        return None
    base, path = (src if src.is_dir() else src.parent), Path(given)
    if not path.is_absolute() and (base / path).exists():
        return base / path
    if not path.exists():
        raise FileNotFoundError(f"--{flag} {given}: no such file or folder"
                                + ("" if path.is_absolute() else f" below {base} or in the working directory"))
    return path
