"""M-IDoL (seed 002, arXiv 2604.08936) as a pretraining objective: a student and an EMA teacher, each a backbone and
a mixture-of-experts projector (:mod:`dex.models.midol`), trained on several views of every image with
``L_route + L_cst``; modality labels are never used. At the end only the teacher's backbone is kept (the
projector is discarded), as the secondary source describes.

One step, for a batch of B images with V views each (``[B, V, 3, H, W]``):

1. the student embeds every view: backbone feature h (class token, or the model's pooled feature), router scores
   s = <h/|h|, w_k/|w_k|> and every expert's L2-normalised embedding;
2. the teacher (no gradient, eval mode) does the same; its scores give each view's Sinkhorn code over the
   (global) batch, q_v = B * SK(s^T_v) (:func:`~dex.models.midol.sinkhorn_knopp`), and each image's expert is
   k_i = argmax_k sum_v q_v,ik (ours: one expert per image, so all its views share a subspace);
3. ``L_route`` (:func:`~dex.models.midol.route_loss`): each student view's softmax(s / tau_r) predicts the other
   views' codes; ``L_cst`` (:func:`~dex.models.midol.subspace_infonce`): the student's view v by expert k_i
   against the teacher's views w != v by expert k_i, negatives the other images (ours: all of them, or only those
   routed to k_i as well);
4. with a DEX backbone, the DEX terms of Eq. 8 (alignment, balance) join the loss and the directors follow their
   experts (group EMA) after the step, as in MAE-DEX (ours: the DEX module trained as the DEX paper does; the
   terms are the DEX backbone's, :mod:`dex.train.dex_backbone`, with router noise for every view);
5. after the optimiser step the teacher follows the student: theta_t <- m theta_t + (1 - m) theta_s, with m
   cosine from ``teacher_momentum`` to ``teacher_momentum_final`` (DINO's schedule; ours for M-IDoL).

The batch-wise parts (Sinkhorn, negatives) see the global micro-batch: with ``accum_steps > 1`` they see a
fraction of the step's images, so accumulation changes the objective (as it would for SwAV or MoCo).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dex.collectives import batch_offset, gather_batch
from dex.config import STRICT
from dex.data.transforms import MultiViewTransform, ViewAugmentation
from dex.models.midol import (
    MoEProjector,
    Negatives,
    pooled_features,
    route_loss,
    routing_stats,
    sinkhorn_knopp,
    subspace_infonce,
)
from dex.schedules import cosine
from dex.train.dex_backbone import DEX_TERMS, DEXBackboneObjective, DEXEncoderConfig, create_encoder
from dex.train.hooks import EMATeacher
from dex.train.monitor import normalised_entropy
from dex.train.objective import StepHook, StepOutput, register_objective


@STRICT
@dataclass
class MIDoLConfig(DEXEncoderConfig):
    """An M-IDoL pretraining run. ``model`` is any encoder the project builds (a DEX ViT, a plain ViT as a DEX
    ViT with ``num_experts: 0``) or a timm Swin (the paper's ``swin_base_patch4_window7_224``). Marked by source:
    (s) the secondary description, ours otherwise."""

    objective: Literal["midol"] = "midol"
    model: str = "swin_base_patch4_window7_224"
    num_experts: int = 5  # (s) N, one per modality of the paper's five
    projector_hidden_dim: int = 2048
    projector_dim: int = 256
    sinkhorn_epsilon: float = 0.05  # SwAV's
    sinkhorn_iterations: int = 3  # SwAV's
    router_temperature: float = 0.1  # tau_r of the student's routing distribution (SwAV's student temperature)
    contrast_temperature: float = 0.2  # tau of L_cst (MoCo v3's)
    contrast_temperature_final: float | None = None  # None: constant; else cosine to this value
    negatives: Negatives = "same_expert"  # the images L_cst contrasts against: all, or those routed alike
    lambda_route: float = 1.0  # (s) L_route + L_cst
    lambda_cst: float = 1.0
    teacher_momentum: float = 0.996  # DINO's schedule
    teacher_momentum_final: float = 1.0
    augment: ViewAugmentation = field(default_factory=ViewAugmentation)


class RoutingLog(StepHook):
    """Logs the routing of the last micro-batch (of all ranks): expert load (share of images per expert), the
    normalised entropy of that load (1 balanced), and the share of images whose views agree (student routers;
    teacher codes)."""

    def __init__(self) -> None:
        self.stats = None

    def log(self) -> dict[str, Any]:
        if self.stats is None:
            return {}
        load = self.stats.load.tolist()
        return {"expert_load": load, "load_entropy": normalised_entropy(load),
                "view_agreement": float(self.stats.agreement), "code_agreement": float(self.stats.code_agreement)}


@register_objective
class MIDoLObjective(DEXBackboneObjective):
    """M-IDoL under the :class:`~dex.train.objective.Objective` interface; see the module docstring. Parameters:
    ``student.encoder``, ``student.projector`` (trained); ``teacher.*`` (the same, following by EMA)."""

    name = "midol"
    config_class = MIDoLConfig
    loss_terms = ("route", "contrast", *DEX_TERMS)
    batch = "views"
    backbone_path = "student.encoder"
    routing_log_keys = ("load_entropy", "view_agreement", "code_agreement")

    def __init__(self, encoder: nn.Module, config: MIDoLConfig) -> None:
        super().__init__()
        self.config = config
        projector = MoEProjector(encoder.num_features, config.num_experts, config.projector_hidden_dim,
                                 config.projector_dim)
        self.student = nn.ModuleDict({"encoder": encoder, "projector": projector})
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.ema = EMATeacher(self.student, self.teacher)
        self.routing_log = RoutingLog()

    @classmethod
    def from_config(cls, config: MIDoLConfig) -> MIDoLObjective:
        return cls(create_encoder(config, num_classes=0), config)

    def train(self, mode: bool = True) -> MIDoLObjective:
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths nor accumulates routing statistics
        return self

    def kept(self) -> dict[str, nn.Module]:
        return {"encoder": self.teacher["encoder"]}

    def teachers(self) -> dict[str, nn.Module]:
        return {**super().teachers(), "teacher": self.teacher}

    def routed_module(self) -> MoEProjector:
        """The teacher's projector, whose router gives each image its expert (for ``dex analyze``)."""
        return self.teacher["projector"]

    def sharded_units(self) -> list[nn.Module]:
        return [*getattr(self.student["encoder"], "blocks", [])]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        encoder = self.student["encoder"]
        skip = encoder.no_weight_decay() if hasattr(encoder, "no_weight_decay") else set()
        return {f"student.encoder.{name}" for name in skip}

    def transform(self) -> MultiViewTransform:
        size = self.student["encoder"].patch_embed.img_size
        return MultiViewTransform(size[0] if isinstance(size, (tuple, list)) else size, self.config.augment)

    def schedule(self, step: int, total: int) -> dict[str, float]:
        c = self.config
        final = c.contrast_temperature if c.contrast_temperature_final is None else c.contrast_temperature_final
        return {
            **super().schedule(step, total),
            "teacher_momentum": cosine(c.teacher_momentum, c.teacher_momentum_final, step, total),
            "contrast_temperature": cosine(c.contrast_temperature, final, step, total),
        }

    def step_inputs(self, generator, global_batch: int, rows: slice) -> dict[str, Any]:
        """A DEX backbone's router noise for every view of the global batch, cut to this rank's images."""
        return self.router_noise(generator, global_batch, rows, self.config.augment.views)

    def hooks(self) -> list[StepHook]:
        return [*super().hooks(), self.ema, self.routing_log]

    def forward(self, batch: dict[str, Tensor], schedule: Mapping[str, float],
                inputs: Mapping[str, Any]) -> StepOutput:
        views = batch["image"]  # [b, V, 3, H, W]
        local, num_views = views.shape[:2]
        flat = views.transpose(0, 1).reshape(num_views * local, *views.shape[2:])  # view-major
        experts = self.config.num_experts
        features, aux = pooled_features(self.student["encoder"], flat, schedule["noise_std"],
                                        inputs.get("router_eps"))
        scores, embeddings = self.student["projector"](features)
        with torch.no_grad():
            teacher_features = pooled_features(self.teacher["encoder"], flat)[0]
            teacher_scores, teacher_embeddings = self.teacher["projector"](teacher_features)
            teacher_scores = teacher_scores.view(num_views, local, experts)
            codes = torch.stack([sinkhorn_knopp(s, self.config.sinkhorn_epsilon, self.config.sinkhorn_iterations)
                                 for s in teacher_scores])
            codes = codes / codes.sum(-1, keepdim=True)  # each row a distribution (SwAV's B * P)
            assignment = codes.sum(0).argmax(-1)  # [b]
            keys = teacher_embeddings.view(experts, num_views, local, -1).permute(2, 1, 0, 3)  # [b, V, N, D]
            keys = gather_batch(keys).permute(1, 2, 0, 3)  # [V, N, B, D]
            key_assignment = gather_batch(assignment)
        scores = scores.view(num_views, local, experts)
        # each image's views embedded by its own expert: [b, V, D]
        own = embeddings.view(experts, num_views, local, -1)[assignment, :, torch.arange(local, device=flat.device)]
        route = route_loss(scores, codes, self.config.router_temperature)
        contrast = subspace_infonce(own.transpose(0, 1), keys, assignment, key_assignment,
                                    schedule["contrast_temperature"], self.config.negatives, batch_offset(local))
        with torch.no_grad():  # the global batch's routing, for the log
            global_view = lambda x: gather_batch(x.transpose(0, 1).contiguous()).transpose(0, 1)  # noqa: E731
            self.routing_log.stats = routing_stats(global_view(scores.detach()), global_view(codes), key_assignment,
                                                   experts)
        return self.with_dex_terms(self.config.lambda_route * route + self.config.lambda_cst * contrast,
                                   {"route": route, "contrast": contrast}, aux, schedule)
