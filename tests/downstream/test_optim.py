"""The fine-tuning optimiser: layer-wise lr decay over ViT, DEX ViT and Swin, as classifiers and inside UNETR (the
expected rates written out here, not read from timm), timm's weight decay rule, only trainable parameters; and
stochastic depth in the encoders."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from dex.downstream.lora import add_lora
from dex.downstream.optim import make_optimizer, set_learning_rate
from dex.models import DEXViT
from dex.models.unetr import UNETR2D

BASE_LR, DECAY, WEIGHT_DECAY = 2e-3, 0.7, 0.05
SWIN_DEPTHS = (1, 2, 1, 2)


def dex_vit(**kwargs) -> DEXViT:
    return DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=2, top_k=1,
                  mode="experts", **kwargs)


def vit(**kwargs) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, embed_dim=32, depth=4, num_heads=2, num_classes=0,
                             **kwargs)


def swin(**kwargs) -> nn.Module:
    return SwinTransformer(img_size=64, window_size=4, embed_dim=24, depths=SWIN_DEPTHS, num_heads=(1, 1, 1, 1),
                           num_classes=0, **kwargs)


ENCODERS = {"dex_vit": dex_vit, "vit": vit, "swin": swin}


def model_of(encoder: str, kind: str) -> nn.Module:
    """A classifier (the encoder with a new 3-class head) or a UNETR2D on the encoder."""
    net = ENCODERS[encoder]()
    if kind == "unetr":
        return UNETR2D(net, num_classes=2, feature_size=8)
    net.reset_classifier(3)
    return net


BLOCKS = {"dex_vit": 4, "vit": 4, "swin": sum(SWIN_DEPTHS)}


def encoder_layer(name: str, encoder: str) -> int:
    """The layer of an encoder's parameter by the rule: embeddings 0, the blocks 1 to L in depth order (a Swin's
    numbered on across its stages, a stage's patch merging with its first block), the final norm with block L, the
    rest (the head) L + 1."""
    blocks = BLOCKS[encoder]
    if encoder == "swin":
        stage = re.match(r"layers\.(\d)\.(?:downsample|blocks\.(\d+))\.", name)
        if stage:
            return sum(SWIN_DEPTHS[: int(stage[1])]) + int(stage[2] or 0) + 1
        embedding = name.startswith("patch_embed.")
    else:
        block = re.match(r"blocks\.(\d+)\.", name)
        if block:
            return int(block[1]) + 1
        embedding = name.startswith("patch_embed.") or name in ("cls_token", "pos_embed")
    if embedding:
        return 0
    return blocks if name.startswith("norm.") else blocks + 1


def expected_layer(name: str, encoder: str, kind: str) -> int:
    """The layer of a model's parameter: in a UNETR the encoder's own, the decoder's the top one (L + 1)."""
    if kind == "unetr":
        return encoder_layer(name.removeprefix("encoder."), encoder) if name.startswith("encoder.") \
            else BLOCKS[encoder] + 1
    return encoder_layer(name, encoder)


def group_of(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict]:
    """Each parameter's name -> its optimizer group, checking that each parameter is in at most one group."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    assert len(groups) == sum(len(group["params"]) for group in optimizer.param_groups)
    return {name: groups[id(p)] for name, p in model.named_parameters() if id(p) in groups}


def takes_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases (a DEX ViT's stacked [R, out] expert biases too), norms, tokens, positions and Swin's position bias."""
    return (param.ndim <= 1 or name.endswith(("bias", "cls_token", "pos_embed"))
            or "relative_position_bias_table" in name)


@pytest.mark.parametrize("kind", ["classifier", "unetr"])
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_each_layer_learns_at_its_decayed_rate(encoder, kind):
    model = model_of(encoder, kind)
    optimizer = make_optimizer(model, lr=1.0, weight_decay=WEIGHT_DECAY, layer_decay=DECAY)
    set_learning_rate(optimizer, BASE_LR)
    groups = group_of(optimizer, model)
    assert set(groups) == {name for name, p in model.named_parameters() if p.requires_grad}
    top, layers = BLOCKS[encoder] + 1, set()
    for name, group in groups.items():
        layer = expected_layer(name, encoder, kind)
        assert group["lr"] == pytest.approx(BASE_LR * DECAY ** (top - layer), rel=1e-12), name
        layers.add(layer)
    assert layers == set(range(top + 1))  # every layer present: the embeddings, each block, the head or decoder
    first = "encoder.patch_embed.proj.weight" if kind == "unetr" else "patch_embed.proj.weight"
    assert groups[first]["lr"] == pytest.approx(BASE_LR * DECAY ** top)
    if encoder == "dex_vit":  # a DEX block's router and experts go with its block
        prefix = "encoder." if kind == "unetr" else ""
        for part in ("router.proj.weight", "experts.fc1_weight", "experts.fc2_bias"):
            assert groups[f"{prefix}blocks.2.dex.{part}"]["lr"] == pytest.approx(BASE_LR * DECAY ** 2)


@pytest.mark.parametrize("layer_decay", [None, 1.0, 0.75])
@pytest.mark.parametrize("kind", ["classifier", "unetr"])
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_no_weight_decay_on_biases_norms_and_embeddings(encoder, kind, layer_decay):
    model = model_of(encoder, kind)
    groups = group_of(make_optimizer(model, lr=BASE_LR, weight_decay=WEIGHT_DECAY, layer_decay=layer_decay), model)
    params = dict(model.named_parameters())
    assert set(groups) == {name for name, p in params.items() if p.requires_grad}
    decays = {name: group["weight_decay"] for name, group in groups.items()}
    for name, decay in decays.items():
        assert decay == (0.0 if takes_no_decay(name, params[name]) else WEIGHT_DECAY), name
    assert {0.0, WEIGHT_DECAY} == set(decays.values())
    if layer_decay in (None, 1.0):
        assert all(group["lr"] == BASE_LR for group in groups.values())


def test_only_trainable_parameters_are_optimised():
    """A LoRA encoder: the adapters at their block's rate, the head at the full rate, nothing frozen."""
    model = add_lora(dex_vit(), rank=2, alpha=4)
    model.reset_classifier(3)
    groups = group_of(make_optimizer(model, lr=BASE_LR, weight_decay=WEIGHT_DECAY, layer_decay=DECAY), model)
    adapters = {f"blocks.{b}.attn.{layer}.lora_{ab}.default.weight" for b in range(4) for layer in ("qkv", "proj")
                for ab in "AB"}
    assert set(groups) == adapters | {"head.weight", "head.bias"}
    for name in adapters:
        assert groups[name]["lr"] == pytest.approx(BASE_LR * DECAY ** (4 - int(name.split(".")[1])))
    assert groups["head.weight"]["lr"] == BASE_LR


def test_layer_decay_out_of_range_is_refused():
    with pytest.raises(ValueError, match="layer_decay"):
        make_optimizer(vit(), lr=BASE_LR, weight_decay=WEIGHT_DECAY, layer_decay=0.0)


DROP_PATH_MODELS = {
    "dex_experts": lambda rate: dex_vit(drop_path_rate=rate),
    "dex_director": lambda rate: DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2,
                                        num_experts=2, top_k=1, mode="director", drop_path_rate=rate),
    "dex_plain": lambda rate: DEXViT(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=0,
                                     drop_path_rate=rate),
    "vit": lambda rate: vit(drop_path_rate=rate),
    "swin": lambda rate: swin(drop_path_rate=rate),
}


@pytest.mark.parametrize("name", list(DROP_PATH_MODELS))
def test_drop_path_drops_the_mlp_path_in_training_only(name):
    """With the attention branches silenced (output projections zero), only the MLP / DEX path (experts, director or
    plain MLP) can drop: two training forwards differ, evaluation forwards do not, nor training ones at rate 0."""
    images = torch.randn(8, 3, 64, 64) if name == "swin" else torch.randn(8, 3, 32, 32)
    for rate in (0.5, 0.0):
        model = DROP_PATH_MODELS[name](rate)
        for module_name, module in model.named_modules():
            if module_name.endswith("attn.proj"):
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            model.train()
            assert torch.equal(model(images), model(images)) == (rate == 0.0)
            model.eval()
            assert torch.equal(model(images), model(images))
