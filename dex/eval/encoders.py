"""Encoders to fine-tune, from a short description.

``source`` is one of:
- ``scratch``: a randomly initialised plain ViT of ``model``'s size (``num_experts: 0``), or a random DEX encoder
  with ``scratch_experts: true``;
- a folder written by ``dex export`` / ``save_pretrained`` (a DEX encoder, or a timm ViT such as ``OUT/director``);
- a ``dex pretrain`` run folder (its final encoder, else its newest checkpoint): DEX or the MAE baseline;
- ``timm:ARCH:FILE``: a timm ViT checkpoint file on disk (e.g. ImageNet MAE or DINO weights), loaded without
  unpickling and resized to ``img_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from torch import nn

from dex.models import DEXViT, load_pretrained


@dataclass
class EncoderSpec:
    name: str
    source: str = "scratch"
    model: str = "dex_vit_tiny_patch16_256"  # architecture for scratch
    img_size: int | None = None  # scratch and timm files; pretrained DEX encoders keep their own
    mode: str | None = None  # DEX only: experts (DEX-E) or director (DEX-D); None keeps the saved mode
    top_k: int | None = None  # DEX-E only
    scratch_experts: bool = False  # scratch: a random DEX encoder instead of a plain ViT
    model_args: dict[str, Any] = field(default_factory=dict)  # scratch: more timm.create_model arguments

    @classmethod
    def parse(cls, name: str, value: Any) -> EncoderSpec:
        return cls(name=name, **value) if isinstance(value, dict) else cls(name=name, source=str(value))


def load_encoder(spec: EncoderSpec) -> nn.Module:
    if spec.source == "scratch":
        args = {**spec.model_args, **({} if spec.scratch_experts else {"num_experts": 0})}
        if spec.img_size:
            args["img_size"] = spec.img_size
        encoder = timm.create_model(spec.model, pretrained=False, **args)
    elif spec.source.startswith("timm:"):
        _, arch, file = spec.source.split(":", 2)
        args = {"img_size": spec.img_size} if spec.img_size else {}
        # custom_load: timm's own reader for JAX .npz checkpoints; some default configs (augreg ViTs) set it, which
        # timm 1.0.26 then applies to any local file
        overlay = {"file": file, "custom_load": file.endswith(".npz")}
        encoder = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, **args)
    else:
        path = Path(spec.source)
        if (path / "config.json").is_file():
            encoder = load_pretrained(path)
        elif (path / "config.yaml").is_file():
            from dex.train.export import run_encoder

            encoder = run_encoder(path)
        else:
            raise FileNotFoundError(f"{path}: encoder {spec.name!r} is neither an exported encoder (config.json) nor "
                                    "a pretraining run (config.yaml)")
    if isinstance(encoder, DEXViT) and encoder.dex_modules():
        if spec.mode or spec.top_k:
            encoder.set_mode(spec.mode or "experts", spec.top_k)
        elif encoder.mode == "pretrain":
            encoder.set_mode("experts")  # fine-tuning goes through the experts by default (DEX-E)
    elif spec.mode or spec.top_k:
        raise ValueError(f"encoder {spec.name!r}: mode and top_k apply to DEX encoders only")
    return encoder


def freeze_all_but_last(encoder: nn.Module, blocks: int) -> None:
    """Train only the last ``blocks`` blocks (and the final norm): the embeddings and earlier blocks are frozen."""
    total = len(encoder.blocks)
    if not 0 <= blocks <= total:
        raise ValueError(f"trainable_blocks must be between 0 and {total}, got {blocks}")
    keep = {id(p) for block in list(encoder.blocks)[total - blocks:] for p in block.parameters()}
    keep |= {id(p) for p in encoder.norm.parameters()}
    for param in encoder.parameters():
        if id(param) not in keep:
            param.requires_grad_(False)
