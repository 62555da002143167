"""Throughput of ``dex data import-task`` on this machine, in images written per second, with one thread and with
``--workers`` threads (all cores by default), in the same run:

- pairs: the shared Kvasir polyps (300 JPEG images with JPEG masks, 256 px), stored as they are, masks re-encoded;
- medmnist: a generated MedMNIST-style ``.npz`` (random RGB pixels, 28 px and 224 px), every image encoded as PNG;
- volumes: the shared CT series (64 x 512 x 512) written as NIfTI cases with a body label, cut into 16-bit slices.

    python benchmarks/task_import_throughput.py [--medmnist-images 20000] [--cases 4] [--workers N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from dex.data.phantoms.writers import write_nifti
from dex.data.importers import ImportOptions, import_task
from dex.data.volumes import read_dicom_volume

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _timed(what: str, layout: str, src: Path, out: Path, options: ImportOptions, workers: int) -> dict:
    start = time.perf_counter()
    summary = import_task(layout, src, out, options, workers=workers)
    seconds = time.perf_counter() - start
    return {"what": what, "workers": workers, "images": summary.images, "seconds": round(seconds, 2),
            "images_per_s": round(summary.images / seconds, 1)}


def _sources(tmp: Path, medmnist_images: int, cases: int) -> list[tuple[str, str, Path, ImportOptions]]:
    kvasir = SHARED / "endoscopy-polyp-kvasir"
    out = [("pairs, Kvasir 256 px JPEG", "pairs", kvasir / "images",
            ImportOptions(modality="endoscopy", masks=str(kvasir / "masks")))]
    rng = np.random.default_rng(0)
    for size, count in ((28, medmnist_images), (224, medmnist_images // 20)):
        images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
        np.savez(tmp / f"m{size}.npz", train_images=images, train_labels=rng.integers(0, 9, (count, 1)))
        out.append((f"medmnist, {size} px RGB", "medmnist", tmp / f"m{size}.npz", ImportOptions(modality="pathology")))
    volume = read_dicom_volume(sorted((SHARED / "ct-lung-dicom" / "images").rglob("*.dcm")))
    for case in range(cases):
        write_nifti(tmp / "imagesTr" / f"ct_{case:03d}_0000.nii.gz", volume.values, volume.spacing)
        write_nifti(tmp / "labelsTr" / f"ct_{case:03d}.nii.gz", (volume.values > -500).astype(np.uint8),
                    volume.spacing)
    out.append((f"volumes, {cases} CT cases 64 x 512 x 512, all slices", "volumes", tmp / "imagesTr",
                ImportOptions(modality="CT", labels=str(tmp / "labelsTr"), slices="all")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--medmnist-images", type=int, default=20000)
    parser.add_argument("--cases", type=int, default=4, help="NIfTI cases made from the shared CT series")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n, (what, layout, src, options) in enumerate(_sources(tmp, args.medmnist_images, args.cases)):
            for workers in sorted({1, args.workers}):
                rows.append(_timed(what, layout, src, tmp / f"out{n}-{workers}", options, workers))
    print("| import | workers | images | seconds | images/s |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['what']} | {row['workers']} | {row['images']} | {row['seconds']} | {row['images_per_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                               "cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
