"""Time of the frozen protocols of one encoder on a 2,000-image classification task: the feature pass (every split,
no cache) against all the fits on its features (the linear probe's sweep, kNN for each k, every few-shot draw), in
the same run. Target: the fits together under 20% of the feature pass on CPU.

The task: ``--images`` grey 8-bit PNGs of ``--image-size`` px in 4 classes (a bright disc in one of four quadrants,
with noise), split 60 / 20 / 20; the encoder: a DEX ViT (``--model``) at ``--size`` px with random weights (speed
does not depend on them), saved as an encoder folder.

    python benchmarks/probe_throughput.py [--images 2000] [--model tiny] [--size 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dex
from dex.data.tasks import TaskSpec, finish_task, load_task
from dex.downstream.encoders import EncoderSpec
from dex.eval.protocols import ProbeConfig, protocol_variants, run_frozen
from dex.models import DEXViT

WIDTHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]


def _task(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    y, x = np.mgrid[:size, :size]
    ids, labels = [], {}
    for i in range(count):
        label = i % 4
        cy, cx = (size / 4 if label < 2 else 3 * size / 4), (size / 4 if label % 2 == 0 else 3 * size / 4)
        disc = ((y - cy) ** 2 + (x - cx) ** 2 < (size / 8) ** 2) * 120.0
        pixels = np.clip(60 + disc + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)
        ids.append(f"image-{i:05d}")
        labels[ids[-1]] = CLASSES[label]
        Image.fromarray(pixels).save(folder / "images" / f"{ids[-1]}.png")
    finish_task(folder, TaskSpec(name="quadrants", type="classification", modality="X-ray", classes=CLASSES,
                                 image_size=[size, size], channels=1), ids, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--model", choices=sorted(WIDTHS), default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    probe = ProbeConfig()
    variants = ["linear", *protocol_variants("knn", probe), *protocol_variants("fewshot", probe)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _task(tmp / "task", args.images, args.image_size)
        width, heads = WIDTHS[args.model]
        torch.manual_seed(0)
        dex.save_pretrained(DEXViT(img_size=args.size, embed_dim=width, depth=12, num_heads=heads), tmp / "encoder")
        records = run_frozen(EncoderSpec("dex", str(tmp / "encoder")), load_task(tmp / "task"), 0, variants, probe,
                             tmp / "cache")
        features = records["linear"]["feature_seconds"]
        fits = {name: round(r["fit_seconds"], 3) for name, r in records.items()}
        total = sum(r["fit_seconds"] for r in records.values())
        start = time.perf_counter()
        cached = run_frozen(EncoderSpec("dex", str(tmp / "encoder")), load_task(tmp / "task"), 0, variants, probe,
                            tmp / "cache")
        second = time.perf_counter() - start
    report = {"model": args.model, "size": args.size, "images": args.images, "feature_seconds": round(features, 2),
              "fit_seconds": fits, "fits_total_seconds": round(total, 2), "ratio": round(total / features, 3),
              "second_run_seconds": round(second, 2),
              "second_run_cached": all(r["features_cached"] for r in cached.values()),
              "scores": {name: round(r["test"]["f1_macro"], 4) for name, r in records.items()},
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
