"""Curation recipes: the list of raw sources a MedVerse-style collection is built from (App. C.1.1, Table 2).

A recipe is YAML::

    name: my-medverse
    sources:
      - name: autopet-ct            # unique
        modality: CT                # one of MODALITIES
        anatomy: Whole body
        root: /data/autopet/ct      # relative paths are relative to the recipe file; may be left empty
        format: nifti               # one of FORMATS
        pattern: "**/*.nii.gz"      # glob below root
        normalization: ct_hu        # one of NORMALIZATIONS (Table 2)
        slice_axis: axial           # volumes only
        frame_stride: 30            # videos only
        licence: CC BY 4.0
        reported_count: 558473      # what the paper reports, if any

A source of ``format: image`` may name ``index_csv`` (relative to its root): a CSV with a ``path`` column listing the
files, and optionally ``modality`` (for folders that mix modalities; the source's otherwise) and ``anatomy``. With
a ``report`` column the source gives image-report pairs (the layout of ROCO, PMC-OA or a MIMIC-CXR export), and
an optional ``report_type`` (the modality otherwise) names the kind of report; the shards carry each report as the
sample's ``.txt`` member, and a row whose report is empty is quarantined. Reports are copied as given: de-identify
hospital reports before curating them.

``hold_out`` keeps the images of task splits out of the collection, so that a model pretrained on it can be
evaluated on those tasks without having seen their test images::

    hold_out:
      - task: ../tasks/us-breast-busi   # a task folder (dex.data.tasks.load_task), relative to the recipe file
        splits: [test]                  # the default
        seed: 0                         # the seed of the 60/20/20 split of a folder without splits.csv

``include`` lists other recipe files (relative to this one) whose sources and hold-outs come first::

    include: [../runs/cpu/phantoms/recipe.yaml]

A file is held out when its resolved path is the image of a held-out id; the match is by path, so an image copied
elsewhere under another name is not caught (near-duplicates are only removed within a source).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pydantic
import yaml

from dex.config import STRICT, ConfigError, read_yaml, validate
from dex.data.normalize import SLICE_AXES

MODALITIES = ("CT", "PET", "MR", "X-ray", "US", "Fundus", "OCT", "Pathology", "Endoscopy", "Photo")
FORMATS = ("dicom", "nifti", "image", "npy", "video")
#: Table 2's normalisations: CT clip [-200, 400] HU then [0, 1]; MR volume 1-99th percentile clip then min-max;
#: PET raw percentile clip, z-score, min-max; PET SUV clip [0, 20] / 20; everything else x / (2^bits - 1).
NORMALIZATIONS = ("ct_hu", "mr_percentile", "pet_raw", "pet_suv", "scale_255")


def canonical_modality(name: str) -> str:
    """The :data:`MODALITIES` spelling of ``name``, matched regardless of case, spaces, hyphens and underscores
    ("fundus", "xray", "x_ray" -> "Fundus", "X-ray"); any other name comes back as it is."""
    def letters(text: str) -> str:
        return "".join(c for c in str(text).lower() if c.isalnum())

    return next((m for m in MODALITIES if letters(m) == letters(name)), name)


Modality = Annotated[Literal[MODALITIES], pydantic.BeforeValidator(canonical_modality)]


@STRICT
@dataclass
class Source:
    name: str
    modality: Modality
    root: str
    format: Literal[FORMATS]
    normalization: Literal[NORMALIZATIONS]
    anatomy: str = ""
    pattern: str = "**/*"
    slice_axis: Literal[tuple(SLICE_AXES)] = "axial"
    frame_stride: int = 30
    licence: str = ""
    reported_count: int | None = None
    index_csv: str = ""

    def __post_init__(self) -> None:
        self.modality = canonical_modality(self.modality)
        if self.index_csv and self.format != "image":
            raise ValueError(f"source {self.name!r}: index_csv is only for format: image")
        if self.frame_stride < 1:
            raise ValueError(f"source {self.name!r}: frame_stride must be at least 1, got {self.frame_stride}")


@STRICT
@dataclass
class HoldOut:
    """The splits of one task whose images stay out of the collection."""

    task: str
    splits: list[Literal["train", "val", "test"]] = field(default_factory=lambda: ["test"])
    seed: int = 0


@STRICT
@dataclass
class RecipeFile:
    """The schema of a recipe file."""

    sources: list[Source] = field(default_factory=list)
    name: str | None = None
    hold_out: list[HoldOut] = field(default_factory=list)
    include: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    name: str
    sources: list[Source] = field(default_factory=list)
    path: Path | None = None  # the file it was read from: relative roots resolve against its folder
    hold_out: list[HoldOut] = field(default_factory=list)

    def resolve(self, folder: str) -> Path:
        """A path of the recipe (a source's root, a held-out task) as an absolute path: relative ones are relative to
        the recipe file."""
        path = Path(folder).expanduser()
        return path if path.is_absolute() or self.path is None else self.path.parent / path

    def root_of(self, source: Source) -> Path | None:
        """The source's root folder as an absolute path, or None when the recipe leaves it empty."""
        return self.resolve(source.root) if source.root else None

    def save(self, path: str | Path) -> None:
        data = {"name": self.name, "sources": [dataclasses.asdict(s) for s in self.sources]}
        if self.hold_out:
            data["hold_out"] = [dataclasses.asdict(h) for h in self.hold_out]
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load(cls, path: str | Path, _including: tuple[Path, ...] = ()) -> Recipe:
        path = Path(path)
        if path.resolve() in _including:
            raise ConfigError(f"{path}: includes itself (through {' -> '.join(str(p) for p in _including)})")
        data = validate(RecipeFile, read_yaml(path, "recipe"), str(path))
        recipe = cls(data.name or path.stem, [], path)
        for name in data.include:  # their sources and hold-outs first, their paths made absolute
            inner = cls.load(recipe.resolve(name), (*_including, path.resolve()))
            recipe.sources += [dataclasses.replace(s, root=str(inner.root_of(s).resolve()) if s.root else "")
                               for s in inner.sources]
            recipe.hold_out += [dataclasses.replace(h, task=str(inner.resolve(h.task).resolve()))
                                for h in inner.hold_out]
        recipe.sources += data.sources
        recipe.hold_out += data.hold_out
        if not recipe.sources:
            raise ConfigError(f"{path}: sources: the recipe lists no source (and includes none)")
        names = [s.name for s in recipe.sources]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"{path}: source names {twice} are used twice; each source needs its own")
        return recipe
