"""DEXViT: equivalences with plain timm ViTs, routing granularity, the registry, and configuration errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from dex.models import DEXViT, director_state_dict, layer_weights, sincos_2d
from tests.conftest import experts_by_loop, tiny_vit


def timm_twin(model: DEXViT):
    """A timm VisionTransformer with the shape of ``model``'s director path."""
    args = model.model_args
    return timm.models.vision_transformer.VisionTransformer(
        img_size=args["img_size"], patch_size=args["patch_size"], embed_dim=args["embed_dim"], depth=args["depth"],
        num_heads=args["num_heads"], num_classes=0, fc_norm=False,
    )


def test_sincos_matches_mae_formula():
    """MAE's get_2d_sincos_pos_embed written out in NumPy: first half encodes the column, second the row."""
    dim, (h, w) = 16, (3, 5)

    def emb_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    expected = np.concatenate([emb_1d(dim // 2, grid_w), emb_1d(dim // 2, grid_h)], axis=1)
    expected = np.concatenate([np.zeros([1, dim]), expected])
    np.testing.assert_allclose(sincos_2d(dim, (h, w)).numpy(), expected, atol=1e-6)


def test_layer_weights_alpha():
    assert layer_weights(4).tolist() == pytest.approx([1 / 4, 1 / 3, 1 / 2, 1.0])  # 1 / (L - (l - 1))


def test_single_expert_model_equals_plain_vit():
    """With R = 1, K = 1 every image goes through the one expert with weight 1: a plain ViT."""
    model = tiny_vit(num_experts=1, top_k=1, mode="experts").eval()
    for module in model.dex_modules():  # make the director the expert, then export that path
        for eta, theta in zip(module.director.parameters(), module.experts.tensors()):
            eta.data.copy_(theta[0])
    vit = timm_twin(model).eval()
    vit.load_state_dict(director_state_dict(model))
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), vit.forward_features(x), rtol=0, atol=1e-5)


def test_director_mode_equals_timm_vit():
    model = tiny_vit().eval()
    model.set_mode("director")
    vit = timm_twin(model).eval()
    vit.load_state_dict(director_state_dict(model))
    x = torch.randn(3, 3, 32, 32)
    assert (model.forward_features(x) - vit.forward_features(x)).abs().max() < 1e-5


def test_image_wise_routing_gives_one_expert_set_per_image():
    model = tiny_vit().eval()
    model.forward_features(torch.randn(4, 3, 32, 32))
    for routing in model.last_routing:
        assert routing.indices.shape == (4, 2) and routing.scores.shape == (4, 4)


def test_block_output_equals_direct_formula():
    """x + attn(norm1 x), then + sum_k w_k E_k(norm2 x) with the experts the router chose for the image."""
    model = tiny_vit().eval()
    block = model.blocks[0]
    x = torch.randn(2, 17, 32)
    out, aux = block(x)
    h = x + block.attn(block.norm1(x))
    f = block.norm2(h)
    expected = h + experts_by_loop(block.dex.experts, f, aux.routing.indices, aux.routing.weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_token_wise_model_runs_and_routes_tokens():
    model = tiny_vit(activation="token").train()
    out = model.forward_features(torch.randn(2, 3, 32, 32), noise_std=1.0)
    assert out.shape == (2, 17, 32)
    assert model.last_routing[0].indices.shape == (2 * 17, 2)


def test_per_layer_experts_and_k():
    model = tiny_vit(num_experts=[4, 3, 2], top_k=[3, 2, 1]).eval()
    model.forward_features(torch.randn(2, 3, 32, 32))
    assert [m.num_experts for m in model.dex_modules()] == [4, 3, 2]
    assert [r.indices.shape[1] for r in model.last_routing] == [3, 2, 1]


def test_same_seed_same_routing_and_features():
    def run():
        torch.manual_seed(7)
        model = tiny_vit().train()
        x = torch.randn(4, 3, 32, 32)
        return model.forward_features(x, noise_std=1.0), model.last_routing

    (f1, r1), (f2, r2) = run(), run()
    assert torch.equal(f1, f2)
    assert all(torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores) for a, b in zip(r1, r2))


def test_mode_switch_keeps_the_model():
    model = tiny_vit()
    model.set_mode("experts", top_k=1)
    assert model.mode == "experts" and model.model_args["dex"]["top_k"] == [1, 1, 1]
    model.set_mode("director")
    assert all(p.requires_grad for m in model.dex_modules() for p in m.director.parameters())


def test_forward_intermediates_for_unetr():
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    final, feats = model.forward_intermediates(x, indices=[0, 2])
    assert [f.shape for f in feats] == [(2, 32, 4, 4)] * 2
    torch.testing.assert_close(final, model.forward_features(x))
    only = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    assert len(only) == 1 and only[0].shape == (2, 16, 32)
    torch.testing.assert_close(only[0].transpose(1, 2).reshape(2, 32, 4, 4), feats[1])


def test_classifier_head():
    model = tiny_vit(num_classes=5, global_pool="avg").eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)


@pytest.mark.parametrize("size,dims", [
    ("tiny", (192, 12, 3)), ("small", (384, 12, 6)), ("base", (768, 12, 12)), ("large", (1024, 24, 16)),
])
def test_registered_in_timm(size, dims):
    name = f"dex_vit_{size}_patch16_256"
    assert name in timm.list_models("dex_vit_*")
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    width, depth, heads = dims
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (width, depth, heads)
    assert model.patch_embed.grid_size == (16, 16)
    hidden = 4 * width
    mlp = 2 * width * hidden + hidden + width
    block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) + 8 * width + 9 * mlp
    expected = depth * block + (3 * 16 * 16 * width + width) + width + 2 * width  # embed, cls, final norm
    assert sum(p.numel() for n, p in model.named_parameters() if n != "pos_embed") == expected
    assert math.isclose(model.model_args["dex"]["num_experts"][0], 8) and model.model_args["dex"]["top_k"][0] == 2


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=2, top_k=3), "top_k"),
    (dict(num_experts=-1, top_k=1), "num_experts"),
    (dict(img_size=30), "divisible"),
    (dict(num_experts=[4, 4]), "one value per block"),
    (dict(mode="teacher"), "mode"),
    (dict(global_pool="max"), "global_pool"),
])
def test_malformed_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_vit(**kwargs)


def test_zero_experts_is_a_plain_vit():
    """R = 0 in every block: the plain ViT of the MAE baseline, weight for weight a timm ViT."""
    model = tiny_vit(num_experts=0).eval()
    assert not model.dex_modules() and model.model_args["dex"]["top_k"] == [0, 0, 0]
    vit = timm_twin(model).eval()
    vit.load_state_dict(director_state_dict(model))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), vit.forward_features(x), rtol=0, atol=1e-5)


def test_mixed_plain_and_dex_blocks():
    model = tiny_vit(num_experts=[0, 4, 0], top_k=2).train()
    model.forward_features(torch.randn(2, 3, 32, 32), noise_std=1.0)
    assert model.last_routing[0] is None and model.last_routing[1].indices.shape == (2, 2)
    assert [m.num_experts for m in model.dex_modules()] == [4]
