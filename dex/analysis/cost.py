"""Computation of image-wise vs token-wise expert activation (the paper's Fig. 8): FLOPs counted by PyTorch's
FLOP counter on the meta device (no memory, no compute), extra over a plain ViT of the same size; and, where a GPU is
present, the measured forward time of each (bf16 autocast)."""

from __future__ import annotations

import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import dex  # noqa: F401  (registers the models)


def forward_flops(model_name: str, img_size: int, batch: int, **model_args) -> tuple[int, int]:
    """Forward FLOPs of an encoder's ``forward_features`` on [batch, 3, img_size, img_size]: the total, and the part
    spent in the expert routers (modules named ``router``; 0 for a plain ViT)."""
    with torch.device("meta"):
        model = timm.create_model(model_name, img_size=img_size, **model_args).eval()
        with FlopCounterMode(display=False) as counter:
            model.forward_features(torch.empty(batch, 3, img_size, img_size))
    routing = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                  if name.rsplit(".", 1)[-1] == "router")
    return counter.get_total_flops(), routing


@torch.no_grad()
def forward_time(model_name: str, img_size: int, batch: int, device: str = "cuda", repeats: int = 10,
                 **model_args) -> float:
    """Median seconds of one bf16-autocast ``forward_features`` on ``device`` (after 3 warm-up calls); CUDA events
    on a GPU, the wall clock elsewhere."""
    device = torch.device(device)
    model = timm.create_model(model_name, img_size=img_size, **model_args).to(device).eval()
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    times = []
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        for step in range(repeats + 3):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model.forward_features(images)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                began = time.perf_counter()
                model.forward_features(images)
                seconds = time.perf_counter() - began
            if step >= 3:
                times.append(seconds)
    return sorted(times)[len(times) // 2]


def parameters(model_name: str, **model_args) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(model_name, **model_args).parameters())


def activation_cost(model_name: str = "dex_vit_base_patch16_256", sizes=(128, 256, 512, 1024), batches=(1, 8, 32, 128),
                    num_experts: int = 8, top_k: int = 2, fixed_size: int = 256, fixed_batch: int = 1,
                    measure: bool | None = None, device: str = "cuda") -> dict:
    """Extra forward FLOPs of DEX (experts mode, K of R) over the plain ViT, image-wise and token-wise, as the image
    size grows (batch ``fixed_batch``) and as the batch grows (size ``fixed_size``), with the part of each spent in
    the routers (``image_routing``, ``token_routing``); and the parameter overhead.
    With ``measure`` (default: when CUDA is available) each row also holds the forward seconds measured on
    ``device`` (``vit_s``, ``image_s``, ``token_s``)."""
    dex_args = dict(num_experts=num_experts, top_k=top_k, mode="experts")
    variants = {"vit": dict(num_experts=0), "image": dict(activation="image", **dex_args),
                "token": dict(activation="token", **dex_args)}
    measure = torch.cuda.is_available() if measure is None else measure

    def row(size: int, batch: int) -> dict:
        flops = {name: forward_flops(model_name, size, batch, **args) for name, args in variants.items()}
        out = {"img_size": size, "batch": batch, "vit": flops["vit"][0]}
        for mode in ("image", "token"):
            out[f"{mode}_extra"] = flops[mode][0] - flops["vit"][0]
            out[f"{mode}_routing"] = flops[mode][1]
        if measure:
            out.update({f"{name}_s": forward_time(model_name, size, batch, device, **args)
                        for name, args in variants.items()})
        return out

    return {
        "model": model_name, "num_experts": num_experts, "top_k": top_k,
        "by_size": [row(size, fixed_batch) for size in sizes],
        "by_batch": [row(fixed_size, batch) for batch in batches],
        "parameters": {"vit": parameters(model_name, num_experts=0), "dex": parameters(model_name, **dex_args)},
    }
