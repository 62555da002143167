"""Throughput of the data pipeline on this machine: phantom generation and curation, in images per second and
per second per core, for a given image size and number of worker processes.

    python benchmarks/data_throughput.py --size 64 --per-modality 200 --workers 2 [--json out.json]

Images are the 2D images the curation writes (slices, pictures, sampled video frames). Generation counts what it
writes (volume slices included); curation counts its input images (written + dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from dex.data.curation import CurateOptions, curate
from dex.data.phantoms import make_phantoms
from dex.data.recipe import Recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--per-modality", type=int, default=200)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw, curated = Path(tmp) / "raw", Path(tmp) / "curated"
        start = time.perf_counter()
        make_phantoms(raw, per_modality=args.per_modality, size=args.size, task_images=5, workers=args.workers)
        generate_s = time.perf_counter() - start
        generated = sum(s.reported_count for s in Recipe.load(raw / "recipe.yaml").sources)
        start = time.perf_counter()
        summary = curate(raw / "recipe.yaml", curated, workers=args.workers,
                         options=CurateOptions(min_size=min(32, args.size // 2)), progress=False)
        curate_s = time.perf_counter() - start
    inputs = summary.written + sum(summary.dropped.values())
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "size": args.size, "workers": args.workers,
        "generate": {"images": generated, "seconds": round(generate_s, 2),
                     "images_per_s": round(generated / generate_s, 1),
                     "images_per_s_per_core": round(generated / generate_s / args.workers, 1)},
        "curate": {"images": inputs, "written": summary.written, "seconds": round(curate_s, 2),
                   "images_per_s": round(inputs / curate_s, 1),
                   "images_per_s_per_core": round(inputs / curate_s / args.workers, 1)},
    }
    print("| stage | size | workers | images | seconds | images/s | images/s/core |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for stage in ("generate", "curate"):
        r = result[stage]
        print(f"| {stage} | {args.size} | {args.workers} | {r['images']} | {r['seconds']} | {r['images_per_s']} | "
              f"{r['images_per_s_per_core']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
