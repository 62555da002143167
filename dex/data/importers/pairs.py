"""The ``pairs`` layout: images and masks matched by name, in two folders or one, or one binary mask per class."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dex.data.importers.masks import MaskMapping, _read_binary_mask
from dex.data.importers.writer import (
    IMAGE_SUFFIXES,
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


def import_pairs(images: str | Path, writer: TaskWriter, mapping: MaskMapping, masks: str | Path | None = None,
                 mask_pattern: str = "{stem}", splits_file: str | Path | None = None,
                 class_patterns: Sequence[tuple[int, str]] = ()) -> None:
    """Images and masks matched by name. ``mask_pattern`` gives a mask's name from its image's stem, with ``*``
    for several masks of one image (BUSI ``{stem}_mask*``: their labels are merged by the maximum); with a ``/``
    it is a path below ``masks``. ``masks`` defaults to the images folder; files in it that are masks are not taken
    as images.

    ``class_patterns``: (class index, pattern) for releases with one binary mask per class (IDRiD's lesion
    folders, JSRT/SCR's organ folders): each class's pixels are painted in the order given, later classes over
    earlier ones; an image needs at least one of them."""
    images = Path(images)
    masks = Path(masks) if masks is not None else images
    if masks == images and mask_pattern == "{stem}" and not class_patterns:
        raise ValueError(f"{images}: masks in the image folder need a --mask-pattern such as {{stem}}_mask")
    candidates = _images_in(masks)
    per_class = [(index, _match_masks(candidates, masks, pattern)) for index, pattern in class_patterns]
    mask_files = {} if class_patterns else _match_masks(candidates, masks, mask_pattern)
    is_mask = {p for found in [mask_files, *(m for _, m in per_class)] for paths in found.values() for p in paths}
    sources = [p for p in _images_in(images) if p not in is_mask]
    if not sources:
        raise ValueError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    ids = _unique_ids(sources, images)
    official = _read_split_file(splits_file)
    wanted = " or ".join(pattern for _, pattern in class_patterns) or mask_pattern

    def read_layer(index: int, mask: Path) -> np.ndarray:
        return np.where(_read_binary_mask(mask), index, 0) if class_patterns else mapping(mask, read_mask_pixels(mask))

    def labels_of(path: Path, problems: list[Problem]) -> np.ndarray:
        if class_patterns:
            found = [(index, m) for index, matched in per_class for m in matched.get(path.stem, [])]
        else:
            found = [(0, m) for m in mask_files.get(path.stem, [])]
        if not found:
            raise ReadError(path, f"no mask named {wanted.replace('{stem}', path.stem)}.* in {masks}")
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

    def unit(path: Path) -> MakeItems:
        return lambda problems: [Item(_clean(ids[path]), path, mask=labels_of(path, problems),
                                      split=official.get(path.stem))]

    writer.run((str(path), unit(path)) for path in sources)
