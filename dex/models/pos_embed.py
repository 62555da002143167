"""Fixed 2D sine-cosine positional embeddings in the layout of MAE (facebookresearch/mae), so that MAE
checkpoints and DEX models agree on what each channel encodes."""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(embed_dim: int, positions: Tensor) -> Tensor:
    """[M] positions -> [M, embed_dim]: sin(p * w_i) for the first half, cos(p * w_i) for the second,
    with ``w_i = 10000 ** (-i / (embed_dim / 2))``."""
    if embed_dim % 2:
        raise ValueError(f"1D sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int], num_prefix_tokens: int = 1) -> Tensor:
    """[num_prefix_tokens + H*W, embed_dim] float32: zeros for the prefix (class) tokens, then for the patch
    at row h, column w (row-major order) the 1D embedding of w in the first half and of h in the second."""
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size[0]), torch.arange(grid_size[1]), indexing="ij")
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    return torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=emb.dtype), emb]).float()
