"""Data: the embedded procedural image set (more readers and the MedVerse curation come later)."""

from dex.data.synthetic import SyntheticModalityImages

__all__ = ["SyntheticModalityImages"]
