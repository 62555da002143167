"""Stopping a pretraining run at a step boundary when a signal arrives, with a checkpoint of that step (issue 32).

Slurm warns a job before it ends it (the signal ``--signal=USR2@S`` asks for, S seconds before the time limit, and
the pre-emption notice where a cluster is set up to send it). A signal can land anywhere in a step, and a checkpoint
under FSDP is a collective of every rank, so the handler only records the signal; the loop asks after each optimiser
step whether any rank has seen it (one all-reduce of one number), and if so every rank writes the checkpoint of that
step and the run raises :class:`Stopped`. The caller (``dex submit pretrain``'s job) then requeues itself, and the
requeued job resumes from that checkpoint as ``--resume auto`` does: bit for bit, losing no step.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any


class Stopped(Exception):
    """Raised by :func:`dex.train.pretrain.pretrain` after the checkpoint of ``step`` once a stop was asked for."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped by a signal after step {step}; its checkpoint is written")
        self.step = step


class StopSignal:
    """A context manager that, while open, records the signals ``signals`` instead of their handlers' action
    (``requested``, ``signum``: the last seen) and gives the handlers back on exit (``previous``: those it replaced,
    for the caller to call once it has stopped)."""

    def __init__(self, *signals: int) -> None:
        self.signals = signals
        self.requested, self.signum = False, 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:  # noqa: PYI034 (typing.Self needs Python 3.11)
        for signum in self.signals:
            self.previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.requested, self.signum = True, signum
