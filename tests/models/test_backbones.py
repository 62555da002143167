"""The two encoder families downstream code takes: a ViT and a Swin give their tokens, grids, stages and blocks; UNETR
runs on both; any other model is refused by name."""

from __future__ import annotations

import pytest
import timm
import torch

from dex.downstream.encoders import freeze_all_but_last
from dex.models import DEXViT
from dex.models.backbones import depth_features, family, final_tokens, token_grid, trainable_units
from dex.models.unetr import UNETR2D

SWIN = dict(img_size=64, window_size=4, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), num_classes=0)


def swin(**overrides) -> torch.nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **{**SWIN, **overrides}).eval()


def vit() -> DEXViT:
    return DEXViT(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=0).eval()


def test_vit_tokens_are_the_class_token_and_the_patch_tokens():
    encoder, images = vit(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        output = encoder.forward_features(images)
        pooled, tokens = final_tokens(encoder, images)
    torch.testing.assert_close(pooled, output[:, 0])
    torch.testing.assert_close(tokens, output[:, encoder.num_prefix_tokens:])
    assert family(encoder) == "vit" and token_grid(encoder) == (4, 4) and tokens.shape[1] == 16
    assert [f.shape for f in depth_features(encoder, images)] == [(2, 32, 4, 4)] * 4
    assert len(trainable_units(encoder)) == 4


def test_swin_tokens_are_its_average_and_its_final_map_row_major():
    encoder, images = swin(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        output = encoder.forward_features(images)  # [B, H/32, W/32, C]
        pooled, tokens = final_tokens(encoder, images)
    assert family(encoder) == "hierarchical" and token_grid(encoder) == output.shape[1:3] == (2, 2)
    torch.testing.assert_close(pooled, output.mean((1, 2)))
    torch.testing.assert_close(tokens[:, 1 * 2 + 0], output[:, 1, 0])  # row 1, column 0
    assert tokens.shape == (2, 4, encoder.num_features)
    assert [tuple(f.shape) for f in depth_features(encoder, images)] == [
        (2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]


def test_swin_blocks_count_across_stages_and_patch_merging_trains_with_its_stage():
    encoder = swin()
    units = trainable_units(encoder)
    assert len(units) == sum(SWIN["depths"])
    freeze_all_but_last(encoder, 3)  # stages 3 and 2 whole (one block each), stage 1's second block alone
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    for prefix in ("layers.3.downsample", "layers.3.blocks.0", "layers.2.downsample", "layers.2.blocks.0",
                   "layers.1.blocks.1", "norm."):
        assert any(name.startswith(prefix) for name in trainable), prefix
    assert not any(name.startswith(("layers.1.downsample", "layers.1.blocks.0", "layers.0", "patch_embed"))
                   for name in trainable)
    with pytest.raises(ValueError, match="between 0 and 5"):
        freeze_all_but_last(swin(), 6)


def test_unetr_on_a_swin_shapes_gradients_and_bad_pyramids():
    model = UNETR2D(swin().train(), num_classes=3, feature_size=8)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    out.square().mean().backward()
    for name, param in model.named_parameters():
        if name.startswith("encoder.head"):
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match=r"four stages at H/4.*reductions \[4, 8, 16\]"):
        UNETR2D(swin(depths=(1, 1, 1), num_heads=(1, 2, 2)), 2)


def test_other_models_are_refused_by_name():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    for use in (family, token_grid, trainable_units, lambda m: UNETR2D(m, 2)):
        with pytest.raises(ValueError, match="a ResNet is neither a ViT"):
            use(resnet)
