"""Near-duplicate detection with a perceptual hash (pHash) and a multi-index over its bits.

Two sizes are used. Curation drops near-duplicates within a source with the classic 64-bit hash (``size=8``) within 2
bits. Task import (:mod:`dex.data.importers`) groups near-duplicates with a 256-bit hash (``size=16``: the 16 x 16
lowest DCT frequencies of a 64 x 64 thumbnail) within :data:`IMPORT_DUPLICATE_DISTANCE` = 16 bits: it is meant to
find re-saved and resized copies, not distinct images of one kind, which look alike in the 32 x 32 thumbnail of the
64-bit hash (fundus photographs from one camera are all a bright disc on black there). Measured on the real data
under ``shared/data``: re-saving as JPEG at quality 95 to 10 and resizing by 2 to 0.1 (or both) move the 256-bit
hash of CHASE, Kvasir, BUSI and brain-MR images by at most 16 bits, while the closest two of the 28 distinct CHASE
photographs are 50 bits apart (46 with the channel mean as grey, as for images converted from TIFF), and the closest
two of the 300 Kvasir frames 46. With the 64-bit hash the closest two CHASE photographs were 6 bits apart, no further
than a copy re-saved at quality 10 (up to 6 bits): no threshold told them apart. Left out by the rule: copies changed
more than re-saving does (re-windowed slices, scans re-exported with calipers drawn in, 20 to 40 bits apart in BUSI);
``--duplicate-distance`` widens it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn

IMPORT_HASH_SIZE = 16  # the 256-bit hash of task import
IMPORT_DUPLICATE_DISTANCE = 16  # bits of it within which two imported images are near-duplicates


def phash(image: np.ndarray, size: int = 8) -> int:
    """``size * size``-bit DCT perceptual hash of an [H, W] or [H, W, C] image (any intensity scale).

    The grey image (channel mean) is resized to ``4 * size`` pixels square, transformed by a 2D DCT, and the ``size``
    x ``size`` lowest frequencies are compared with their median (the DC term excluded from the median): one bit
    each, the lowest frequency first.
    """
    grey = image.mean(axis=2) if image.ndim == 3 else image
    side = 4 * size
    small = np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize((side, side),
                                                                                 Image.Resampling.BILINEAR))
    low = dctn(small.astype(np.float64), norm="ortho")[:size, :size].ravel()
    return int.from_bytes(np.packbits(low > np.median(low[1:])).tobytes(), "big")


class NearDuplicateIndex:
    """Hashes of ``bits`` bits seen so far; :meth:`add` reports whether a hash lies within ``max_distance`` bits of one
    of them.

    The bits are split into ``max_distance + 1`` blocks: two hashes that differ in at most ``max_distance`` bits
    agree exactly on at least one block (pigeonhole), so candidates come from exact block lookups.
    """

    def __init__(self, max_distance: int = 2, bits: int = 64) -> None:
        if not 0 <= max_distance < bits // 4:
            raise ValueError(f"max_distance must be in [0, {bits // 4}) for {bits}-bit hashes, got {max_distance}")
        self.max_distance, self.bits = max_distance, bits
        edges = np.linspace(0, bits, max_distance + 2).round().astype(int)
        self._blocks = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._blocks]

    def _parts(self, value: int) -> list[int]:
        return [(value >> (self.bits - b)) & ((1 << (b - a)) - 1) for a, b in self._blocks]

    def find(self, value: int) -> int | None:
        """A stored hash within ``max_distance`` bits of ``value``, or None."""
        for table, part in zip(self._tables, self._parts(value)):
            for other in table.get(part, ()):
                if (other ^ value).bit_count() <= self.max_distance:
                    return other
        return None

    def matches(self, value: int) -> set[int]:
        """Every stored hash within ``max_distance`` bits of ``value``."""
        return {other for table, part in zip(self._tables, self._parts(value)) for other in table.get(part, ())
                if (other ^ value).bit_count() <= self.max_distance}

    def add(self, value: int) -> bool:
        """Store ``value`` unless it is a near-duplicate; returns True when it was new."""
        if self.find(value) is not None:
            return False
        self.insert(value)
        return True

    def insert(self, value: int) -> None:
        """Store ``value`` whatever is stored already."""
        for table, part in zip(self._tables, self._parts(value)):
            table.setdefault(part, []).append(value)


def near_duplicate_groups(hashes: dict[str, int], max_distance: int = 2, bits: int = 64) -> list[list[str]]:
    """The groups of two or more keys whose ``bits``-bit hashes are within ``max_distance`` bits, taken transitively
    (a chain of near-duplicates is one group); each group sorted, groups in the order of their first key."""
    parent = {key: key for key in hashes}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    index, holders = NearDuplicateIndex(max_distance, bits), {}
    for key in sorted(hashes):
        value = hashes[key]
        for other in index.matches(value):
            parent[root(holders[other])] = root(key)
        if value not in holders:
            holders[value] = key
            index.insert(value)
    groups: dict[str, list[str]] = {}
    for key in sorted(hashes):
        groups.setdefault(root(key), []).append(key)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])
