"""Pretraining step throughput of the methods on one backbone, through the objective interface the loop uses.

A step is what ``dex pretrain`` does for one batch: the objective's forward (all its views, its teacher), backward,
fused AdamW, and the objective's hooks (director update, EMA teacher). Images arrive as the objective's transform
makes them (one view for MAE, V views for M-IDoL), already in memory: data loading is not timed. Reported:
images/s (median over timed steps after warm-up) and the ratio to the first config's (MAE on the same backbone),
measured in the same run.

    python benchmarks/objective_throughput.py --device cpu           # ViT-Ti at 64 px, batch 64 (the CPU configs)
    python benchmarks/objective_throughput.py --device cuda --set model_args.img_size=224 batch_size=256
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from pretrain_throughput import median_step_seconds

from dex.train.objectives import build_objective, load_pretrain_config
from dex.train.pretrain import make_optimizer

CONFIGS = {  # name: (config, overrides)
    "MAE-Ti": ("configs/pretrain_mae_tiny_cpu.yaml", []),
    "DEX-Ti (MAE-DEX)": ("configs/pretrain_dex_tiny_cpu.yaml", []),
    "M-IDoL, ViT-Ti": ("configs/pretrain_midol_tiny_cpu.yaml", []),
    "M-IDoL, DEX-Ti": ("configs/pretrain_midol_tiny_cpu.yaml", ["model_args.num_experts=8", "model_args.top_k=2"]),
}


def measure(name: str, path: str, overrides: list[str], device: torch.device, warmup: int, steps: int) -> dict:
    config = load_pretrain_config(path, [*overrides, "device=" + device.type])
    torch.manual_seed(0)
    objective = build_objective(config).to(device).train()
    optimizer = make_optimizer(objective, config)
    hooks = objective.hooks()
    transform = objective.transform()
    size = transform(torch.rand(1, 8, 8)).shape[-1]
    batch = config.batch_size
    images = torch.stack([transform(torch.rand(1, size, size)) for _ in range(batch)]).to(device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(index: int) -> None:
        schedule = objective.schedule(index, 1000)
        inputs = objective.step_inputs(torch.Generator().manual_seed(index), batch, slice(0, batch))
        with torch.autocast(**autocast):
            out = objective({"image": images}, schedule, inputs)
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for hook in hooks:
            hook.after_step(schedule)

    median = median_step_seconds(step, warmup, steps, device)
    return {"method": name, "config": path, "overrides": overrides, "batch": batch, "img_size": size,
            "views": int(images.shape[1]) if images.dim() == 5 else 1, "images_per_s": batch / median,
            "step_s": median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every config")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = [measure(name, path, [*overrides, *args.set], device, args.warmup, args.steps)
               for name, (path, overrides) in CONFIGS.items()]
    baseline = results[0]["images_per_s"]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    print(f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {results[0]['batch']}, "
          f"{results[0]['img_size']} px")
    print("| method | views | images/s | step s | vs MAE |\n| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        r["vs_first"] = r["images_per_s"] / baseline
        print(f"| {r['method']} | {r['views']} | {r['images_per_s']:.1f} | {r['step_s']:.3f} | {r['vs_first']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "torch": torch.__version__, "args": vars(args),
                                               "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
