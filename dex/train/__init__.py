"""Training: the pretraining loop, its objectives (MAE-DEX first) and their hooks."""

from dex.train.objective import Objective, RunConfig, StepHook, StepOutput
from dex.train.pretrain import pretrain

__all__ = ["Objective", "RunConfig", "StepHook", "StepOutput", "pretrain"]
