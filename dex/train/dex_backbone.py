"""The DEX backbone of any objective: its config keys, its encoder, and the terms a DEX ViT brings to a method.

A method whose backbone may be a DEX ViT (MAE-DEX, M-IDoL, MedMoE, or a new one) subclasses
:class:`DEXBackboneObjective` with a config derived from :class:`DEXEncoderConfig`, and gets from it

- the cosine schedules, over the whole run, of the GEMA momentum m (Eq. 7), the router noise sigma (Eq. 21) and
  lambda_bal (:meth:`~DEXBackboneObjective.schedule`);
- the router noise drawn for the global batch and cut to this rank's rows (:meth:`~DEXBackboneObjective.step_inputs`),
  so that a step is the same whatever the number of ranks;
- Eq. 8's terms joined to the method's loss, ``lambda_co * alignment + lambda_bal * balance``
  (:meth:`~DEXBackboneObjective.with_dex_terms`);
- the directors declared as teachers (they follow their experts by group EMA, not by gradient) and the director
  update (group EMA, Eq. 6-7, and the usage EMA) as a hook after each optimiser step.

On a backbone without DEX blocks (a plain ViT as a DEX ViT with ``num_experts: 0``, a timm Swin) all of it is inert:
no router noise, no directors, alignment and balance 0; the schedules are still logged, so that every run of a
method logs the same keys.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dex.config import STRICT
from dex.models import DEXAux, DEXViT, create_model, layer_losses
from dex.schedules import cosine
from dex.train.hooks import DirectorUpdate
from dex.train.objective import Objective, RunConfig, StepHook, StepOutput

#: The loss terms a DEX backbone adds to an objective's own (in its ``loss_terms``, after them).
DEX_TERMS = ("alignment", "balance")


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


def create_encoder(config: DEXEncoderConfig, **defaults: Any) -> nn.Module:
    """The encoder ``config`` (any config with ``model`` and ``model_args``) names, without weights (``defaults``
    give way to ``model_args``); an unknown architecture or argument is a ValueError naming both."""
    try:
        return create_model(config.model, **{**defaults, **config.model_args})
    except (TypeError, RuntimeError) as err:  # an unknown architecture or argument
        raise ValueError(f"model {config.model!r} with model_args {config.model_args}: {err}") from err


class DEXBackboneObjective(Objective):
    """An objective whose backbone may be a DEX ViT; see the module's docstring. A subclass names where it holds
    the backbone (:attr:`backbone_path`), builds its loss with :meth:`with_dex_terms`, lists :data:`DEX_TERMS` in its
    ``loss_terms``, and extends :meth:`schedule`, :meth:`teachers` and :meth:`hooks` through ``super()`` when it
    has its own."""

    config: DEXEncoderConfig
    backbone_path: ClassVar[str] = "encoder"  # the trained backbone's submodule (its state-dict prefix)

    @property
    def backbone(self) -> nn.Module:
        return self.get_submodule(self.backbone_path)

    @functools.cached_property
    def director_update(self) -> DirectorUpdate:
        """The hook of the director update; made once (the loop reads its log after its step)."""
        return DirectorUpdate(self.backbone)

    def _dex_blocks(self) -> list[tuple[int, nn.Module]]:
        """(index, block) of the backbone's DEX blocks; none for a backbone other than a DEX ViT."""
        backbone = self.backbone
        blocks = backbone.blocks if isinstance(backbone, DEXViT) else []
        return [(i, block) for i, block in enumerate(blocks) if block.dex is not None]

    def teachers(self) -> dict[str, nn.Module]:
        """The directors: each follows its experts by group EMA (Eq. 7), not by gradient."""
        return {f"{self.backbone_path}.blocks.{i}.dex.director": block.dex.director for i, block in self._dex_blocks()}

    def schedule(self, step: int, total: int) -> dict[str, float]:
        """The scheduled DEX values at ``step`` of ``total``: GEMA momentum, router noise, lambda_bal."""
        c = self.config
        return {
            "momentum": cosine(c.momentum, c.momentum_final, step, total),
            "noise_std": cosine(c.noise_std, c.noise_std_final, step, total),
            "lambda_bal": cosine(c.lambda_bal, c.lambda_bal_final, step, total),
        }

    def router_noise(self, generator: torch.Generator, global_batch: int, rows: slice,
                     views: int = 1) -> dict[str, Any]:
        """``router_eps``: the standard normal draws of every router's noise (Eq. 21) for ``views`` whole sequences
        of each image of the global batch, view after view, cut to ``rows``; per block ``[views * b, R]``
        (view-major, as a multi-view forward stacks its views) or ``[views * b * T, R]`` token-wise, None for a
        plain block. Nothing for a backbone without DEX blocks, so that its runs draw nothing."""
        backbone = self.backbone
        if not self._dex_blocks():
            return {}
        tokens = backbone.num_prefix_tokens + backbone.patch_embed.num_patches
        draws = [backbone.draw_router_eps(generator, global_batch, rows, tokens) for _ in range(views)]
        return {"router_eps": [None if block[0] is None else torch.cat(block) for block in zip(*draws)]}

    def step_inputs(self, generator: torch.Generator, global_batch: int, rows: slice) -> dict[str, Any]:
        return self.router_noise(generator, global_batch, rows)

    def hooks(self) -> list[StepHook]:
        return [self.director_update]

    def with_dex_terms(self, loss: Tensor, terms: dict[str, Tensor], aux: Sequence[DEXAux],
                       schedule: Mapping[str, float]) -> StepOutput:
        """The step's output: the method's ``loss`` with Eq. 8's DEX terms of the backbone's blocks (``aux``) added,
        ``loss + lambda_co * alignment + lambda_bal * balance``, and its ``terms`` with ``alignment`` and
        ``balance`` (0 without DEX blocks)."""
        dex = layer_losses(aux, device=loss.device)
        return StepOutput(dex.added_to(loss, self.config.lambda_co, schedule["lambda_bal"]),
                          {**terms, "alignment": dex.alignment, "balance": dex.balance})
