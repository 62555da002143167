"""Worker processes that never outlive the job that started them.

A ``ProcessPoolExecutor`` worker waits on its call queue; when the parent is killed (``kill -9``, the OOM killer, a
cluster's pre-emption) nothing tells it, and it lives on holding its memory. The workers made here watch their parent
and exit as soon as it is gone, whatever the start method (with ``forkserver`` the parent is the fork server, which
itself exits with the job).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

Result = TypeVar("Result")
POLL_SECONDS = 0.2


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os._exit(1)  # the parent is gone: no clean-up to do for it, and nobody to report to


def _start_watch() -> None:
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="watch-parent").start()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers exit within :data:`POLL_SECONDS` of their parent's death."""
    return ProcessPoolExecutor(workers, initializer=_start_watch)


def ordered_map(function: Callable[..., Result], jobs: Iterable[tuple[Any, ...]], workers: int) -> Iterator[Result]:
    """``function(*job)`` for every job, in job order (so results do not depend on ``workers``), in ``workers``
    processes (in this one when ``workers <= 1``), with at most ``4 * workers`` jobs in flight so that memory stays
    flat however many jobs there are."""
    if workers <= 1:
        yield from (function(*job) for job in jobs)
        return
    with process_pool(workers) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(function, *job))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
