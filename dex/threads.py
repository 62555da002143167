"""How dex's CPU threads share a machine with other work (issue 31); imported by ``dex`` before PyTorch.

PyTorch's CPU kernels run on an OpenMP thread pool (GNU libgomp in the PyPI wheels) whose threads, between two
parallel regions, spin for ``GOMP_SPINCOUNT`` iterations (300,000 by default) before they sleep. On a machine shared
with one other CPU-bound process, a spinning thread takes the core its preempted sibling needs to finish the region,
and a small model's many short regions each wait a scheduler time slice: 60 steps of the demo pretraining took 16.5 s
alone and 254.8 s beside one busy loop on 2 cores (15.4 x, where a fair share of the cores would cost 2 x). With a
spin count of 5,000 they took 17.7 s and 38.0 s (2.15 x); passive waiting or one thread cost 45-50% alone
(``benchmarks/cpu_contention.py``, docs/benchmarks.md).

libgomp reads its settings once, when PyTorch loads it: this module sets the default before ``import torch`` when
``dex`` is imported first (every ``dex`` command), and a value in the user's environment wins. :func:`shared_cores`
gives the main process's intra-op threads the cores its data-loading workers (and, under torchrun, its sibling
processes) leave, at least one: pretraining and fine-tuning run within it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

SPIN_COUNT = "5000"  # ours, from the measurements above

os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def shared_cores(workers: int) -> Iterator[int]:
    """Within the block, PyTorch's intra-op threads are the cores left to this process (its share of them under
    torchrun's ``LOCAL_WORLD_SIZE`` processes) beside its ``workers`` data-loading processes (each of which PyTorch
    runs on one thread), at least one, unless ``OMP_NUM_THREADS`` says otherwise; yields the count and restores the
    previous one after."""
    import torch

    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, available_cores() // processes - workers))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
