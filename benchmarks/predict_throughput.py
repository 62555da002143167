"""Throughput of ``dex predict`` on a folder of PNG images and on a NIfTI volume against a bare batched forward of
the same model on tensors already in memory, in the same run (images or slices per second, and their ratio: what
reading, normalisation, resizing, resizing back and writing cost).

A DEX ViT (``--model``, at ``--size`` px, random weights: speed does not depend on them) with a classification head
and with a UNETR decoder is saved as a ``dex finetune`` model folder of a CT model (``ct_hu``, axial slices);
``--images`` grey 8-bit PNGs of ``--size`` px and a CT volume of ``--volume`` voxels (int16 HU, 256 x 256 x 64 by
default: 64 axial slices) are written to a temporary folder. The bare forward is ``model.predict`` on the
preprocessed images or slices, batch by batch, timed before and after ``dex predict`` (the mean of the two: a
shared machine's speed drifts).

    python benchmarks/predict_throughput.py [--images 500] [--volume 256 256 64] [--model tiny] [--size 256]
        [--batch-size 16] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

import dex  # noqa: F401  (registers the models in timm)
from dex.data.preprocess import Preprocessing
from dex.downstream.inputs import find_inputs, read_cases
from dex.downstream.predict import predict
from dex.downstream.task_model import TaskModel, build_network

ARCHITECTURES = {size: f"dex_vit_{size}_patch16_256" for size in ("tiny", "small", "base", "large")}


def _images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        ramp = np.add.outer(np.arange(size), np.arange(size)) * (255 / (2 * size))
        pixels = np.clip(ramp + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"image-{i:05d}.png")


def _volume(path: Path, shape: tuple[int, int, int]) -> None:
    """A CT-like volume: an ellipsoid body of soft tissue in air, with noise, in HU."""
    rng = np.random.default_rng(0)
    i, j = np.ogrid[: shape[0], : shape[1]]
    body = ((i - shape[0] / 2) / (0.4 * shape[0])) ** 2 + ((j - shape[1] / 2) / (0.3 * shape[1])) ** 2 < 1
    hu = np.where(body[..., None], 40.0, -1000.0) + rng.normal(0, 20, shape)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([0.8, 0.8, 2.5, 1.0])), path)


def _model(task_type: str, architecture: str, size: int, folder: Path) -> TaskModel:
    args = {"img_size": size, "mode": "experts"}
    classes = ["background", "foreground"] if task_type == "segmentation" else ["a", "b", "c"]
    torch.manual_seed(0)
    model = TaskModel(build_network(task_type, len(classes), architecture, args), task_type, classes,
                      Preprocessing(size=size, modality="CT", volume_normalization="ct_hu"), architecture, args)
    model.save(folder)
    return model


def _bare(model: TaskModel, images: torch.Tensor, batch_size: int, device: str) -> float:
    model = model.to(device).eval()
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        model.predict(images[i: i + batch_size].to(device)).cpu()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--volume", type=int, nargs=3, default=[256, 256, 64], metavar=("I", "J", "K"))
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _images(tmp / "images", args.images, args.size)
        _volume(tmp / "volume.nii.gz", tuple(args.volume))
        for task_type in ("classification", "segmentation"):
            model = _model(task_type, ARCHITECTURES[args.model], args.size, tmp / task_type)
            for name, source in (("png folder", tmp / "images"), ("nifti volume", tmp / "volume.nii.gz")):
                cases = read_cases(find_inputs([source], []), model.preprocessing, [])
                inputs = torch.stack([model.preprocessing.picture_input(picture) for case in cases
                                      for _, picture in case.pictures])
                _bare(model, inputs[: args.batch_size], args.batch_size, args.device)  # warm-up
                before = _bare(model, inputs, args.batch_size, args.device)
                start = time.perf_counter()
                predict(tmp / task_type, [source], tmp / f"out-{task_type}", args.batch_size, args.device)
                full = len(inputs) / (time.perf_counter() - start)
                bare = (before + _bare(model, inputs, args.batch_size, args.device)) / 2  # drift: before and after
                results.append({"task": task_type, "input": name, "slices": len(inputs),
                                "bare_per_s": round(bare, 1), "predict_per_s": round(full, 1),
                                "ratio": round(full / bare, 3)})
                print(f"{task_type}, {name}: dex predict {full:.1f} images/s, bare forward {bare:.1f} images/s, "
                      f"ratio {full / bare:.2f}")
    report = {"model": ARCHITECTURES[args.model], "size": args.size, "volume": args.volume,
              "batch_size": args.batch_size,
              "device": args.device, "threads": torch.get_num_threads(), "machine": platform.processor() or
              platform.machine(), "torch": torch.__version__, "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
