"""Per-step hooks of pretraining objectives (see :class:`dex.train.objective.StepHook`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dex.models import DirectorExperts, discard_usage_, update_directors_
from dex.train.monitor import normalised_entropy
from dex.train.objective import StepHook


class DirectorUpdate(StepHook):
    """The DEX director update after each optimiser step: group EMA of every director with momentum
    ``schedule["momentum"]`` (Eq. 6-7) from the activation weights of the whole global batch, then the usage EMA
    (Eq. 19-20). Logs the step's load per layer (Omega) and the usage entropy per layer (1 balanced, 0 collapsed)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.loads: list[Tensor] = []

    def after_step(self, schedule: Mapping[str, float]) -> None:
        self.loads = update_directors_(self.model, schedule["momentum"])

    def after_skipped_step(self) -> None:
        discard_usage_(self.model)
        self.loads = []

    def log(self) -> dict[str, Any]:
        return {"usage_entropy": usage_entropy(self.model), "load": [load.tolist() for load in self.loads]}


def usage_entropy(model: nn.Module) -> list[float]:
    """Per DEX layer, the normalised entropy of the long-term expert usage c (1 balanced, 0 collapsed)."""
    return [normalised_entropy(m.router.usage.tolist()) for m in model.modules() if isinstance(m, DirectorExperts)]


class EMATeacher(StepHook):
    """A teacher that follows its student by an exponential moving average after each optimiser step:
    ``theta_t <- m * theta_t + (1 - m) * theta_s`` for every parameter and floating buffer, with
    m = ``schedule[key]``. ``student`` and ``teacher`` have the same structure (the teacher is usually a copy)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, key: str = "teacher_momentum") -> None:
        self.student, self.teacher, self.key = student, teacher, key

    @torch.no_grad()
    def after_step(self, schedule: Mapping[str, float]) -> None:
        pairs = [(t, s) for t, s in zip(_tensors(self.teacher), _tensors(self.student), strict=True)
                 if t.is_floating_point()]
        for sharded in (True, False):  # under FSDP parameters are DTensors, buffers plain tensors: one call each
            group = [(t, s) for t, s in pairs if isinstance(t, DTensor) == sharded]
            if group:
                torch._foreach_lerp_([t for t, _ in group], [s for _, s in group], 1.0 - schedule[self.key])


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]
