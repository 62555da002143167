"""UNETR (Hatamizadeh et al., WACV 2022) in 2D on a ViT encoder, built from MONAI's UNETR blocks.

The encoder is any ViT with ``forward_intermediates`` (a :class:`DEXViT`, or a timm ``VisionTransformer``) and
16-pixel patches. Its blocks at depth L/4, L/2 and 3L/4 (blocks 3, 6 and 9 of ViT-B) and its final normalised
output feed the decoder's skip connections, as in MONAI's UNETR; the image itself feeds the full-resolution one.
"""

from __future__ import annotations

from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import Tensor, nn


class UNETR2D(nn.Module):
    """[B, C_in, H, W] -> [B, num_classes, H, W] logits.

    Args:
        encoder: a ViT with 16 px patches and at least 4 blocks.
        num_classes: output channels (background included).
        feature_size: channels of the full-resolution stage (16 in UNETR); the deeper stages use 2x, 4x, 8x.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, feature_size: int = 16, in_chans: int = 3,
                 norm_name: str = "instance") -> None:
        super().__init__()
        patch = encoder.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        depth = len(encoder.blocks)
        if patch != 16:
            raise ValueError(f"UNETR needs 16 px patches (four 2x up-samplings), the encoder has {patch}")
        if depth < 4:
            raise ValueError(f"UNETR needs an encoder of at least 4 blocks, got {depth}")
        self.encoder = encoder
        self.block_indices = [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1]
        hidden = encoder.embed_dim
        common = dict(spatial_dims=2, kernel_size=3, norm_name=norm_name, res_block=True)
        self.encoder1 = UnetrBasicBlock(in_channels=in_chans, out_channels=feature_size, stride=1, **common)
        self.encoder2, self.encoder3, self.encoder4 = (
            UnetrPrUpBlock(in_channels=hidden, out_channels=feature_size * scale, num_layer=layers, stride=1,
                           upsample_kernel_size=2, **common)
            for scale, layers in ((2, 2), (4, 1), (8, 0))
        )
        self.decoder5 = UnetrUpBlock(in_channels=hidden, out_channels=feature_size * 8, upsample_kernel_size=2, **common)
        self.decoder4 = UnetrUpBlock(in_channels=feature_size * 8, out_channels=feature_size * 4,
                                     upsample_kernel_size=2, **common)
        self.decoder3 = UnetrUpBlock(in_channels=feature_size * 4, out_channels=feature_size * 2,
                                     upsample_kernel_size=2, **common)
        self.decoder2 = UnetrUpBlock(in_channels=feature_size * 2, out_channels=feature_size, upsample_kernel_size=2,
                                     **common)
        self.out = UnetOutBlock(spatial_dims=2, in_channels=feature_size, out_channels=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        final, (z3, z6, z9) = self.encoder.forward_intermediates(x, indices=self.block_indices, output_fmt="NCHW")
        height, width = z3.shape[-2:]
        prefix = self.encoder.num_prefix_tokens
        z12 = final[:, prefix:].transpose(1, 2).reshape(final.shape[0], -1, height, width)
        enc1 = self.encoder1(x)
        enc2, enc3, enc4 = self.encoder2(z3), self.encoder3(z6), self.encoder4(z9)
        out = self.decoder5(z12, enc4)
        out = self.decoder4(out, enc3)
        out = self.decoder3(out, enc2)
        return self.out(self.decoder2(out, enc1))
