"""Parameters and forward multiply-adds of MedMoE's image side with one expert active (what runs: only the
routed expert) against all experts computed (a dense mixture), counted by PyTorch's FLOP counter on the meta device
(no memory, no compute, so the paper's scale counts on any machine). The image side is the backbone, its pyramid (a ViT's neck),
the experts, the image router and the global image projection; the text encoder is left out (at inference an image
routes itself).

    python benchmarks/medmoe_cost.py                       # the paper's Swin-T at 224 px and the CPU demo config
    python benchmarks/medmoe_cost.py --json OUT/medmoe_cost.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dex.models import create_model
from dex.models.medmoe import FeaturePyramid, ImageRouter, ScaleExpert
from dex.train.objectives import load_pretrain_config

CONFIGS = {  # name: (config, overrides)
    "Swin-T, 224 px, K = 4 (paper's scale)": ("configs/pretrain_medmoe_swin_t.yaml", []),
    "CPU demo: small Swin, 64 px, K = 7": ("configs/pretrain_medmoe_tiny_cpu.yaml", ["num_experts=7"]),
}


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cost(path: str, overrides: list[str], batch: int = 1) -> dict:
    """Parameters and GMACs per image (multiply-adds: what the Swin and MedMoE papers call FLOPs; PyTorch's counter
    counts 2 FLOPs per multiply-add) of the image side, one expert and all experts."""
    config = load_pretrain_config(path, overrides)
    experts = config.num_experts or len(config.report_types)
    with torch.device("meta"):
        encoder = create_model(config.model, **{"num_classes": 0, **config.model_args})
        pyramid = FeaturePyramid(encoder)
        bank = [ScaleExpert(pyramid.channels, config.embed_dim, config.local_stride) for _ in range(experts)]
        router = ImageRouter(encoder.num_features, experts, config.router_hidden)
        projection = torch.nn.Linear(encoder.num_features, config.embed_dim)
        size = encoder.patch_embed.img_size
        images = torch.empty(batch, 3, *size)
        with FlopCounterMode(display=False) as shared:
            maps, pooled = pyramid(images)
            router(pooled)
            projection(pooled)
        with FlopCounterMode(display=False) as one:
            bank[0](maps)
    shared_params = _parameters(pyramid) + _parameters(router) + _parameters(projection)
    one_params = _parameters(bank[0])
    return {"experts": experts, "img_size": list(size), "backbone_params": _parameters(encoder),
            "params_one_expert": shared_params + one_params, "params_all_experts": shared_params + experts * one_params,
            "gmacs_one_expert": (shared.get_total_flops() + one.get_total_flops()) / 2 / batch / 1e9,
            "gmacs_all_experts": (shared.get_total_flops() + experts * one.get_total_flops()) / 2 / batch / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {name: cost(path, overrides) for name, (path, overrides) in CONFIGS.items()}
    print("| image side | K | parameters, 1 expert / all | GMACs per image, 1 expert / all |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in results.items():
        params = f"{r['params_one_expert'] / 1e6:.1f} M / {r['params_all_experts'] / 1e6:.1f} M"
        print(f"| {name} | {r['experts']} | {params} | {r['gmacs_one_expert']:.2f} / {r['gmacs_all_experts']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
