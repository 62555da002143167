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
   types); ``L_image_router``: the image router (for images without a report) learns k* from g, detached (ours);
5. with a DEX ViT backbone (ours: so that DEX and MedMoE experts compare on one backbone), the DEX terms of Eq. 8
   (alignment, balance) join the loss with their schedules, and the directors follow their experts after each step
   (the DEX backbone's terms, :mod:`dex.train.dex_backbone`).

Under DDP and FSDP both contrastive losses run over the global batch (the embeddings, words and local features of
every rank gathered with gradient, each rank computing its own rows) and the experts' BatchNorm over every rank's
images of the expert (:class:`~dex.models.medmoe.GlobalBatchNorm2d`), so that R ranks of b pairs take the step of
one process of R * b pairs (tested); dropout (the text encoder's) draws per rank, as drop-path does elsewhere.

At the end the run keeps the backbone (``encoder/``: what ``dex finetune``, ``dex benchmark`` and the rest take), the
text encoder with its tokenizer (``text/``) and the heads (``heads/``: projections, routers, pyramid neck, experts);
:meth:`MedMoEObjective.load_kept` reads the three back as one model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dex.collectives import batch_offset, gather_batch, gather_with_gradient, global_max, is_distributed
from dex.config import STRICT, validate
from dex.data.shards import collection_reports, read_index
from dex.data.transforms import PretrainTransform
from dex.files import write_json
from dex.models import load_pretrained, load_state_dict_file
from dex.models.backbones import family, input_size
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
from dex.models.text import TextConfig, TextEncoder, build_text_encoder, load_text_encoder, save_text_encoder
from dex.models.weights import init_encoder, save_safetensors
from dex.train.dex_backbone import DEX_TERMS, DEXBackboneObjective, DEXEncoderConfig, create_encoder
from dex.train.monitor import normalised_entropy
from dex.train.objective import StepHook, StepOutput, register_objective


@STRICT
@dataclass
class MedMoEConfig(DEXEncoderConfig):
    """A MedMoE pretraining run on a collection of image-report pairs. Marked: (paper), ours otherwise. The DEX
    keys (``lambda_co``, ``lambda_bal``, ``momentum``, ``noise_std`` and their finals) apply to a DEX ViT backbone."""

    objective: Literal["medmoe"] = "medmoe"
    model: str = "swin_tiny_patch4_window7_224"  # (paper) a Swin; a ViT or DEX ViT with 16 px patches also works
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
    # the backbone's warm start (the paper starts from MedCLIP's weights): a dex encoder folder (a dex export of
    # any method) or a checkpoint file, fitting model and model_args (dex.models.weights.init_encoder)
    init_checkpoint: str | None = None

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


@register_objective
class MedMoEObjective(DEXBackboneObjective):
    """MedMoE under the :class:`~dex.train.objective.Objective` interface; see the module docstring. Parameters:
    ``pyramid.encoder`` (the backbone; ``pyramid``'s other parameters are a ViT's neck), ``text`` (the text encoder),
    ``heads`` (experts, routers, projections)."""

    name = "medmoe"
    config_class = MedMoEConfig
    loss_terms = ("global", "local", "aux", "image_router", *DEX_TERMS)
    batch = "image_text"
    extra_folders = ("text", "heads")
    extras_note = ("MedMoE model: {run}/encoder with {run}/text and {run}/heads "
                   "(dex.train.runs.load_kept('{run}'); dex export for one folder)")
    backbone_path = "pyramid.encoder"
    routing_log_keys = ("load_entropy", "type_agreement", "image_router_agreement")

    def __init__(self, encoder: nn.Module, text: TextEncoder, report_types: list[str], config: MedMoEConfig) -> None:
        super().__init__()
        self.config, self.report_types = config, list(report_types)
        experts = config.num_experts or len(self.report_types)
        if config.lambda_aux and experts != len(self.report_types):
            raise ValueError(f"num_experts {experts} with {len(self.report_types)} report types: L_aux trains the "
                             "router to pick each report type's expert, so give one expert per type (or lambda_aux 0)")
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
        encoder = create_encoder(config, num_classes=0)
        if config.init_checkpoint:
            init_encoder(encoder, config.init_checkpoint)
        return cls(encoder, build_text_encoder(config.text, texts), report_types, config)

    @property
    def encoder(self) -> nn.Module:
        return self.pyramid.encoder

    def kept(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder}

    def sharded_units(self) -> list[nn.Module]:
        """The backbone's blocks (a ViT) or stages (a Swin); the text encoder and the heads are the root unit."""
        return list(self.encoder.blocks if family(self.encoder) == "vit" else self.encoder.layers)

    def hooks(self) -> list[StepHook]:
        return [*super().hooks(), self.route_log]

    def save_extras(self, directory: Path) -> None:
        """``text/`` (the text encoder and its tokenizer, :func:`~dex.models.text.save_text_encoder`) and ``heads/``
        (``model.safetensors``: every tensor but the backbone's and the text encoder's; ``config.json``: the run's
        config and report types), which :meth:`load_kept` reads back with the backbone."""
        directory = Path(directory)
        save_text_encoder(self.text, directory / "text")
        heads = directory / "heads"
        heads.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v for k, v in self.state_dict().items() if not k.startswith(NOT_HEADS)},
                         heads / "model.safetensors")
        write_json(heads / "config.json", {"format": HEADS_FORMAT, "config": dataclasses.asdict(self.config),
                                           "report_types": self.report_types})

    @classmethod
    def load_kept(cls, folder: Path) -> MedMoEObjective:
        """A trained MedMoE model, in eval mode, from a ``dex export`` folder (the backbone in ``folder``, then
        ``folder/text`` and ``folder/heads``) or a finished run folder (``folder/encoder`` and the same). Every tensor
        is loaded strictly from safetensors; a missing or foreign part raises an error naming it."""
        folder = Path(folder)
        backbone = folder / "encoder" if (folder / "encoder" / "config.json").is_file() else folder
        config_path = folder / "heads" / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: missing; {folder} is not a MedMoE export or run folder")
        try:
            record = json.loads(config_path.read_text())
            if record.get("format") != HEADS_FORMAT:
                raise ValueError(f"format is {record.get('format')!r}, not {HEADS_FORMAT!r}")
            config = validate(MedMoEConfig, record["config"], str(config_path))
            report_types = list(record["report_types"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{config_path}: not a MedMoE heads config ({err})") from err
        model = cls(load_pretrained(backbone), load_text_encoder(folder / "text"), report_types, config)
        heads = load_state_dict_file(folder / "heads" / "model.safetensors")
        missing, unexpected = model.load_state_dict(heads, strict=False)
        missing = [k for k in missing if not k.startswith(NOT_HEADS)]
        if missing or unexpected:
            raise ValueError(f"{folder / 'heads' / 'model.safetensors'}: does not fit {config_path} (missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]})")
        return model.eval()

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
        pyramid, pooled, dex_aux = self.pyramid(images, schedule["noise_std"], inputs.get("router_eps"))
        report = self.text.encode(list(batch["report"]), images.device)
        routing = heads["report_router"](report.global_embedding)
        local, _ = heads["experts"](pyramid, routing.expert, routing.gate)
        image, text = heads["image_projection"](pooled), heads["text_projection"](report.global_embedding)
        words = heads["word_projection"](report.words)
        global_batch = self._global_batch(image, text, words, report.word_mask, local)
        global_loss = global_infonce(image, text, config.temperature, **global_batch["global"])
        local_loss = local_gloria_loss(words, report.word_mask, local, config.temp_attention, config.temp_similarity,
                                       config.temp_loss, **global_batch["local"])
        types = self.type_indices(list(batch["report_type"]), images.device)
        aux = report_type_loss(routing.logits, types) if config.lambda_aux else images.new_zeros(())
        image_logits = heads["image_router"](pooled.detach())
        image_router = image_router_loss(image_logits, routing.expert)
        loss = (global_loss + config.lambda_local * local_loss + config.lambda_aux * aux
                + config.lambda_image_router * image_router)
        with torch.no_grad():
            self.route_log.record(types, routing.expert, image_logits.argmax(-1))
        return self.with_dex_terms(loss, {"global": global_loss, "local": local_loss, "aux": aux,
                                          "image_router": image_router}, dex_aux, schedule)

    @staticmethod
    def _global_batch(image: Tensor, text: Tensor, words: Tensor, word_mask: Tensor,
                      local: Tensor) -> dict[str, dict[str, Any]]:
        """Under DDP or FSDP, the global batch's embeddings [B, D], words [B, T, D] (every rank's padded to the
        longest), word masks and local features, gathered with gradient, and this rank's offset in them: the keyword
        arguments of the two losses. In one process, none."""
        if not is_distributed():
            return {"global": {}, "local": {}}
        longest = global_max(words.shape[1], words.device)
        words = F.pad(words, (0, 0, 0, longest - words.shape[1]))
        word_mask = F.pad(word_mask, (0, longest - word_mask.shape[1]), value=False)
        offset = batch_offset(image.shape[0])
        return {"global": {"all_images": gather_with_gradient(image), "all_texts": gather_with_gradient(text),
                           "offset": offset},
                "local": {"all_words": gather_with_gradient(words), "all_word_masks": gather_batch(word_mask),
                          "all_local": gather_with_gradient(local), "offset": offset}}
