"""Figures written as PNG files: matplotlib without a screen (the Agg backend) and one way of saving them, so that a
figure drawn twice from the same numbers gives the same bytes (100 dpi, no software tag)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

SAVE = dict(dpi=100, metadata={"Software": None})

__all__ = ["SAVE", "plt", "save_figure"]


def save_figure(fig: Figure, path: str | Path, **kwargs) -> None:
    """Save ``fig`` as a PNG at ``path`` with :data:`SAVE` (and ``kwargs``, e.g. ``bbox_inches="tight"``), then close
    it."""
    fig.savefig(path, **SAVE, **kwargs)
    plt.close(fig)
