"""MaskedAutoencoderDEX: MAE pretraining (He et al. 2022) with a DEX encoder and the DEX objective (Eq. 8)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from dex.models.dex_vit import DEXViT, init_linear_and_norm, layer_norm
from dex.models.director_experts import DEXAux, layer_losses
from dex.models.pos_embed import sincos_2d


class MAEOutput(NamedTuple):
    """Everything one MAE-DEX forward produces; every loss term is a separate scalar."""

    loss: Tensor  # Eq. 8: reconstruction + lambda_co * alignment + lambda_bal * balance
    reconstruction: Tensor  # L_self: MSE on the masked patches (of the normalised pixels with norm_pix_loss)
    alignment: Tensor  # (1/L) sum_l alpha_l L_co^l
    balance: Tensor  # (1/L) sum_l L_bal^l
    pred: Tensor  # [B, N, p*p*C_in] predicted patches
    mask: Tensor  # [B, N] 1 where the patch was masked
    alignment_per_layer: Tensor  # [L]
    balance_per_layer: Tensor  # [L]


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], patches row-major, pixels (row, col, channel) within a patch."""
    batch, channels, height, width = imgs.shape
    p = patch_size
    x = imgs.reshape(batch, channels, height // p, p, width // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(patches: Tensor, patch_size: int, grid_size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`patchify`: [B, h*w, p*p*C] -> [B, C, h*p, w*p]."""
    batch = patches.shape[0]
    p, (h, w) = patch_size, grid_size
    x = patches.reshape(batch, h, w, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, -1, h * p, w * p)


def random_masking(tokens: Tensor, mask_ratio: float, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-image random masking by argsort of uniform noise ([B, N], drawn here when None).

    Returns the kept tokens [B, N_keep, C], the mask [B, N] (1 = masked) and the indices that restore the
    original order [B, N].
    """
    batch, length, dim = tokens.shape
    keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, length, device=tokens.device)
    ids_shuffle = torch.argsort(noise.to(tokens.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=tokens.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


class MaskedAutoencoderDEX(nn.Module):
    """MAE with a :class:`DEXViT` encoder: the encoder sees the visible patches, a light ViT decoder
    (width 512, depth 8, 16 heads by default) predicts the masked ones.

    Parameter names follow facebookresearch/mae (``mask_token``, ``decoder_*``) with the encoder under
    ``encoder.``, so MAE checkpoints load through :func:`dex.models.weights.init_from_vit_checkpoint`.
    """

    def __init__(
        self,
        encoder: DEXViT,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.patch_size = encoder.patch_size
        self.grid_size = tuple(encoder.patch_embed.grid_size)
        in_chans = encoder.patch_embed.proj.in_channels
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d(decoder_embed_dim, self.grid_size, encoder.num_prefix_tokens).unsqueeze(0), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=layer_norm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = layer_norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "decoder_pos_embed"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float, noise_std: float = 0.0, mask_noise: Tensor | None = None,
        router_eps: Sequence[Tensor | None] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, list[DEXAux]]:
        """Encode the visible patches: latent [B, 1 + N_keep, C], mask [B, N], ids_restore [B, N], aux."""
        tokens, mask, ids_restore = random_masking(self.encoder.embed(imgs), mask_ratio, mask_noise)
        latent, aux = self.encoder.forward_tokens(tokens, noise_std, router_eps)
        return latent, mask, ids_restore, aux

    def draw_noise(self, generator: torch.Generator, global_batch: int, rows: slice,
                   mask_ratio: float | None = None) -> dict[str, Any]:
        """The random inputs of one step, drawn for the whole global batch from ``generator`` and cut to ``rows``
        (this rank's images): ``mask_noise`` [b, N] and ``router_eps`` (per block, [b, R] image-wise or
        [b * T, R] token-wise with T = 1 + kept patches; None for plain blocks). Passing them to :meth:`forward`
        makes a step independent of how the global batch is split over ranks."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        patches = self.grid_size[0] * self.grid_size[1]
        tokens = self.encoder.num_prefix_tokens + int(patches * (1 - ratio))
        mask_noise = torch.rand(global_batch, patches, generator=generator)[rows]
        return {"mask_noise": mask_noise, "router_eps": self.encoder.draw_router_eps(generator, global_batch, rows,
                                                                                     tokens)}

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """[B, 1 + N_keep, C] -> [B, N, p*p*C_in] predicted patches."""
        x = self.decoder_embed(latent)
        prefix = self.encoder.num_prefix_tokens
        batch, length = ids_restore.shape
        masked = self.mask_token.expand(batch, length + prefix - x.shape[1], -1)
        patches = torch.cat([x[:, prefix:], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]

    def reconstruction_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per patch, averaged over the masked patches; targets normalised per patch
        (mean 0, unit unbiased variance, eps 1e-6) with ``norm_pix_loss``."""
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self,
        imgs: Tensor,
        mask_ratio: float | None = None,
        noise_std: float = 0.0,
        lambda_co: float = 0.1,
        lambda_bal: float = 0.001,
        mask_noise: Tensor | None = None,
        router_eps: Sequence[Tensor | None] | None = None,
    ) -> MAEOutput:
        """One MAE-DEX step on [B, C_in, H, W] images.

        Args:
            mask_ratio: defaults to the model's (0.75).
            noise_std: sigma of the routers' frequency-aware noise (a schedule drives it; training only).
            lambda_co, lambda_bal: the coefficients of Eq. 8 (0.1 and 0.001 in the paper).
            mask_noise, router_eps: the step's random inputs (see :meth:`draw_noise`); drawn inside when None.
        """
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore, aux = self.forward_encoder(imgs, ratio, noise_std, mask_noise, router_eps)
        pred = self.forward_decoder(latent, ids_restore)
        reconstruction = self.reconstruction_loss(imgs, pred, mask)
        aux_losses = layer_losses(aux, device=imgs.device)
        loss = aux_losses.added_to(reconstruction, lambda_co, lambda_bal)
        return MAEOutput(
            loss, reconstruction, aux_losses.alignment, aux_losses.balance, pred, mask,
            aux_losses.alignment_per_layer, aux_losses.balance_per_layer,
        )
