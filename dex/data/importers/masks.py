"""How source mask values become class indices (:class:`MaskMapping`), and reading one-class mask files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dex.data.readers import ReadError, read_mask_pixels


def _parse_value(text: str) -> int | tuple[int, int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 3:
        return (parts[0], parts[1], parts[2])
    raise ValueError(f"mask value {text!r}: give one integer or R,G,B")


@dataclass
class MaskMapping:
    """How source mask values become class indices.

    ``values`` maps a source value (an integer, or an (R, G, B) colour) to a class index; every value found must
    be listed. Without it, values that are class indices are kept, and a 2D mask with two classes is taken as
    binary: one holding 0 and a single other value (0 / 255, 0 / 1, 0 / 128, in any bit depth) has that value as
    foreground, and in one holding more values (lossy JPEG masks) anything above half the bit depth's range is
    foreground. ``volume=True``: ``raw`` is a [Z, Y, X] label volume (no colours, no binary rule).
    """

    classes: list[str]
    values: dict[int | tuple[int, int, int], int] | None = None

    @classmethod
    def parse(cls, classes: Sequence[str], pairs: Sequence[str]) -> MaskMapping:
        """``pairs`` as given on the command line: ``VALUE=CLASS`` with VALUE ``255`` or ``255,0,0``."""
        classes = list(classes)
        if not pairs:
            return cls(classes)
        values: dict = {}
        for pair in pairs:
            value, sep, name = pair.partition("=")
            if not sep or name not in classes:
                raise ValueError(f"--mask-value {pair!r}: expected VALUE=CLASS with CLASS one of {classes}")
            try:
                values[_parse_value(value)] = classes.index(name)
            except ValueError as err:
                raise ValueError(f"--mask-value {pair!r}: {err}") from None
        return cls(classes, values)

    def __call__(self, path: Path, raw: np.ndarray, volume: bool = False) -> np.ndarray:
        colour = raw.ndim == 3 and not volume
        if self.values is None:
            if colour:
                raise ReadError(path, "a colour mask needs --mask-value R,G,B=CLASS for each colour")
            if raw.min(initial=0) >= 0 and int(raw.max(initial=0)) < len(self.classes):
                return raw.astype(np.int64)
            if not volume and len(self.classes) == 2:
                if np.unique(raw[raw != 0]).size == 1:  # 0 and one other value
                    return (raw != 0).astype(np.int64)
                if raw.dtype.kind == "u":
                    return (raw > np.iinfo(raw.dtype).max // 2).astype(np.int64)
            raise ReadError(path, f"mask values {sorted(np.unique(raw).tolist())[:8]} are not indices of the "
                                  f"{len(self.classes)} classes; give --mask-value VALUE=CLASS")
        out = np.full(raw.shape[:2] if colour else raw.shape, -1, dtype=np.int64)
        keys = raw.reshape(-1, raw.shape[2]) if colour else raw.reshape(-1, 1)
        for value, index in self.values.items():
            key = np.asarray(value if isinstance(value, tuple) else (value,))
            if key.size != keys.shape[1]:
                continue
            out.reshape(-1)[(keys == key).all(axis=1)] = index
        if (out < 0).any():
            unknown = np.unique(keys[out.reshape(-1) < 0], axis=0)[:4]
            shown = [tuple(int(v) for v in u) if len(u) > 1 else int(u[0]) for u in unknown]
            raise ReadError(path, f"mask values {shown} are not in the --mask-value map")
        return out


def _read_binary_mask(path: Path) -> np.ndarray:
    """A one-class mask (or a region of interest) as [H, W] bool: 0 / any one value or lossy grey, palette indices,
    or colour (any channel), by the two-class rule of :class:`MaskMapping`."""
    raw = read_mask_pixels(path)
    return MaskMapping(["background", "foreground"])(path, raw.max(axis=2) if raw.ndim == 3 else raw) > 0
