"""Peers: conventional networks trained from scratch in the same run as the foundation encoders (same data,
augmentation and budget), so that the tables show what pretraining buys over the usual supervised model of a task.

- ``unet`` (segmentation): nnU-Net's 2D network (Isensee et al., Nat. Methods 2021, its ``PlainConvUNet``) as
  MONAI's ``DynUNet``, MONAI's implementation of it: two 3x3 convolutions per stage in the encoder and in the
  decoder, each with instance norm (affine) and leaky ReLU (0.01); stride-2 convolutions down, transposed
  convolutions up, skip connections by concatenation, a 1x1 output convolution, He initialisation, no deep
  supervision (one difference: no bias on the 3x3 convolutions, which the norm's shift makes redundant; nnU-Net keeps
  one). Depth and widths follow nnU-Net's 2D rule for the patch size ``img_size`` (MONAI's ``BasicUNet`` has them
  fixed): the map is halved while it stays even and at least 4 px (128 px: 6 stages, 64 px: 5), stage i has
  min(32 * 2^i, 512) channels (20.6 M parameters at 128 px, 7.8 M at 64 px). It is the whole segmentation network
  (no UNETR around it), registered in timm as ``dex_unet2d`` so that a model folder rebuilds it as it rebuilds an
  encoder (``timm.create_model("dex_unet2d", img_size=128, num_classes=K)``).
- any other name (classification): a timm network such as ``resnet18`` or ``convnext_atto``, without weights, its
  input size recorded as the ``input_size`` of its timm ``pretrained_cfg`` (timm's default when ``img_size`` is not
  given), which :func:`dex.models.backbones.input_size` reads. Transformers are refused: a ViT or a Swin from
  scratch is the encoder source ``scratch``.
"""

from __future__ import annotations

from typing import Any

import timm
from monai.networks.blocks import UnetOutBlock
from monai.networks.nets import DynUNet
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from dex.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

UNET = "unet"  # the peer name of the U-Net
UNET_ARCHITECTURE = "dex_unet2d"  # its timm name
UNET_IMG_SIZE = 128


def peer_task_type(model: str) -> str:
    """The task type the peer ``model`` does: ``segmentation`` for the U-Net, ``classification`` for the others."""
    return "segmentation" if model == UNET else "classification"


def unet_filters(img_size: int, features: int = 32, max_features: int = 512) -> list[int]:
    """nnU-Net's 2D stages for square patches of side ``img_size``: the channels of each stage, one stage more than
    the halvings of the map while it stays even and at least 4 px (``features`` doubled at each, up to
    ``max_features``; nnU-Net: 32 and 512)."""
    halvings, side = 0, img_size
    while side % 2 == 0 and side // 2 >= 4:
        halvings, side = halvings + 1, side // 2
    return [min(features * 2 ** stage, max_features) for stage in range(halvings + 1)]


class UNet2D(nn.Module):
    """nnU-Net's 2D U-Net (see the module docstring): [B, in_chans, H, W] -> [B, num_classes, H, W] logits, H and W
    multiples of 2^(stages - 1) (as ``img_size`` is); ``num_classes`` 0: the last decoder stage's features
    [B, features, H, W].

    Args:
        img_size: the side of the square model inputs (training patches, sliding windows); sets the depth.
        in_chans: input channels.
        num_classes: output channels (background included); 0 for no output convolution.
        features: channels of the first stage (nnU-Net: 32), doubled at each stage down.
        max_features: the widest stage (nnU-Net 2D: 512).
    """

    def __init__(self, img_size: int = UNET_IMG_SIZE, in_chans: int = 3, num_classes: int = 2, features: int = 32,
                 max_features: int = 512) -> None:
        super().__init__()
        filters = unet_filters(img_size, features, max_features)
        strides = [1] + [2] * (len(filters) - 1)
        unet = DynUNet(2, in_chans, 1, kernel_size=[3] * len(filters), strides=strides,
                       upsample_kernel_size=strides[1:], filters=filters, norm_name=("INSTANCE", {"affine": True}),
                       act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}), deep_supervision=False)
        # DynUNet holds each block twice (by stage and in its chain of skip layers): the chain alone keeps every
        # tensor once in a state dict (safetensors refuses shared tensors); its output block is ours (the head)
        self.layers = unet.skip_layers
        self.img_size, self.num_features = img_size, filters[0]
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """A new output convolution of ``num_classes`` channels (He-initialised, as nnU-Net's), none for 0."""
        self.num_classes = num_classes
        self.head = UnetOutBlock(2, self.num_features, num_classes) if num_classes else nn.Identity()
        self.head.apply(DynUNet.initialize_weights)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(x))


default_cfgs = generate_default_cfgs({UNET_ARCHITECTURE: {
    "url": "", "num_classes": 2, "input_size": (3, UNET_IMG_SIZE, UNET_IMG_SIZE), "fixed_input_size": True,
    "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "first_conv": "layers.downsample.conv1.conv", "classifier": "head"}})


@register_model
def dex_unet2d(pretrained: bool = False, img_size: int = UNET_IMG_SIZE, in_chans: int = 3, **kwargs: Any) -> UNet2D:
    """nnU-Net's 2D U-Net for inputs of ``img_size`` px (:class:`UNet2D`), its ``pretrained_cfg`` recording that
    input size; no pretrained weights exist."""
    if pretrained:
        raise ValueError(f"{UNET_ARCHITECTURE} has no pretrained weights: a peer trains from scratch")
    overlay = {**(kwargs.pop("pretrained_cfg_overlay", None) or {}), "input_size": (in_chans, img_size, img_size)}
    return build_model_with_cfg(UNet2D, UNET_ARCHITECTURE, pretrained, pretrained_cfg_overlay=overlay,
                                img_size=img_size, in_chans=in_chans, **kwargs)


def peer_architecture(model: str, img_size: int | None = None,
                      model_args: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The timm architecture and arguments (``num_classes`` left out) of the peer ``model``: ``dex_unet2d`` at
    ``img_size`` (default 128) for ``unet``, else ``model`` with ``img_size`` (timm's default input size when None)
    as its ``pretrained_cfg``'s input size; ``model_args`` (e.g. the U-Net's ``features``) added."""
    if model == UNET:
        return UNET_ARCHITECTURE, {**(model_args or {}), "img_size": img_size or UNET_IMG_SIZE}
    overlay = {"pretrained_cfg_overlay": {"input_size": [3, img_size, img_size]}} if img_size else {}
    return model, {**(model_args or {}), **overlay}


def create_peer(model: str, img_size: int | None = None, model_args: dict[str, Any] | None = None) -> nn.Module:
    """The peer ``model`` (see :func:`peer_architecture`) without weights or classifier (``num_classes`` 0).

    Raises ``RuntimeError`` for a name timm does not know (``Unknown model``), ``TypeError`` for arguments it does
    not take, ``ValueError`` for a transformer (a model with a patch embedding: a ViT or a Swin is an encoder of
    source ``scratch``)."""
    architecture, args = peer_architecture(model, img_size, model_args)
    network = timm.create_model(architecture, pretrained=False, **{**args, "num_classes": 0})
    if hasattr(network, "patch_embed"):
        raise ValueError(f"{model!r} is a transformer (it has a patch embedding), not a peer: a peer is {UNET!r} or "
                         "a timm CNN (resnet18, convnext_atto, ...); a ViT or Swin from scratch is source 'scratch'")
    return network
