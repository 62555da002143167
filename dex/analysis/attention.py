"""Attention of a query patch over the image in the last block (the paper's Fig. 6)."""

from __future__ import annotations

import torch
from scipy import ndimage
from torch import Tensor, nn


@torch.no_grad()
def last_layer_attention(encoder: nn.Module, images: Tensor, query: tuple[int, int] | None = None,
                         smooth: float = 1.0) -> Tensor:
    """[B, 3, H, W] images -> [B, H, W] attention of one query patch (row, column in the patch grid; the centre by
    default) over all patches in the last block, averaged over heads, upsampled to the image and smoothed with a
    Gaussian of ``smooth`` patches. Works for DEX encoders and timm ViTs (a timm ``Attention`` last block)."""
    block = encoder.blocks[-1]
    captured = {}
    handle = block.attn.register_forward_hook(lambda module, args, out: captured.setdefault("x", args[0]))
    try:
        encoder.eval().forward_features(images)
    finally:
        handle.remove()
    x, attn = captured["x"], block.attn
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1).mean(1)  # [B, T, T]
    grid_h, grid_w = encoder.patch_embed.grid_size
    prefix = encoder.num_prefix_tokens
    row, col = query if query is not None else (grid_h // 2, grid_w // 2)
    maps = weights[:, prefix + row * grid_w + col, prefix:].reshape(batch, 1, grid_h, grid_w)
    maps = nn.functional.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    patch = images.shape[-1] / grid_w
    smoothed = [torch.from_numpy(ndimage.gaussian_filter(m.cpu().numpy(), smooth * patch)) for m in maps]
    return torch.stack(smoothed)
