"""The ``pairs`` layout: images and masks matched by name, in two folders or one, or one binary mask per class;
optionally a region of interest per image (a fundus field of view)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dex.data.importers.masks import MaskMapping, _read_binary_mask
from dex.data.importers.writer import (
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    Item,
    MakeItems,
    TaskWriter,
    _clean,
    _images_in,
    _read_split_file,
    _unique_ids,
)
from dex.data.readers import Problem, ReadError, read_mask_pixels


def _name_regex(pattern: str) -> re.Pattern:
    """``{stem}_mask*`` -> a regex with a ``stem`` group; ``*`` stays within one path part."""
    body = re.escape(pattern).replace(r"\{stem\}", "(?P<stem>[^/]+?)").replace(r"\*", "[^/]*")
    return re.compile(f"^{body}$")


def _match_masks(candidates: Sequence[Path], root: Path, pattern: str) -> dict[str, list[Path]]:
    """Image stem -> the files whose name (without suffix; the path below ``root`` when the pattern has a ``/``)
    matches ``pattern``."""
    regex, out = _name_regex(pattern), {}
    for path in candidates:
        name = path.relative_to(root).with_suffix("").as_posix() if "/" in pattern else path.stem
        match = regex.match(name)
        if match:
            out.setdefault(match.group("stem"), []).append(path)
    return out


def _leading_id(stem: str) -> str:
    """The name before the first ``_``: ``21`` of ``21_training`` and of ``21_manual1``."""
    return stem.split("_", 1)[0]


@dataclass
class _Pairing:
    """Image stem -> its files (masks, or regions of interest), and how they were paired, for the message of an image
    left without one."""

    files: dict[str, list[Path]]
    pattern: str
    by_leading_id: bool = False
    why_not_by_leading_id: str = ""

    def missing(self, stem: str, what: str, folder: Path, flag: str) -> str:
        """Why the image ``stem`` has no file, and what to do about it: one line."""
        if self.by_leading_id:
            return (f"no {what} with the leading id {_leading_id(stem)!r} in {folder} (images and files are paired by "
                    "the name before the first '_')")
        message = f"no {what} named {self.pattern.replace('{stem}', stem)}.* in {folder}"
        if self.why_not_by_leading_id:
            message += (f"; give {flag} for files named otherwise than their image (e.g. {{stem}}_mask); pairing "
                        f"by the name before the first '_' is off: {self.why_not_by_leading_id}")
        return message


def _pairing(named: dict[str, list[Path]], pattern: str, stems: Sequence[str], files: Sequence[Path]) -> _Pairing:
    """``named`` (image stem -> the ``files`` that ``pattern`` names), or, where the pattern is the plain ``{stem}``
    and names no file of any image, the files paired with the images by leading id (:func:`_leading_id`; DRIVE:
    ``21_training.tif`` with ``21_manual1.gif``). That pairing is used only when it is unambiguous: no two images
    and no two files share a leading id."""
    if pattern != "{stem}" or any(stem in named for stem in stems):
        return _Pairing(named, pattern)
    by_id: dict[str, list[Path]] = {}
    for path in files:
        by_id.setdefault(_leading_id(path.stem), []).append(path)
    shared = sorted(i for i, n in Counter(map(_leading_id, stems)).items() if n > 1)
    if shared:
        first, second = sorted(s for s in stems if _leading_id(s) == shared[0])[:2]
        return _Pairing(named, pattern, why_not_by_leading_id=f"images {first} and {second} share {shared[0]!r}")
    doubled = sorted(i for i, paths in by_id.items() if len(paths) > 1)
    if doubled:
        first, second = by_id[doubled[0]][:2]
        return _Pairing(named, pattern, why_not_by_leading_id=f"{first.name} and {second.name} share {doubled[0]!r}")
    return _Pairing({s: by_id[_leading_id(s)] for s in stems if _leading_id(s) in by_id}, pattern, True)


def import_pairs(images: str | Path, writer: TaskWriter, mapping: MaskMapping, masks: str | Path | None = None,
                 mask_pattern: str = "{stem}", splits_file: str | Path | None = None,
                 class_patterns: Sequence[tuple[int, str]] = (), rois: str | Path | None = None,
                 roi_pattern: str = "{stem}") -> None:
    """Images and masks matched by name. ``mask_pattern`` gives a mask's name from its image's stem, with ``*``
    for several masks of one image (BUSI ``{stem}_mask*``: their labels are merged by the maximum); with a ``/``
    it is a path below ``masks``. ``masks`` defaults to the images folder; files in it that are masks are not taken
    as images. Masks may be PNG, GIF, BMP, TIFF or JPEG (:data:`MASK_SUFFIXES`). Masks in a folder of their own
    with names that share no image's stem are paired by leading id where that is unambiguous (:func:`_pairing`).

    ``rois``: a folder of regions of interest (nonzero inside, e.g. a fundus field of view), one per image, found as
    masks are (``roi_pattern``, else by leading id) and stored as ``roi/<id>.png``; an image without one is a
    problem.

    ``class_patterns``: (class index, pattern) for releases with one binary mask per class (IDRiD's lesion
    folders, JSRT/SCR's organ folders): each class's pixels are painted in the order given, later classes over
    earlier ones; an image needs at least one of them."""
    images = Path(images)
    masks = Path(masks) if masks is not None else images
    rois = Path(rois) if rois is not None else None
    if masks == images and mask_pattern == "{stem}" and not class_patterns:
        raise ValueError(f"{images}: masks in the image folder need a --mask-pattern such as {{stem}}_mask")
    if rois == images and roi_pattern == "{stem}":
        raise ValueError(f"{images}: regions of interest in the image folder need a --roi-pattern such as {{stem}}_fov")
    candidates = _images_in(masks, MASK_SUFFIXES)
    roi_candidates = _images_in(rois, MASK_SUFFIXES) if rois is not None else []
    per_class = [(index, _match_masks(candidates, masks, pattern)) for index, pattern in class_patterns]
    mask_files = {} if class_patterns else _match_masks(candidates, masks, mask_pattern)
    roi_files = _match_masks(roi_candidates, rois, roi_pattern) if rois is not None else {}
    is_mask = {p for found in [mask_files, roi_files, *(m for _, m in per_class)] for paths in found.values()
               for p in paths}
    sources = [p for p in _images_in(images) if p not in is_mask]
    if not sources:
        raise ValueError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    stems = [p.stem for p in sources]
    mask_pairing = (_Pairing({}, " or ".join(pattern for _, pattern in class_patterns)) if class_patterns
                    else _pairing(mask_files, mask_pattern, stems, candidates))
    roi_pairing = _pairing(roi_files, roi_pattern, stems, roi_candidates)
    ids = _unique_ids(sources, images)
    official = _read_split_file(splits_file)

    def read_layer(index: int, mask: Path) -> np.ndarray:
        return np.where(_read_binary_mask(mask), index, 0) if class_patterns else mapping(mask, read_mask_pixels(mask))

    def labels_of(path: Path, problems: list[Problem]) -> np.ndarray:
        if class_patterns:
            found = [(index, m) for index, matched in per_class for m in matched.get(path.stem, [])]
        else:
            found = [(0, m) for m in mask_pairing.files.get(path.stem, [])]
        if not found:
            raise ReadError(path, mask_pairing.missing(path.stem, "mask", masks, "--mask-pattern"))
        layers, errors = [], []
        for index, mask in found:  # every bad mask is named, not only the first
            try:
                layers.append(read_layer(index, mask))
            except ReadError as err:
                errors.append(err)
        if len(found) == 1 and errors:
            raise errors[0]
        if errors:
            problems.extend(err.problem for err in errors)
            raise ReadError(path, f"{len(errors)} of its {len(found)} masks could not be read")
        if any(layer.shape != layers[0].shape for layer in layers):
            raise ReadError(found[0][1], f"the masks of {path.name} differ in size")
        out = layers[0]
        for layer in layers[1:]:  # one class per file: later over earlier; several masks of one image: union
            out = np.where(layer > 0, layer, out) if class_patterns else np.maximum(out, layer)
        return out

    def roi_of(path: Path) -> np.ndarray | None:
        if rois is None:
            return None
        found = roi_pairing.files.get(path.stem, [])
        if not found:
            raise ReadError(path, roi_pairing.missing(path.stem, "region of interest", rois, "--roi-pattern"))
        if len(found) > 1:
            raise ReadError(path, f"{len(found)} regions of interest in {rois} are its own ({found[0].name}, "
                                  f"{found[1].name}); give a --roi-pattern that names one")
        return _read_binary_mask(found[0])

    def unit(path: Path) -> MakeItems:
        return lambda problems: [Item(_clean(ids[path]), path, mask=labels_of(path, problems),
                                      split=official.get(path.stem), roi=roi_of(path))]

    writer.run((str(path), unit(path)) for path in sources)
