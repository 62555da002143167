"""DEXViT: a Vision Transformer whose MLP in every block is a DEX module (Sec. 3.4, Fig. 3-a).

Registered in timm (``import dex`` first)::

    model = timm.create_model("dex_vit_base_patch16_256", num_experts=8, top_k=2)

The block is ``x + attn(norm1(x))`` then ``x + DEX(norm2(x))``; the director path of a trained model is a
plain timm ViT (see :func:`dex.models.weights.export_director`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal

import torch
from timm.layers import Attention, DropPath, Mlp, PatchEmbed, resample_abs_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from dex.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from dex.models.conversions import vit_to_dex_state_dict
from dex.models.director_experts import (
    MODES,
    DEXAux,
    DEXSettings,
    DirectorExperts,
    ExpertBank,
    Mode,
    Routing,
    per_block,
)
from dex.models.pos_embed import sincos_2d

layer_norm = partial(nn.LayerNorm, eps=1e-6)


class DEXBlock(nn.Module):
    """Pre-norm self-attention followed by a pre-norm DEX module with the settings ``dex`` (one R and one K), or by a
    plain MLP when ``dex`` is None (the block is then a timm ViT block, as the plain-MAE baseline needs).

    ``forward(x [B, N, C], noise_std, eps) -> (x [B, N, C], DEXAux)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        dex: DEXSettings | None = None,
        num_prefix_tokens: int = 1,
        mode: Mode = "pretrain",
    ) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = layer_norm(dim)
        hidden = int(dim * mlp_ratio)
        if dex is None:
            self.mlp, self.dex = Mlp(dim, hidden, act_layer=nn.GELU), None
        else:
            self.dex = DirectorExperts(dim, hidden, dex, num_prefix_tokens, mode)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, noise_std: float = 0.0, eps: Tensor | None = None) -> tuple[Tensor, DEXAux]:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        if self.dex is None:
            return x + self.drop_path2(self.mlp(self.norm2(x))), DEXAux(None, None, None)
        out, aux = self.dex(self.norm2(x), noise_std, eps)
        return x + self.drop_path2(out), aux


def _image_size(size: int | Sequence[int], patch_size: int) -> tuple[int, int]:
    """``size`` (int or (H, W)) as (H, W), checked to be divisible by ``patch_size``."""
    height, width = (size, size) if isinstance(size, int) else size
    if height % patch_size or width % patch_size:
        raise ValueError(f"img_size {(int(height), int(width))} is not divisible by patch_size {patch_size}")
    return int(height), int(width)


class DEXViT(nn.Module):
    """The DEX encoder: patch embedding, fixed 2D sin-cos positions, class token, L DEX blocks, final norm.

    Args:
        img_size: input size (int or (H, W)); must be divisible by ``patch_size``.
        dex: the DEX modules' settings (:class:`~dex.models.director_experts.DEXSettings`: R and K, one value for
            all blocks or one per block, R = 0 making a block a plain ViT block; activation, pooling, router
            temperature, balance and alignment forms, usage momentum, expert initialisation), or the same as a
            mapping (the ``dex`` block of a model folder's ``config.json``); None: the defaults.
        **dex_overrides: fields of :class:`DEXSettings` given one by one (``num_experts=4, top_k=1``, as
            ``timm.create_model`` passes them), replacing those of ``dex``.
        mode: ``pretrain``, ``experts`` or ``director`` (see :class:`DirectorExperts`).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 256,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        global_pool: Literal["token", "avg"] = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        dex: DEXSettings | Mapping[str, Any] | None = None,
        mode: Mode = "pretrain",
        **dex_overrides: Any,
    ) -> None:
        super().__init__()
        img_size = _image_size(img_size, patch_size)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        settings = DEXSettings.resolve(dex, **dex_overrides)
        experts, top_ks = settings.per_layer(depth)
        self._init_args = dict(
            img_size=list(img_size), patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, drop_path_rate=drop_path_rate, mode=mode,
        )
        self._settings = dataclasses.replace(settings, num_experts=tuple(experts), top_k=tuple(top_ks))
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_size = patch_size

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            sincos_2d(embed_dim, self.patch_embed.grid_size).unsqueeze(0), requires_grad=False
        )
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth, linear
        self.blocks = nn.ModuleList(
            DEXBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], settings.layer(i, depth),
                     self.num_prefix_tokens, mode)
            for i in range(depth)
        )
        self.norm = layer_norm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.last_routing: list[Routing | None] = []
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation: xavier-uniform linears (patch projection as a linear), N(0, 0.02) class token."""
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)
        for module in self.dex_modules():
            module.experts.reset_parameters()
            if module.expert_init == "copy":
                module.experts.copy_from_mlp_(module.director)

    @property
    def dex_settings(self) -> DEXSettings:
        """The DEX settings of the model as it is now: R and K per block (K changed by :meth:`set_mode` included)."""
        top_ks = tuple(b.dex.top_k if b.dex is not None else 0 for b in self.blocks)
        return dataclasses.replace(self._settings, top_k=top_ks)

    @property
    def model_args(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this model as it is now (current mode and K included), the DEX
        settings as one ``dex`` block."""
        return {**self._init_args, "mode": self.mode, "dex": self.dex_settings.to_dict()}

    def set_input_size(self, img_size: int | Sequence[int]) -> None:
        """Bring the model to inputs of ``img_size`` (int or (H, W), divisible by the patch size), in place, as
        timm's ``VisionTransformer.set_input_size`` does: the patch embedding's image size and grid, and the position
        table ``pos_embed`` [1, 1 + H/p * W/p, C] for the new grid; every other weight is kept, and
        :attr:`model_args` rebuild the model at the new size.

        The table is fixed (never trained). When it is the 2D sin-cos table of the current grid (as the constructor
        builds it and MAE checkpoints hold it), it becomes the sin-cos table of the new grid, the one
        ``DEXViT(img_size=...)`` builds: the function the encoder was pretrained with, exact at every position of the new grid, where a
        bicubic resampling of it only approximates its high-frequency channels. Any other table (learned positions
        copied from a plain ViT checkpoint by :func:`~dex.models.conversions.vit_to_dex_state_dict`) is resampled
        bicubically to the new grid, the class token's entry kept (timm's ``resample_abs_pos_embed``, as timm's ViTs
        and MAE's ``interpolate_pos_embed`` do).
        """
        size = _image_size(img_size, self.patch_size)
        old_grid = tuple(self.patch_embed.grid_size)
        self.patch_embed.set_input_size(img_size=size)
        new_grid = tuple(self.patch_embed.grid_size)
        table = self.pos_embed.detach()
        if torch.allclose(table[0], sincos_2d(self.embed_dim, old_grid).to(table), rtol=0, atol=1e-6):
            resized = sincos_2d(self.embed_dim, new_grid).unsqueeze(0).to(table)
        else:
            resized = resample_abs_pos_embed(table, list(new_grid), list(old_grid),
                                             num_prefix_tokens=self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(resized, requires_grad=self.pos_embed.requires_grad)
        self._init_args["img_size"] = list(size)

    def dex_modules(self) -> list[DirectorExperts]:
        return [block.dex for block in self.blocks if block.dex is not None]

    @property
    def mode(self) -> Mode:
        modules = self.dex_modules()
        return modules[0].mode if modules else self._init_args["mode"]

    def set_mode(self, mode: Mode, top_k: int | Sequence[int] | None = None) -> None:
        """Switch every DEX module to ``mode`` (``pretrain``, ``experts``, ``director``), optionally with new K."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        top_ks = [None] * len(self.blocks) if top_k is None else per_block(top_k, len(self.blocks), "top_k")
        for block, k in zip(self.blocks, top_ks, strict=True):
            if block.dex is not None:
                block.dex.set_mode(mode, k)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The parameters that take no weight decay besides timm's 1-D rule (biases, norms): the position
        embedding, the class token and the experts' stacked biases ([R, hidden] and [R, C], which that rule
        misses)."""
        expert_biases = {f"{name}.{bias}" for name, module in self.named_modules() if isinstance(module, ExpertBank)
                         for bias in ("fc1_bias", "fc2_bias")}
        return {"pos_embed", "cls_token", *expert_biases}

    # timm's grouping of a VisionTransformer's parameters (the layer ids of timm.optim's layer-wise lr decay) fits
    # the same names here: embeddings (class token, positions, patch embedding) 0, block i (its DEX router, experts
    # and director included) i + 1, the final norm with the last block, the head (unmatched) after it.
    group_matcher = VisionTransformer.group_matcher

    def draw_router_eps(self, generator: torch.Generator, global_batch: int, rows: slice,
                        tokens: int) -> list[Tensor | None]:
        """The standard normal draws of every router's noise (Eq. 21) for a global batch of sequences of
        ``tokens`` tokens (class token included), cut to ``rows`` (this rank's images): per block [b, R]
        image-wise or [b * tokens, R] token-wise, None for plain blocks (the ``router_eps`` of
        :meth:`forward_tokens`)."""
        router_eps: list[Tensor | None] = []
        for block in self.blocks:
            if block.dex is None:
                router_eps.append(None)
                continue
            per_image = tokens if block.dex.router.activation == "token" else 1
            eps = torch.randn(global_batch * per_image, block.dex.num_experts, generator=generator)
            router_eps.append(eps[rows.start * per_image: rows.stop * per_image])
        return router_eps

    def embed(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] images -> [B, N, C] patch tokens with their positional embedding (no class token)."""
        return self.patch_embed(x) + self.pos_embed[:, self.num_prefix_tokens :]

    def _prepend_class_token(self, tokens: Tensor) -> Tensor:
        cls = self.cls_token + self.pos_embed[:, : self.num_prefix_tokens]
        return torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def forward_tokens(self, tokens: Tensor, noise_std: float = 0.0,
                       router_eps: Sequence[Tensor | None] | None = None) -> tuple[Tensor, list[DEXAux]]:
        """Prepend the class token, run the blocks and the final norm.

        Args:
            tokens: [B, M, C] embedded patch tokens (M = N, or the visible subset under MAE masking).
            noise_std: sigma of the routers' frequency-aware noise (training only).
            router_eps: per block, the standard normal draws of its router noise ([B, R] image-wise,
                [B * (1 + M), R] token-wise), or None to draw them inside.

        Returns:
            [B, 1 + M, C] features and one :class:`DEXAux` per block; the routing is kept in ``last_routing``.
        """
        final, aux, _ = self.forward_taps(tokens, (), noise_std, router_eps)
        return final, aux

    def forward_taps(self, tokens: Tensor, taps: Sequence[int], noise_std: float = 0.0,
                     router_eps: Sequence[Tensor | None] | None = None,
                     ) -> tuple[Tensor, list[DEXAux], list[Tensor]]:
        """:meth:`forward_tokens`, also keeping the raw outputs of the blocks ``taps`` (0-based, ascending).

        Returns:
            [B, 1 + M, C] final normalised features, one :class:`DEXAux` per block, and [B, 1 + M, C] per tap.
        """
        x = self._prepend_class_token(tokens)
        aux, tapped = [], []
        for i, block in enumerate(self.blocks):
            x, block_aux = block(x, noise_std, None if router_eps is None else router_eps[i])
            aux.append(block_aux)
            if i in taps:
                tapped.append(x)
        self.last_routing = [a.routing for a in aux]
        return self.norm(x), aux, tapped

    def forward_features(self, x: Tensor, noise_std: float = 0.0) -> Tensor:
        """[B, C_in, H, W] -> [B, 1 + N, C] normalised tokens."""
        return self.forward_tokens(self.embed(x), noise_std)[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, noise_std: float = 0.0) -> Tensor:
        return self.forward_head(self.forward_features(x, noise_std))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self._init_args.update(num_classes=num_classes, global_pool=self.global_pool)  # model_args rebuild the head
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The outputs of chosen blocks (0-based ``indices``; an int n means the last n blocks), e.g.
        ``[2, 5, 8, 11]`` for the blocks 3, 6, 9, 12 that UNETR takes from ViT-B.

        Returns patch tokens only: [B, C, H/p, W/p] (NCHW) or [B, N, C] (NLC); with ``intermediates_only=False``
        also the final normalised features [B, 1 + N, C].
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        depth = len(self.blocks)
        if indices is None:
            indices = range(depth)
        elif isinstance(indices, int):
            indices = range(depth - indices, depth)
        wanted = sorted({i % depth for i in indices})
        height, width = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        final, _, tapped = self.forward_taps(self.embed(x), wanted)
        intermediates = []
        for h in tapped:
            out = (self.norm(h) if norm else h)[:, self.num_prefix_tokens :]
            if output_fmt == "NCHW":
                out = out.transpose(1, 2).reshape(out.shape[0], -1, height, width)
            intermediates.append(out)
        return intermediates if intermediates_only else (final, intermediates)


def init_linear_and_norm(module: nn.Module) -> None:
    """MAE's per-module init: xavier-uniform linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 256, 256),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",  # what dex.data.preprocess.Preprocessing does (with antialias)
        "fixed_input_size": True,
        "mean": IMAGENET_MEAN,  # the default dex.data.preprocess.Preprocessing
        "std": IMAGENET_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "dex_vit_tiny_patch16_256": _cfg(),
        "dex_vit_small_patch16_256": _cfg(),
        "dex_vit_base_patch16_256": _cfg(),
        "dex_vit_large_patch16_256": _cfg(),
    }
)

# Width, depth and heads of the standard ViT sizes, shared with the timm names the director exports to.
VIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def _create_dex_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> DEXViT:
    return build_model_with_cfg(
        DEXViT, variant, pretrained, pretrained_filter_fn=vit_to_dex_state_dict, **kwargs
    )


def _size_args(size: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"patch_size": 16, "img_size": 256, **VIT_SIZES[size], **kwargs}


@register_model
def dex_vit_tiny_patch16_256(pretrained: bool = False, **kwargs: Any) -> DEXViT:
    """DEX-Ti: ViT-Ti/16 (192 wide, 12 blocks, 3 heads) at 256 px, R=8, K=2 in every block."""
    return _create_dex_vit("dex_vit_tiny_patch16_256", pretrained, **_size_args("tiny", kwargs))


@register_model
def dex_vit_small_patch16_256(pretrained: bool = False, **kwargs: Any) -> DEXViT:
    """DEX-S: ViT-S/16 (384 wide, 12 blocks, 6 heads) at 256 px, R=8, K=2 in every block."""
    return _create_dex_vit("dex_vit_small_patch16_256", pretrained, **_size_args("small", kwargs))


@register_model
def dex_vit_base_patch16_256(pretrained: bool = False, **kwargs: Any) -> DEXViT:
    """DEX-B, the paper's model: ViT-B/16 (768 wide, 12 blocks, 12 heads) at 256 px, R=8, K=2."""
    return _create_dex_vit("dex_vit_base_patch16_256", pretrained, **_size_args("base", kwargs))


@register_model
def dex_vit_large_patch16_256(pretrained: bool = False, **kwargs: Any) -> DEXViT:
    """DEX-L: ViT-L/16 (1024 wide, 24 blocks, 16 heads) at 256 px, R=8, K=2 in every block."""
    return _create_dex_vit("dex_vit_large_patch16_256", pretrained, **_size_args("large", kwargs))
