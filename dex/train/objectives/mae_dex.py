"""MAE-DEX (Sec. 3.4, 4.1, App. C.2.1): masked-image modelling with a DEX encoder and the DEX objective (Eq. 8).

The objective is :class:`~dex.models.MaskedAutoencoderDEX` under the :class:`~dex.train.objective.Objective`
interface: one augmented view per image, and the step's random inputs (mask noise, then router noise for the visible
tokens, :meth:`~dex.models.MaskedAutoencoderDEX.draw_noise`) drawn for the global batch. The DEX terms (alignment
and balance, the cosine schedules of the GEMA momentum, the router noise and lambda_bal, the director update as the
per-step hook) are the DEX backbone's (:mod:`dex.train.dex_backbone`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from dex.config import STRICT
from dex.data.transforms import PretrainTransform
from dex.models import MaskedAutoencoderDEX, init_from_vit_checkpoint
from dex.train.dex_backbone import DEX_TERMS, DEXBackboneObjective, DEXEncoderConfig, create_encoder
from dex.train.objective import StepOutput, register_objective


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


@register_objective
class MAEDEXObjective(DEXBackboneObjective, MaskedAutoencoderDEX):
    """MAE-DEX as a pretraining objective; its parameters and state dict are those of the
    :class:`~dex.models.MaskedAutoencoderDEX` it is."""

    name = "mae_dex"
    config_class = MAEDEXConfig
    loss_terms = ("reconstruction", *DEX_TERMS)
    batch = "image"

    def __init__(self, encoder: nn.Module, config: MAEDEXConfig) -> None:
        super().__init__(encoder, config.decoder_embed_dim, config.decoder_depth, config.decoder_num_heads,
                         norm_pix_loss=config.norm_pix_loss, mask_ratio=config.mask_ratio)
        self.config = config

    @classmethod
    def from_config(cls, config: MAEDEXConfig) -> MAEDEXObjective:
        objective = cls(create_encoder(config), config)
        if config.init_checkpoint:
            init_from_vit_checkpoint(objective, config.init_checkpoint)
        return objective

    def kept(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder}

    def sharded_units(self) -> list[nn.Module]:
        return [*self.encoder.blocks, *self.decoder_blocks]

    def transform(self) -> PretrainTransform:
        return PretrainTransform(self.encoder.patch_embed.img_size[0])

    def step_inputs(self, generator, global_batch: int, rows: slice) -> dict[str, Any]:
        """The mask noise, then the router noise of the visible tokens (the model draws both)."""
        return self.draw_noise(generator, global_batch, rows)

    def forward(self, batch: dict[str, Tensor], schedule: Mapping[str, float],
                inputs: Mapping[str, Any]) -> StepOutput:
        images = batch["image"]
        latent, mask, ids_restore, aux = self.forward_encoder(images, self.mask_ratio, schedule["noise_std"], **inputs)
        reconstruction = self.reconstruction_loss(images, self.forward_decoder(latent, ids_restore), mask)
        return self.with_dex_terms(reconstruction, {"reconstruction": reconstruction}, aux, schedule)
