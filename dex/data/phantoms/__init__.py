"""Procedural phantoms of the 10 MedVerse modalities, written in the formats real datasets use, with
downstream tasks whose labels are exact. See :func:`make_phantoms`."""

from dex.data.phantoms.generate import RAW_SOURCES, TASKS, make_phantoms

__all__ = ["RAW_SOURCES", "TASKS", "make_phantoms"]
