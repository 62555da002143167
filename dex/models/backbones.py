"""What downstream code (fine-tuning, UNETR, frozen features, ``dex embed``, ``dex analyze``) needs of an encoder, for
the two families dex takes:

- a **ViT** (a :class:`~dex.models.DEXViT` or a timm ``VisionTransformer``): prefix tokens (the class token) and one
  grid of patch tokens at H/p, blocks in ``encoder.blocks``;
- a **hierarchical** timm model (a Swin, as M-IDoL's and MedMoE's backbones): no class token, four stages at H/4,
  H/8, H/16 and H/32 (``encoder.layers``, each with its patch merging and blocks), the final map NHWC.

Everything that depends on the family goes through here, so a new family is one more branch in this file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dex.models.dex_vit import DEXViT
from dex.models.director_experts import DEXAux


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
    """The (height, width) of the encoder's model inputs: its patch embedding's image size (a ViT, a Swin), else
    (a peer, :mod:`dex.models.peers`) the ``input_size`` of its timm ``pretrained_cfg``."""
    if hasattr(encoder, "patch_embed"):
        return tuple(encoder.patch_embed.img_size)
    return tuple(encoder.pretrained_cfg["input_size"][-2:])


def input_multiple(encoder: nn.Module) -> int:
    """What the height and width of the encoder's inputs must be multiples of for its token grid to be whole: a
    ViT's patch size, a hierarchical encoder's last reduction (a Swin's 32)."""
    if family(encoder) == "vit":
        return _patch_size(encoder)
    return encoder.feature_info[-1]["reduction"]


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


SWIN_REDUCTIONS = [4, 8, 16, 32]


def _patch_size(vit: nn.Module) -> int:
    patch = vit.patch_embed.patch_size
    return patch[0] if isinstance(patch, (tuple, list)) else patch


def four_map_indices(encoder: nn.Module) -> list[int]:
    """The blocks (a ViT: at depths L/4, L/2, 3L/4, 0-based; block L is the final output) or stages (a Swin: all four)
    :func:`four_maps` takes, checked: a ViT needs 16 px patches and at least 4 blocks, a Swin stages at H/4 to H/32.
    Raises a ValueError saying what the encoder lacks."""
    if family(encoder) == "hierarchical":
        reductions = [reduction for _, reduction in stage_shapes(encoder)]
        if reductions != SWIN_REDUCTIONS:
            raise ValueError(f"a hierarchical encoder needs four stages at H/4, H/8, H/16, H/32; "
                             f"{type(encoder).__name__} has reductions {reductions}")
        return [0, 1, 2, 3]
    patch = _patch_size(encoder)
    depth = len(encoder.blocks)
    if patch != 16:
        raise ValueError(f"the encoder needs 16 px patches (its H/16 map brought to H/2 ... H/32), it has {patch}")
    if depth < 4:
        raise ValueError(f"the encoder needs at least 4 blocks (depths L/4, L/2, 3L/4 and L), got {depth}")
    return [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1]


def four_maps(encoder: nn.Module, images: Tensor, indices: list[int] | None = None, noise_std: float = 0.0,
              router_eps: Sequence[Tensor | None] | None = None) -> tuple[list[Tensor], Tensor, list[DEXAux]]:
    """Four maps [B, C_l, h_l, w_l] of model inputs [B, 3, H, W], shallow to deep, the pooled feature [B, D], and a
    DEX ViT's aux output per block (for its alignment and balance terms; empty for another encoder):

    - a ViT (UNETR's): blocks L/4, L/2, 3L/4 (raw) and the final normalised tokens, all at H/16; pooled: the class
      token (``forward_head(pre_logits=True)``); a DEX ViT's router noise driven by ``noise_std`` and
      ``router_eps`` (:meth:`~dex.models.DEXViT.forward_taps`);
    - a Swin (SwinUNETR's, timm's ``features_only``): its four stages at H/4 ... H/32, the final norm on the last;
      pooled: the last map's average (what timm's head pools).

    ``indices``: :func:`four_map_indices` (computed when not given)."""
    indices = four_map_indices(encoder) if indices is None else indices
    if family(encoder) == "hierarchical":
        maps = encoder.forward_intermediates(images, indices=indices, norm=True, output_fmt="NCHW",
                                             intermediates_only=True)
        return maps, maps[-1].mean((-2, -1)), []
    aux: list[DEXAux] = []
    if isinstance(encoder, DEXViT):
        final, aux, tapped = encoder.forward_taps(encoder.embed(images), indices, noise_std, router_eps)
        tokens = [t[:, encoder.num_prefix_tokens:] for t in (*tapped, final)]
    else:
        final, maps = encoder.forward_intermediates(images, indices=indices, output_fmt="NLC")
        tokens = [*maps, final[:, encoder.num_prefix_tokens:]]
    height, width = (size // _patch_size(encoder) for size in images.shape[-2:])
    maps = [t.transpose(1, 2).reshape(t.shape[0], -1, height, width) for t in tokens]
    return maps, encoder.forward_head(final, pre_logits=True), aux


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


def set_drop_path(encoder: nn.Module, rate: float) -> None:
    """Stochastic depth on every block of ``encoder`` (ViT, DEX ViT, Swin), rising linearly from 0 at the first
    block to ``rate`` at the last (timm's rule), in place: each block's ``drop_path1`` and ``drop_path2`` (the
    residual branches of attention and of the MLP or DEX module) become :class:`timm.layers.DropPath` (identity for
    a rate of 0). Lets a pretrained encoder be fine-tuned with the drop path it was not built with."""
    from timm.layers import DropPath

    if not 0 <= rate < 1:
        raise ValueError(f"drop_path must be in [0, 1), got {rate}")
    blocks = [unit[-1] for unit in trainable_units(encoder)]
    for index, block in enumerate(blocks):
        block_rate = rate * index / max(len(blocks) - 1, 1)
        for name in ("drop_path1", "drop_path2"):
            if not hasattr(block, name):
                raise ValueError(f"a {type(block).__name__} block has no {name}: drop path cannot be set")
            setattr(block, name, DropPath(block_rate) if block_rate > 0 else nn.Identity())
