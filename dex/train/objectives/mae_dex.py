"""MAE-DEX (Sec. 3.4, 4.1, App. C.2.1): masked-image modelling with a DEX encoder and the DEX objective (Eq. 8).

The objective is :class:`~dex.models.MaskedAutoencoderDEX` under the :class:`~dex.train.objective.Objective`
interface: one augmented view per image, the step's random inputs (mask noise, router noise) drawn for the global
batch, cosine schedules of the GEMA momentum, the router noise and lambda_bal over the whole run, and the director
update (group EMA, Eq. 6-7) as its per-step hook.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

from dex.config import STRICT
from dex.data.transforms import PretrainTransform
from dex.models import MaskedAutoencoderDEX, create_model, init_from_vit_checkpoint
from dex.schedules import cosine
from dex.train.hooks import DirectorUpdate
from dex.train.objective import Objective, RunConfig, StepHook, StepOutput


@STRICT
@dataclass
class DEXEncoderConfig(RunConfig):
    """The encoder of a run and, for a DEX encoder, the DEX terms of Eq. 8 with their schedules (cosine over the
    whole run; the paper's coefficients). Any objective that trains a DEX encoder shares these keys."""

    model: str = "dex_vit_base_patch16_256"
    model_args: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    lambda_co: float = 0.1
    lambda_bal: float = 0.001
    lambda_bal_final: float = 0.0
    momentum: float = 0.99  # GEMA m, Eq. 7
    momentum_final: float = 1.0
    noise_std: float = 1.0  # sigma, Eq. 21
    noise_std_final: float = 0.0

    def dex_schedule(self, step: int, total: int) -> dict[str, float]:
        """The scheduled DEX values at ``step`` of ``total``: GEMA momentum, router noise, lambda_bal."""
        return {
            "momentum": cosine(self.momentum, self.momentum_final, step, total),
            "noise_std": cosine(self.noise_std, self.noise_std_final, step, total),
            "lambda_bal": cosine(self.lambda_bal, self.lambda_bal_final, step, total),
        }


def create_encoder(config: DEXEncoderConfig, **defaults: Any) -> nn.Module:
    """The encoder ``config`` (any config with ``model`` and ``model_args``) names, without weights (``defaults``
    give way to ``model_args``); an unknown architecture or argument is a ValueError naming both."""
    try:
        return create_model(config.model, **{**defaults, **config.model_args})
    except (TypeError, RuntimeError) as err:  # an unknown architecture or argument
        raise ValueError(f"model {config.model!r} with model_args {config.model_args}: {err}") from err


@STRICT
@dataclass
class MAEDEXConfig(DEXEncoderConfig):
    """A MAE-DEX pretraining run: the loop's settings and the method's. Defaults are the paper's where it gives
    them (coefficients, schedules, mask ratio, decoder)."""

    objective: Literal["mae_dex"] = "mae_dex"
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    init_checkpoint: str | None = None  # a plain ViT / MAE checkpoint to warm-start from (reference: D10)


class MAEDEXObjective(MaskedAutoencoderDEX, Objective):
    """MAE-DEX as a pretraining objective; its parameters and state dict are those of the
    :class:`~dex.models.MaskedAutoencoderDEX` it is."""

    name = "mae_dex"
    config_class = MAEDEXConfig
    loss_terms = ("reconstruction", "alignment", "balance")
    batch = "image"

    def __init__(self, encoder: nn.Module, config: MAEDEXConfig) -> None:
        super().__init__(encoder, config.decoder_embed_dim, config.decoder_depth, config.decoder_num_heads,
                         norm_pix_loss=config.norm_pix_loss, mask_ratio=config.mask_ratio)
        self.config = config
        self.director_update = DirectorUpdate(self)

    @classmethod
    def from_config(cls, config: MAEDEXConfig) -> MAEDEXObjective:
        objective = cls(create_encoder(config), config)
        if config.init_checkpoint:
            init_from_vit_checkpoint(objective, config.init_checkpoint)
        return objective

    def kept(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder}

    def teachers(self) -> dict[str, nn.Module]:
        """The directors: each follows its experts by group EMA (Eq. 7), not by gradient."""
        return {f"encoder.blocks.{i}.dex.director": block.dex.director
                for i, block in enumerate(self.encoder.blocks) if block.dex is not None}

    def sharded_units(self) -> list[nn.Module]:
        return [*self.encoder.blocks, *self.decoder_blocks]

    def transform(self) -> PretrainTransform:
        return PretrainTransform(self.encoder.patch_embed.img_size[0])

    def schedule(self, step: int, total: int) -> dict[str, float]:
        return self.config.dex_schedule(step, total)

    def step_inputs(self, generator, global_batch: int, rows: slice) -> dict[str, Any]:
        return self.draw_noise(generator, global_batch, rows)

    def hooks(self) -> list[StepHook]:
        return [self.director_update]

    def forward(self, batch: dict[str, Tensor], schedule: Mapping[str, float],
                inputs: Mapping[str, Any]) -> StepOutput:
        out = super().forward(batch["image"], noise_std=schedule["noise_std"], lambda_co=self.config.lambda_co,
                              lambda_bal=schedule["lambda_bal"], **inputs)
        return StepOutput(out.loss, {"reconstruction": out.reconstruction, "alignment": out.alignment,
                                     "balance": out.balance})
