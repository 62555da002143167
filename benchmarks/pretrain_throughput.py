"""Pretraining throughput: DEX's fast path against the straightforward path and the plain MAE, in one run.

A training step is forward, backward, AdamW step and director update on one batch (MAE mask 0.75, R = 8, K = 2).
Variants:
- ``mae``: the plain MAE ViT (every block a timm-style MLP block);
- ``dex-image`` / ``dex-token``: DEX with image-wise / token-wise routing, on the fast path (grouped expert products,
  stacked group EMA, fused AdamW) and on the straightforward path (the reference code's per-expert gather and
  scatter, its stack-then-sum director update, per-tensor AdamW);
each with and without ``torch.compile``. Reported: images/s (median over timed steps after warm-up), GFLOP per image
and TFLOP/s (PyTorch's FLOP counter over forward and backward), peak memory (CUDA only). Then inference
throughput of the encoder alone: DEX through the experts (K = 2), through the director, and the plain ViT.

    python benchmarks/pretrain_throughput.py --device cuda --model base        # ViT-B, 256 px, batch 128, bf16
    python benchmarks/pretrain_throughput.py --device cpu --model tiny         # small enough for a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import dex  # noqa: F401  (registers the models)
from dex.models import DirectorExperts, MaskedAutoencoderDEX, update_directors_

SIZES = {  # model, image size, batch, warm-up steps, timed steps
    "tiny": ("dex_vit_tiny_patch16_256", 128, 16, 2, 5),
    "base": ("dex_vit_base_patch16_256", 256, 128, 5, 20),
}


@torch.no_grad()
def reference_group_ema_(model: torch.nn.Module, momentum: float) -> None:
    """The reference code's director update: per director tensor, stack the R experts' copies, weight, sum and
    assign a new tensor (``.data =``)."""
    for module in model.modules():
        if not isinstance(module, DirectorExperts):
            continue
        usage = module.router.usage_sum
        omega = usage / usage.sum().clamp_min(1e-6)
        for eta, theta in zip(module.director.parameters(), module.experts.tensors()):
            stacked = torch.stack([theta[r].clone() for r in range(theta.shape[0])])
            average = (omega.view(-1, *[1] * eta.dim()).to(stacked.dtype) * stacked).sum(0)
            eta.data = momentum * eta.data + (1 - momentum) * average
        usage.zero_()


def build(variant: str, path: str, model_name: str, img_size: int, device: torch.device, compiled: bool):
    args = {"img_size": img_size}
    if variant == "mae":
        args["num_experts"] = 0
    else:
        args.update(num_experts=8, top_k=2, activation="token" if variant == "dex-token" else "image")
    torch.manual_seed(0)
    mae = MaskedAutoencoderDEX(timm.create_model(model_name, **args)).to(device).train()
    for module in mae.modules():
        if isinstance(module, DirectorExperts):
            module.experts.dispatch = "loop" if path == "straightforward" else "grouped"
    params = [p for p in mae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=path == "fast")
    forward = torch.compile(mae) if compiled else mae
    director_update = reference_group_ema_ if path == "straightforward" else update_directors_
    return mae, forward, optimizer, director_update


def median_step_seconds(step, warmup: int, steps: int, device: torch.device) -> float:
    """Run ``step(i)`` for ``warmup`` untimed then ``steps`` timed indices; the median seconds of a timed step
    (the device synchronised around each)."""
    for i in range(warmup):
        step(i)
    times = []
    for i in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step(warmup + i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(variant, path, compiled, args, device) -> dict:
    model_name, img_size, batch, warmup, steps = SIZES[args.model]
    batch = args.batch or batch
    mae, forward, optimizer, director_update = build(variant, path, model_name, img_size, device, compiled)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(index: int, count_flops: bool = False) -> float:
        noise = mae.draw_noise(torch.Generator().manual_seed(index), batch, slice(0, batch))
        counter = FlopCounterMode(display=False) if count_flops else None
        with counter if counter else nullcontext(), torch.autocast(**autocast):
            out = forward(images, noise_std=0.5, **noise)
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        director_update(mae, 0.99)
        return counter.get_total_flops() if counter else 0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    median = median_step_seconds(step, warmup, steps, device)
    flops = step(0, count_flops=True) if not compiled else None  # counted eagerly, once per model
    return {
        "variant": variant, "path": path, "compile": compiled, "images_per_s": batch / median,
        "step_ms": 1000 * median, "gflop_per_image": flops / batch / 1e9 if flops else None,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "flops_per_step": flops,
    }


@torch.no_grad()
def inference(args, device) -> list[dict]:
    model_name, img_size, batch, warmup, steps = SIZES[args.model]
    batch = args.batch or batch
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    rows = []
    for name, mode, experts in (("DEX-E (K=2)", "experts", 8), ("DEX-D", "director", 8), ("ViT", "director", 0)):
        encoder = timm.create_model(model_name, img_size=img_size, num_experts=experts, top_k=2).to(device).eval()
        encoder.set_mode(mode)
        autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        times = []
        for i in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.autocast(**autocast):
                encoder.forward_features(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        rows.append({"encoder": name, "images_per_s": batch / statistics.median(times)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(SIZES), default="base")
    parser.add_argument("--batch", type=int, help="override the size's batch")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    runs = [("mae", "fast"), ("dex-image", "fast"), ("dex-image", "straightforward"), ("dex-token", "fast"),
            ("dex-token", "straightforward")]
    results = []
    for compiled in ([False] if args.no_compile else [False, True]):
        for variant, path in runs:
            if compiled and path == "straightforward":
                continue  # the reference path's host synchronisations break the graph anyway
            results.append(measure(variant, path, compiled, args, device))
    flops = {(r["variant"], r["path"]): r["flops_per_step"] for r in results if r["flops_per_step"]}
    for r in results:
        count = flops.get((r["variant"], r["path"]))
        r["tflop_per_s"] = count * r["images_per_s"] / (args.batch or SIZES[args.model][2]) / 1e12 if count else None
        r["gflop_per_image"] = count / (args.batch or SIZES[args.model][2]) / 1e9 if count else None
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    print(f"{machine}, torch {torch.__version__}, model {args.model}, {SIZES[args.model][1]} px, "
          f"batch {args.batch or SIZES[args.model][2]}, {'bf16 autocast' if device.type == 'cuda' else 'float32'}")
    print("| model | path | compile | images/s | step ms | GFLOP/image | TFLOP/s | peak GiB |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"| {r['variant']} | {r['path']} | {'yes' if r['compile'] else 'no'} | {r['images_per_s']:.1f} | "
              f"{r['step_ms']:.1f} | {fmt(r['gflop_per_image'], '.2f')} | {fmt(r['tflop_per_s'], '.3f')} | "
              f"{fmt(r['peak_gib'], '.1f')} |")
    encoders = inference(args, device)
    print("\n| encoder (inference) | images/s |\n| --- | ---: |")
    for row in encoders:
        print(f"| {row['encoder']} | {row['images_per_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "torch": torch.__version__, "args": vars(args),
                                               "train": results, "inference": encoders}, indent=1) + "\n")


if __name__ == "__main__":
    main()
