"""Near-duplicate detection with a perceptual hash (pHash) and a multi-index over its bits."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn


def phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an [H, W] or [H, W, C] image in [0, 1].

    The grey image is resized to 32 x 32, transformed by a 2D DCT, and the 8 x 8 lowest frequencies are compared
    with their median (the DC term excluded from the median): one bit each.
    """
    grey = image.mean(axis=2) if image.ndim == 3 else image
    small = np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize((32, 32), Image.Resampling.BILINEAR))
    low = dctn(small.astype(np.float64), norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


class NearDuplicateIndex:
    """Hashes seen so far; :meth:`add` reports whether a hash lies within ``max_distance`` bits of one of them.

    The 64 bits are split into ``max_distance + 1`` blocks: two hashes that differ in at most ``max_distance`` bits
    agree exactly on at least one block (pigeonhole), so candidates come from exact block lookups.
    """

    def __init__(self, max_distance: int = 2) -> None:
        if not 0 <= max_distance < 16:
            raise ValueError(f"max_distance must be in [0, 16), got {max_distance}")
        self.max_distance = max_distance
        edges = np.linspace(0, 64, max_distance + 2).round().astype(int)
        self._blocks = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._blocks]

    def _parts(self, value: int) -> list[int]:
        return [(value >> (64 - b)) & ((1 << (b - a)) - 1) for a, b in self._blocks]

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


def near_duplicate_groups(hashes: dict[str, int], max_distance: int = 2) -> list[list[str]]:
    """The groups of two or more keys whose hashes are within ``max_distance`` bits, taken transitively (a chain of
    near-duplicates is one group); each group sorted, groups in the order of their first key."""
    parent = {key: key for key in hashes}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    index, holders = NearDuplicateIndex(max_distance), {}
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
