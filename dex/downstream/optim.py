"""The fine-tuning optimiser: AdamW with layer-wise learning-rate decay (BEiT, MAE fine-tuning: 0.65 to 0.75), by
``timm.optim``'s parameter groups.

A layer is one of the model's ``group_matcher`` groups (timm's grouping of its parameters), numbered 0 (the input
side) to D (the output side); a parameter of layer l learns at ``lr * layer_decay ** (D - l)``, timm's ``lr_scale``
of its group. For an encoder of L blocks, D = L + 1:

- a **ViT** (timm ``VisionTransformer``, :class:`~dex.models.DEXViT`): class token, position and patch embeddings
  layer 0; block i (0-based; a DEX block's router, experts and director included) layer i + 1; the final norm with
  the last block (layer L); the classifier (and anything else no pattern names) layer L + 1, the full rate;
- a **Swin** (timm ``SwinTransformer``): the patch embedding layer 0, then its blocks numbered on across the stages
  (stage s, block b: layer 1 + b + the blocks of the stages before s; L = all blocks, 12 for Swin-T), a stage's
  patch merging with its first block, the final norm with the last block, the classifier layer L + 1;
- a :class:`~dex.models.unetr.UNETR2D`: its encoder's parameters as in the encoder, every decoder parameter in one
  layer after them (L + 1), the full rate.

Weight decay is timm's rule: none on the 1-D parameters (biases, norms) and on what the model names in
``no_weight_decay`` (position embeddings, tokens, a DEX ViT's stacked expert biases, a Swin's relative position bias
tables). Only parameters with ``requires_grad`` are optimised (a frozen encoder, LoRA adapters).

PyTorch optimisers ignore ``lr_scale``: set the learning rate with :func:`set_learning_rate`, never by writing each
group's ``lr``.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from torch import nn


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None,
                   fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` (an encoder with its classifier, or a ``UNETR2D``), each group
    at ``lr`` times its layer's scale (see the module's docstring).

    Args:
        lr: the base learning rate (that of the head or decoder).
        weight_decay: AdamW's decoupled weight decay for the parameters that take it.
        layer_decay: the decay per layer, in (0, 1]; None or 1.0: one learning rate for all (groups for the weight
            decay rule only).
        fused: PyTorch's fused AdamW kernel (None: PyTorch's default implementation for the device).
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay,
                                    layer_decay=None if layer_decay == 1.0 else layer_decay, fused=fused)
    set_learning_rate(optimizer, lr)
    return optimizer


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr`` times its ``lr_scale`` (1 for a group without one), e.g. each step of
    a schedule."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
