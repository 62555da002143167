"""UNETR (Hatamizadeh et al., WACV 2022) in 2D on a ViT or Swin encoder, built from MONAI's UNETR blocks.

A **ViT** (a :class:`DEXViT`, or a timm ``VisionTransformer``) with 16-pixel patches: its blocks at depth L/4, L/2
and 3L/4 (blocks 3, 6 and 9 of ViT-B) and its final normalised output feed the decoder's skip connections, as in
MONAI's UNETR, the H/16 maps brought to H/2, H/4 and H/8 by transposed convolutions. A **Swin** (a hierarchical timm
model of four stages at H/4, H/8, H/16, H/32): its stages feed them at their own resolutions through residual
convolution blocks and the normalised H/32 stage is the bottleneck, as in SwinUNETR (Hatamizadeh et al., 2022); with
no H/2 stage, the last decoder step up-samples x4 (ours). In both the image itself feeds the full-resolution skip.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from timm.models import group_parameters
from torch import Tensor, nn

from dex.models.backbones import family, four_map_indices, four_maps, stage_shapes


class UNETR2D(nn.Module):
    """[B, C_in, H, W] -> [B, num_classes, H, W] logits.

    Args:
        encoder: a ViT with 16 px patches and at least 4 blocks, or a Swin of four stages (H/4 to H/32)
            (:func:`dex.models.backbones.four_maps`).
        num_classes: output channels (background included).
        feature_size: channels of the full-resolution stage (16 in UNETR); the deeper stages use 2x, 4x, 8x.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, feature_size: int = 16, in_chans: int = 3,
                 norm_name: str = "instance") -> None:
        super().__init__()
        self.encoder = encoder
        self.block_indices = four_map_indices(encoder)  # refuses what UNETR cannot take, saying why
        self.vit = family(encoder) == "vit"
        common = dict(spatial_dims=2, kernel_size=3, norm_name=norm_name, res_block=True)
        if self.vit:
            bottleneck = encoder.embed_dim
            self.encoder2, self.encoder3, self.encoder4 = (
                UnetrPrUpBlock(in_channels=bottleneck, out_channels=feature_size * scale, num_layer=layers, stride=1,
                               upsample_kernel_size=2, **common)
                for scale, layers in ((2, 2), (4, 1), (8, 0)))
        else:
            stages = stage_shapes(encoder)
            bottleneck = stages[3][0]
            self.encoder2, self.encoder3, self.encoder4 = (
                UnetrBasicBlock(in_channels=channels, out_channels=feature_size * scale, stride=1, **common)
                for (channels, _), scale in zip(stages[:3], (2, 4, 8)))
        self.encoder1 = UnetrBasicBlock(in_channels=in_chans, out_channels=feature_size, stride=1, **common)
        self.decoder5 = UnetrUpBlock(in_channels=bottleneck, out_channels=feature_size * 8, upsample_kernel_size=2,
                                     **common)
        self.decoder4 = UnetrUpBlock(in_channels=feature_size * 8, out_channels=feature_size * 4,
                                     upsample_kernel_size=2, **common)
        self.decoder3 = UnetrUpBlock(in_channels=feature_size * 4, out_channels=feature_size * 2,
                                     upsample_kernel_size=2, **common)
        self.decoder2 = UnetrUpBlock(in_channels=feature_size * 2, out_channels=feature_size,
                                     upsample_kernel_size=2 if self.vit else 4, **common)
        self.out = UnetOutBlock(spatial_dims=2, in_channels=feature_size, out_channels=num_classes)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The encoder's parameters that take no weight decay (its ``no_weight_decay``), named from here."""
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's parameter grouping (the layer ids of ``timm.optim``'s layer-wise lr decay): a parameter
        ``encoder.<name>`` in the group the encoder's own ``group_matcher`` gives ``<name>``, every other one (the
        decoder) in one group after the encoder's last, so at the full learning rate.

        Returns a function of a parameter name, the form ``timm.models.group_parameters`` takes besides a dict."""
        groups = group_parameters(self.encoder, self.encoder.group_matcher(coarse), reverse=True)
        decoder = max(groups.values()) + 1
        groups = {f"encoder.{name}": group for name, group in groups.items()}
        return lambda name: groups.get(name, decoder)

    def forward(self, x: Tensor) -> Tensor:
        (shallow, middle, deep, bottleneck), _, _ = four_maps(self.encoder, x, self.block_indices)
        enc1 = self.encoder1(x)
        enc2, enc3, enc4 = self.encoder2(shallow), self.encoder3(middle), self.encoder4(deep)
        out = self.decoder5(bottleneck, enc4)
        out = self.decoder4(out, enc3)
        out = self.decoder3(out, enc2)
        return self.out(self.decoder2(out, enc1))
