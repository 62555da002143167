"""Training: MAE-DEX pretraining and its schedules."""

from dex.train.pretrain import PretrainConfig, pretrain

__all__ = ["PretrainConfig", "pretrain"]
