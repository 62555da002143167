"""State-dict conversions between plain ViT / MAE checkpoints and DEX models, on tensors and key names only: this
module imports no model, so the model modules can use it (a timm ``pretrained_filter_fn``) without a cycle."""

from __future__ import annotations

import re

from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

_MLP_KEY = re.compile(r"^blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$")
_DECODER_KEYS = ("mask_token", "decoder_")
_DROPPED_VIT_KEYS = ("head.", "fc_norm.")  # classifier of a timm / fine-tuned checkpoint


def _encoder_and_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """A DEX encoder (keys of its own) or an MAE around one (the encoder's keys under ``encoder.``)."""
    encoder = getattr(model, "encoder", None)
    if hasattr(encoder, "dex_modules"):
        return encoder, "encoder."
    if hasattr(model, "dex_modules"):
        return model, ""
    raise TypeError(f"expected a DEXViT or MaskedAutoencoderDEX, got {type(model).__name__}")


def vit_to_dex_state_dict(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map a plain ViT / MAE state dict onto ``model`` (a :class:`DEXViT` or :class:`MaskedAutoencoderDEX`).

    Each block's ``mlp`` becomes the director and every expert (the reference code's initialisation, D10);
    attention, embeddings and norms are copied; positional embeddings are interpolated (bicubic) when the
    grid differs; MAE decoder keys are kept for an MAE target and dropped otherwise; a classifier head is
    dropped. The routers have no counterpart and keep the model's initialisation. A state dict that is
    already in DEX layout is returned unchanged.
    """
    encoder, prefix = _encoder_and_prefix(model)
    if any(".dex." in k for k in state_dict):
        return dict(state_dict)
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("encoder.")
        if key.startswith(_DECODER_KEYS):
            if prefix:
                if key == "decoder_pos_embed":
                    value = _resample(value, model.grid_size)
                out[key] = value
            continue
        if key.startswith(_DROPPED_VIT_KEYS):
            continue
        match = _MLP_KEY.match(key)
        if match and prefix + key not in own:  # a DEX block (a plain block keeps its mlp)
            block, layer, kind = match.groups()
            dex = f"{prefix}blocks.{block}.dex"
            out[f"{dex}.director.{layer}.{kind}"] = value
            experts = own.get(f"{dex}.experts.{layer}_{kind}")
            num_experts = experts.shape[0] if experts is not None else 1
            out[f"{dex}.experts.{layer}_{kind}"] = value.unsqueeze(0).repeat(num_experts, *([1] * value.dim()))
            continue
        if key == "pos_embed":
            value = _resample(value, tuple(encoder.patch_embed.grid_size))
        out[prefix + key] = value
    for key, value in own.items():
        if ".dex.router." in key and key not in out:
            out[key] = value
    return out


def _resample(pos_embed: Tensor, grid_size: tuple[int, int]) -> Tensor:
    return resample_abs_pos_embed(pos_embed, list(grid_size), num_prefix_tokens=1)


def director_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The director path of a :class:`DEXViT` as a timm ``VisionTransformer`` state dict (block MLP = director)."""
    out = {}
    for key, value in model.state_dict().items():
        if ".dex.router." in key or ".dex.experts." in key:
            continue
        out[key.replace(".dex.director.", ".mlp.")] = value
    return out
