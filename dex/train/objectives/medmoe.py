"""MedMoE (seeds 003/004, arXiv 2506.08356) as a pretraining objective on image-report pairs: an image backbone with
a feature pyramid, report-routed multi-scale experts (:mod:`dex.models.medmoe`), a text encoder
(:mod:`dex.models.text`), and ``L_global + L_local + lambda * L_aux``.

One step, for B pairs (images [B, 3, H, W], reports as text, report types as names):

1. the backbone gives the pyramid F^1..F^4 and the pooled global feature g (a Swin's average of its last stage, a
   ViT's class token); the global image embedding is u = W_img g (D wide);
2. the text encoder gives the report's [CLS] embedding t_g and its word embeddings; w = W_txt t_g is the global
   report embedding, e_t = W_word h_t the words in the local space (ours: linear projections, as GLoRIA's);
3. the report router picks k* = argmax softmax(W2 ReLU(W1 t_g)) (paper); only expert k* computes the image's local
   features V_local [B, D, H/16, W/16], with a straight-through gate so the router learns from L_local (ours);
4. ``L_global``: CLIP's symmetric InfoNCE of u against w (paper: cosine and a temperature; ours: 0.07, fixed);
   ``L_local``: GLoRIA's local loss of the words against V_local (paper: GLoRIA-style); ``L_aux``: the router's
   cross-entropy against the report type (ours: our reading of the paper's auxiliary loss; K = the number of report
   types); ``L_image_router``: the image router (for images without a report) learns k* from g, detached (ours).

At the end the run keeps the backbone (``encoder/``: what ``dex finetune``, ``dex benchmark`` and the rest take), the
text encoder with its tokenizer (``text/``) and the heads (``heads/``: projections, routers, pyramid neck, experts).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dex.config import STRICT
from dex.data.shards import collection_reports, read_index
from dex.data.transforms import PretrainTransform
from dex.files import write_json
from dex.models import DEXViT
from dex.models.backbones import input_size
from dex.models.medmoe import (
    FeaturePyramid,
    ImageRouter,
    MoELocal,
    ReportRouter,
    global_infonce,
    image_router_loss,
    local_gloria_loss,
    report_type_loss,
)
from dex.models.midol import gather_batch
from dex.models.text import TextConfig, TextEncoder, build_text_encoder, save_text_encoder
from dex.models.weights import save_safetensors
from dex.train.monitor import normalised_entropy
from dex.train.objective import Objective, RunConfig, StepHook, StepOutput
from dex.train.objectives.mae_dex import create_encoder


@STRICT
@dataclass
class MedMoEConfig(RunConfig):
    """A MedMoE pretraining run on a collection of image-report pairs. Marked: (paper), ours otherwise."""

    objective: Literal["medmoe"] = "medmoe"
    model: str = "swin_tiny_patch4_window7_224"  # (paper) a Swin; a ViT or DEX ViT with 16 px patches also works
    model_args: dict[str, Any] = field(default_factory=dict)
    text: TextConfig = field(default_factory=TextConfig)
    report_types: list[str] = field(default_factory=list)  # empty: the collection's (index.json), sorted
    num_experts: int | None = None  # K; None: one per report type ((paper): 4, for CT, MRI, X-ray, US)
    embed_dim: int = 256  # D, the shared space of the embeddings and the local features
    local_stride: int = 16  # V_local's grid: H / local_stride
    router_hidden: int = 256  # the width of W1 (and of the image router)
    temperature: float = 0.07  # of L_global (CLIP's initial value)
    temp_attention: float = 4.0  # GLoRIA's gamma_1, gamma_2, gamma_3
    temp_similarity: float = 5.0
    temp_loss: float = 10.0
    lambda_local: float = 1.0  # (paper) L_global + L_local + lambda * L_aux
    lambda_aux: float = 1.0  # lambda: not given by the paper
    lambda_image_router: float = 1.0
    crop_scale: tuple[float, float] = (0.8, 1.0)  # random resized crop; no flips (reports name the sides)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.crop_scale = tuple(self.crop_scale)


class RouteLog(StepHook):
    """Logs the report router's choices of the last micro-batch (of all ranks): the expert load, its normalised
    entropy, the load per report type, and the share of images routed to their type's expert (when K is the number
    of types) and of images whose image router agrees with the report router."""

    def __init__(self, report_types: list[str], num_experts: int) -> None:
        self.report_types, self.num_experts = report_types, num_experts
        self.table: Tensor | None = None  # [types, experts] counts
        self.image_agreement = 0.0

    def record(self, types: Tensor, experts: Tensor, image_experts: Tensor) -> None:
        types, experts, image_experts = (gather_batch(x) for x in (types, experts, image_experts))
        cells = types * self.num_experts + experts
        self.table = torch.bincount(cells, minlength=len(self.report_types) * self.num_experts).view(
            len(self.report_types), self.num_experts).cpu()
        self.image_agreement = float((image_experts == experts).float().mean())

    def log(self) -> dict[str, Any]:
        if self.table is None:
            return {}
        load = (self.table.sum(0) / self.table.sum()).tolist()
        row = {"expert_load": load, "load_entropy": normalised_entropy(load), "image_router_agreement":
               self.image_agreement,
               "expert_load_by_type": {name: counts.tolist() for name, counts in zip(self.report_types, self.table)
                                       if counts.sum() > 0}}
        if len(self.report_types) == self.num_experts:
            row["type_agreement"] = float(self.table.diagonal().sum() / self.table.sum())
        return row


NOT_HEADS = ("pyramid.encoder.", "text.")  # what heads/ leaves to encoder/ and text/
HEADS_FORMAT = "dex-medmoe-heads"


class MedMoEObjective(Objective):
    """MedMoE under the :class:`~dex.train.objective.Objective` interface; see the module docstring. Parameters:
    ``pyramid.encoder`` (the backbone; ``pyramid``'s other parameters are a ViT's neck), ``text`` (the text encoder),
    ``heads`` (experts, routers, projections)."""

    name = "medmoe"
    config_class = MedMoEConfig
    loss_terms = ("global", "local", "aux", "image_router")
    batch = "image_text"
    extra_folders = ("text", "heads")
    extras_note = ("MedMoE model: {run}/encoder with {run}/text and {run}/heads "
                   "(dex.train.export.load_medmoe('{run}'); dex export for one folder)")

    def __init__(self, encoder: nn.Module, text: TextEncoder, report_types: list[str], config: MedMoEConfig) -> None:
        super().__init__()
        self.config, self.report_types = config, list(report_types)
        experts = config.num_experts or len(self.report_types)
        if config.lambda_aux and experts != len(self.report_types):
            raise ValueError(f"num_experts {experts} with {len(self.report_types)} report types: L_aux trains the "
                             "router to pick each report type's expert, so give one expert per type (or lambda_aux 0)")
        if isinstance(encoder, DEXViT) and encoder.dex_modules():
            raise ValueError(f"model {config.model}: a DEX ViT with experts would train here without its alignment "
                             "and balance terms or director update, which MedMoE does not wire yet; use "
                             "num_experts: 0 (a plain ViT) or a Swin")
        if min(input_size(encoder)) < 64:
            raise ValueError(f"MedMoE's experts batch-normalise every scale: the H/32 map of a "
                             f"{input_size(encoder)[0]} px input is 1 x 1, which an expert given one image cannot "
                             "normalise; use inputs of 64 px or more")
        self.pyramid, self.text = FeaturePyramid(encoder), text  # the pyramid holds the backbone
        self.heads = nn.ModuleDict({
            "experts": MoELocal(self.pyramid.channels, config.embed_dim, experts, config.local_stride),
            "report_router": ReportRouter(text.hidden_size, experts, config.router_hidden),
            "image_router": ImageRouter(encoder.num_features, experts, config.router_hidden),
            "image_projection": nn.Linear(encoder.num_features, config.embed_dim),
            "text_projection": nn.Linear(text.hidden_size, config.embed_dim),
            "word_projection": nn.Linear(text.hidden_size, config.embed_dim),
        })
        self.type_index = {name: i for i, name in enumerate(self.report_types)}
        self.route_log = RouteLog(self.report_types, experts)

    @classmethod
    def from_config(cls, config: MedMoEConfig) -> MedMoEObjective:
        root = Path(config.data)
        counts = read_index(root).get("report_types", {}) if (root / "index.json").is_file() else {}
        report_types = list(config.report_types) or sorted(counts)
        if not report_types:
            raise ValueError(f"{root}: no report types: give report_types, or a dex curate collection of image-report "
                             "pairs")
        texts = collection_reports(root) if config.text.name == "local" else None
        return cls(create_encoder(config, num_classes=0), build_text_encoder(config.text, texts), report_types, config)

    @property
    def encoder(self) -> nn.Module:
        return self.pyramid.encoder

    def kept(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder}

    def hooks(self) -> list[StepHook]:
        return [self.route_log]

    def save_extras(self, directory: Path) -> None:
        """``text/`` (the text encoder and its tokenizer, :func:`~dex.models.text.save_text_encoder`) and ``heads/``
        (``model.safetensors``: every tensor but the backbone's and the text encoder's; ``config.json``: the run's
        config and report types), which :func:`dex.train.export.load_medmoe` reads back with the backbone."""
        directory = Path(directory)
        save_text_encoder(self.text, directory / "text")
        heads = directory / "heads"
        heads.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v for k, v in self.state_dict().items() if not k.startswith(NOT_HEADS)},
                         heads / "model.safetensors")
        write_json(heads / "config.json", {"format": HEADS_FORMAT, "config": dataclasses.asdict(self.config),
                                           "report_types": self.report_types})

    def transform(self) -> PretrainTransform:
        return PretrainTransform(input_size(self.encoder)[0], scale=self.config.crop_scale, degrees=0.0, p=0.0)

    def type_indices(self, names: list[str], device: torch.device) -> Tensor:
        """Report-type names -> [B] indices; a type the run does not know is a ValueError naming it."""
        unknown = sorted(set(names) - set(self.type_index))
        if unknown:
            raise ValueError(f"report types {unknown} are not among the run's {self.report_types}")
        return torch.tensor([self.type_index[n] for n in names], device=device)

    def encode_images(self, images: Tensor) -> Tensor:
        """Model inputs [B, 3, H, W] -> the global image embeddings u [B, D] (for retrieval and zero-shot)."""
        return self.heads["image_projection"](self.pyramid(images)[1])

    def encode_texts(self, texts: list[str]) -> Tensor:
        """Reports -> the global report embeddings w [B, D]."""
        return self.heads["text_projection"](self.text.encode(texts).global_embedding)

    def forward(self, batch: dict[str, Any], schedule: Mapping[str, float],
                inputs: Mapping[str, Any]) -> StepOutput:
        images, heads, config = batch["image"], self.heads, self.config
        pyramid, pooled = self.pyramid(images)
        report = self.text.encode(list(batch["report"]), images.device)
        routing = heads["report_router"](report.global_embedding)
        local, _ = heads["experts"](pyramid, routing.expert, routing.gate)
        global_loss = global_infonce(heads["image_projection"](pooled),
                                     heads["text_projection"](report.global_embedding), config.temperature)
        local_loss = local_gloria_loss(heads["word_projection"](report.words), report.word_mask, local,
                                       config.temp_attention, config.temp_similarity, config.temp_loss)
        types = self.type_indices(list(batch["report_type"]), images.device)
        aux = report_type_loss(routing.logits, types) if config.lambda_aux else images.new_zeros(())
        image_logits = heads["image_router"](pooled.detach())
        image_router = image_router_loss(image_logits, routing.expert)
        loss = (global_loss + config.lambda_local * local_loss + config.lambda_aux * aux
                + config.lambda_image_router * image_router)
        with torch.no_grad():
            self.route_log.record(types, routing.expert, image_logits.argmax(-1))
        return StepOutput(loss, {"global": global_loss, "local": local_loss, "aux": aux,
                                 "image_router": image_router})

