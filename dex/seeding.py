"""Seeds, deterministic kernels and the random generators' state: a CPU run with a given seed reproduces bit for bit,
and a run resumed from a checkpoint holding :func:`rng_state` continues as if it had not stopped."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, device: torch.device | str = "cpu") -> None:
    """Seed Python, NumPy and torch; on a CPU also select PyTorch's deterministic kernels.

    Without them, two CPU runs of the demo pretraining with one seed drifted apart after 20 to 80 steps (by about
    1e-6, first in the alignment or balance loss): some CPU kernels accumulate in parallel in an order that varies
    from run to run (``index_put_`` with ``accumulate=True``, the backward of advanced indexing, adds with atomics
    across threads unless deterministic algorithms are on). Measured on the demo, the deterministic kernels cost
    nothing. On a GPU the fast kernels stay in use.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(torch.device(device).type == "cpu", warn_only=True)


def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state of torch's, NumPy's and Python's global generators (and CUDA's on a CUDA device), as tensors and
    plain values only, so that a checkpoint holding it loads with ``weights_only=True``."""
    numpy = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy[1].astype(np.int64)), "pos": int(numpy[2]),
                  "has_gauss": int(numpy[3]), "gauss": float(numpy[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    device = torch.device(device)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str = "cpu") -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    device = torch.device(device)
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
