"""How a small CPU pretraining shares the machine (issue 31): its wall time alone and beside ``--busy`` CPU-bound
processes (Python busy loops), in the same run, for each ``--setting`` (environment variables for the pretraining
process: ``default`` is dex's own thread settings; ``OMP_WAIT_POLICY=ACTIVE``, ``OMP_NUM_THREADS=2``... reproduce
other ones).

A fair share of C cores beside B busy processes gives the run C - B of them at best (B < C), so its time may grow by
C / (C - B) at most (2 on 2 cores beside one); the target is at most 1.25 times that. The pretraining is ``--steps``
steps of ``configs/pretrain_demo.yaml`` (a DEX-Ti at 64 px) on a curated collection (``--data``, made by the
README's first command), timed by its log (the steps after the first, each logged with its images/s: process
start, data set-up and the first step excluded).

    python benchmarks/cpu_contention.py [--data runs/medverse] [--steps 60] [--busy 1]
        [--setting default --setting OMP_WAIT_POLICY=ACTIVE,OMP_NUM_THREADS=2] [--json out.json]
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

BUSY_LOOP = "while True: pass"


def _environment(setting: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT"):
        env.pop(name, None)  # each setting starts from a clean environment
    if setting != "default":
        env |= dict(item.split("=", 1) for item in setting.split(","))
    return env


def _pretrain(data: Path, steps: int, setting: str) -> float:
    """Seconds of the pretraining's steps after the first (from each logged step's images/s, batch 32)."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "dex", "pretrain", "configs/pretrain_demo.yaml", "--set",
                        f"data={data}", f"out_dir={out}", "epochs=1", "warmup_epochs=0", "log_every=1",
                        f"samples_per_epoch={32 * steps}", "tensorboard=false"],
                       check=True, env=_environment(setting), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rates = [json.loads(line)["images_per_s"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return sum(32 / rate for rate in rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/medverse"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--busy", type=int, default=1, help="busy-loop processes beside the run (1)")
    parser.add_argument("--setting", action="append", help="environment of the run: default, or NAME=V,NAME=V")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    fair = cores / (cores - args.busy)
    rows = []
    for setting in args.setting or ["default"]:
        alone = _pretrain(args.data, args.steps, setting)
        busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
        try:
            time.sleep(1)
            beside = _pretrain(args.data, args.steps, setting)
        finally:
            for process in busy:
                process.kill()
        slowdown = beside / alone
        rows.append({"setting": setting, "alone_s": round(alone, 2), "beside_busy_s": round(beside, 2),
                     "slowdown": round(slowdown, 2), "fair_slowdown": round(fair, 2),
                     "within_target": slowdown <= 1.25 * fair})
        print(f"{setting}: {args.steps} steps alone {alone:.1f} s, beside {args.busy} busy process(es) {beside:.1f} s:"
              f" {slowdown:.2f}x (fair share {fair:.2f}x, target <= {1.25 * fair:.2f}x)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "busy": args.busy, "steps": args.steps, "rows": rows,
                                         "machine": platform.processor() or platform.machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
