"""What downstream code (fine-tuning, UNETR, frozen features, ``dex embed``, ``dex analyze``) needs of an encoder, for
the two families dex takes:

- a **ViT** (a :class:`~dex.models.DEXViT` or a timm ``VisionTransformer``): prefix tokens (the class token) and one
  grid of patch tokens at H/p, blocks in ``encoder.blocks``;
- a **hierarchical** timm model (a Swin, as M-IDoL's and MedMoE's backbones): no class token, four stages at H/4,
  H/8, H/16 and H/32 (``encoder.layers``, each with its patch merging and blocks), the final map NHWC.

Everything that depends on the family goes through here, so a new family is one more branch in this file.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_vit(encoder: nn.Module) -> bool:
    return hasattr(encoder, "blocks") and hasattr(encoder, "num_prefix_tokens")


def is_hierarchical(encoder: nn.Module) -> bool:
    """A timm model of stages (``layers``) whose ``feature_info`` gives a reduction per stage (a Swin)."""
    info = getattr(encoder, "feature_info", None)
    return not is_vit(encoder) and hasattr(encoder, "layers") and isinstance(info, list) and len(info) > 1


def family(encoder: nn.Module) -> str:
    """``vit`` or ``hierarchical``; a ValueError naming the class for any other model."""
    if is_vit(encoder):
        return "vit"
    if is_hierarchical(encoder):
        return "hierarchical"
    raise ValueError(f"a {type(encoder).__name__} is neither a ViT (blocks and prefix tokens) nor a hierarchical timm "
                     "model (stages with feature_info, e.g. a Swin): dex cannot use it as an encoder")


def input_size(encoder: nn.Module) -> tuple[int, int]:
    """The (height, width) of the encoder's model inputs."""
    return tuple(encoder.patch_embed.img_size)


def token_grid(encoder: nn.Module) -> tuple[int, int]:
    """The (rows, columns) of the final feature map: a ViT's patch grid, a Swin's H/32 x W/32 map."""
    if family(encoder) == "vit":
        return tuple(encoder.patch_embed.grid_size)
    reduction = encoder.feature_info[-1]["reduction"]
    height, width = input_size(encoder)
    return height // reduction, width // reduction


def final_tokens(encoder: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The pooled feature [B, D] (``forward_head(pre_logits=True)``: a ViT's class token, a Swin's average of its
    final map) and the final normalised tokens [B, P, D] (row-major over :func:`token_grid`; a ViT's prefix tokens
    dropped) of model inputs [B, 3, H, W], float32."""
    vit = family(encoder) == "vit"
    output = encoder.forward_features(images)
    pooled = encoder.forward_head(output, pre_logits=True).float()
    if vit:
        return pooled, output[:, encoder.num_prefix_tokens:].float()
    return pooled, output.flatten(1, 2).float()  # NHWC -> [B, H*W, C]


def depth_features(encoder: nn.Module, images: Tensor) -> list[Tensor]:
    """The output of every block (a ViT) or stage (a Swin) of model inputs [B, 3, H, W], each [B, C, h, w]."""
    family(encoder)  # refuses an encoder of neither family
    return encoder.forward_intermediates(images, output_fmt="NCHW", intermediates_only=True)


def stage_shapes(encoder: nn.Module) -> list[tuple[int, int]]:
    """(channels, reduction) of each of a hierarchical encoder's stages, from H/4 to H/32."""
    return [(info["num_chs"], info["reduction"]) for info in encoder.feature_info]


def trainable_units(encoder: nn.Module) -> list[list[nn.Module]]:
    """The encoder's blocks in depth order, each with what trains along with it: a ViT's blocks, a Swin's blocks
    across its stages, a stage's patch merging going with the stage's first block."""
    if family(encoder) == "vit":
        return [[block] for block in encoder.blocks]
    units = []
    for stage in encoder.layers:
        blocks = list(stage.blocks)
        units.append([stage.downsample, blocks[0]])
        units += [[block] for block in blocks[1:]]
    return units


@torch.no_grad()
def pooled_and_mean(encoder: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The pooled feature and the mean of the final tokens of model inputs [B, 3, H, W]: two [B, D] float32."""
    pooled, tokens = final_tokens(encoder, images)
    return pooled, tokens.mean(1)
