"""What ``dex submit`` costs and gives on one machine (issue 32), with submitit's local executor, in one run:

- **Curation scaling**: the recipe curated by ``dex curate`` in this process (the baseline), then by ``dex submit
  curate --parts N`` for each N of ``--parts`` (one worker a part, the parts as local jobs, then the merge and
  verification), each into a fresh folder: images written per second of wall time, from the call to the verified
  collection.
- **Submission overhead**: seconds from launching the command to the pretraining's first logged step, for ``dex
  pretrain`` and for ``dex submit pretrain --executor local`` (the same config, one task), each a fresh process;
  the difference is what submission adds (submitit's pickling, the job's own Python start and import).

    python benchmarks/submit_overhead.py [--recipe runs/phantoms/recipe.yaml] [--parts 1 2]
        [--data runs/medverse] [--json out.json]

The defaults are what the README's first command makes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _images(out: Path) -> int:
    return json.loads((out / "index.json").read_text())["samples"]


def curation(recipe: Path, parts: list[int]) -> list[dict]:
    """Images per second of the in-process curation, then of ``dex submit curate`` in each number of parts."""
    from dex.cluster import Resources, submit_curate
    from dex.data.curation import curate

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        curate(recipe, Path(folder) / "in-process", workers=1, progress=False)
        seconds = time.perf_counter() - started
        images = _images(Path(folder) / "in-process")
        rows.append({"how": "dex curate (in process, 1 worker)", "images": images, "seconds": round(seconds, 1),
                     "images_per_s": round(images / seconds, 1)})
        for count in parts:
            out = Path(folder) / f"parts-{count}"
            started = time.perf_counter()
            submit_curate(recipe, out, count, Resources("local"), workers=1)
            seconds = time.perf_counter() - started
            rows.append({"how": f"dex submit curate --parts {count}", "images": _images(out),
                         "seconds": round(seconds, 1), "images_per_s": round(_images(out) / seconds, 1)})
    return rows


def _to_first_step(command: list[str], log: Path) -> float:
    """Seconds from launching ``command`` to the first line of ``log``; the process is then stopped."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (log.is_file() and log.read_text().strip()):
            if process.poll() is not None and not log.is_file():
                raise RuntimeError(f"{' '.join(command)} ended with status {process.returncode} before a step")
            time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        process.wait()


def submission(data: Path) -> list[dict]:
    """Seconds to the first step of the demo pretraining, run directly and submitted (local executor)."""
    rows = []
    for how, prefix, extra in (("dex pretrain", ["pretrain"], []),
                               ("dex submit pretrain --executor local", ["submit", "pretrain"],
                                ["--executor", "local"])):
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "dex", *prefix, "configs/pretrain_demo.yaml", "--set", f"data={data}",
                       f"out_dir={out}", "epochs=1", "warmup_epochs=0", "log_every=1", "samples_per_epoch=64",
                       "tensorboard=false", *extra]
            rows.append({"how": how, "seconds_to_first_step": round(_to_first_step(command, Path(out) / "log.jsonl"),
                                                                    2)})
    rows.append({"how": "overhead of submission",
                 "seconds_to_first_step": round(rows[1]["seconds_to_first_step"] - rows[0]["seconds_to_first_step"],
                                                2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("runs/phantoms/recipe.yaml"))
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data", type=Path, default=Path("runs/medverse"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = {"machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
              "curation": curation(args.recipe, args.parts), "submission": submission(args.data)}
    for row in result["curation"]:
        print(f"{row['how']:40s} {row['images']:6d} images {row['seconds']:7.1f} s {row['images_per_s']:7.1f} "
              "images/s")
    for row in result["submission"]:
        print(f"{row['how']:40s} {row['seconds_to_first_step']:6.2f} s to the first step")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
