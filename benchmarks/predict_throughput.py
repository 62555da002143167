"""Throughput of ``dex predict`` on a folder of PNG images and on a NIfTI volume against a bare batched forward of
the same model on tensors already in memory, in the same run (images or slices per second, and their ratio: what
reading, normalisation, resizing, resizing back and writing cost); and of a segmentation model trained on patches
(``fit: native``) on ``--large`` images of ``--large-size`` px predicted with the Gaussian sliding window at overlap
0.5, no mirroring (windows per second of ``dex predict`` against a bare batched forward of the same windows, cut
from the images in memory: what the sliding window's cutting, weighting and stitching add to reading and writing).

A DEX ViT (``--model``, at ``--size`` px, random weights: speed does not depend on them) with a classification head
and with a UNETR decoder is saved as a ``dex finetune`` model folder of a CT model (``ct_hu``, axial slices);
``--images`` grey 8-bit PNGs of ``--size`` px and a CT volume of ``--volume`` voxels (int16 HU, 256 x 256 x 64 by
default: 64 axial slices) are written to a temporary folder. The bare forward is ``model.predict`` on the
preprocessed images or slices, batch by batch, timed before and after ``dex predict`` (the mean of the two: a
shared machine's speed drifts).

    python benchmarks/predict_throughput.py [--images 500] [--volume 256 256 64] [--model tiny] [--size 256]
        [--large 8] [--large-size 1000] [--batch-size 16] [--device cpu] [--json out.json]
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
from dex.downstream.windows import SlidingWindow, window_count

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


def _model(task_type: str, architecture: str, size: int, folder: Path, native: bool = False) -> TaskModel:
    args = {"img_size": size, "mode": "experts"}
    classes = ["background", "foreground"] if task_type == "segmentation" else ["a", "b", "c"]
    torch.manual_seed(0)
    preprocessing = Preprocessing(size=size, modality="CT", volume_normalization="ct_hu",
                                  fit="native" if native else "resize")
    model = TaskModel(build_network(task_type, len(classes), architecture, args), task_type, classes, preprocessing,
                      architecture, args, inference=SlidingWindow((size, size), 0.5, "none") if native else None)
    model.save(folder)
    return model


def _windows(image: torch.Tensor, window: int, overlap: float) -> torch.Tensor:
    """The [N, C, window, window] windows MONAI's sliding window cuts from an image [C, H, W] (H, W >= window)."""
    step = max(int(window * (1 - overlap)), 1)

    def starts(length: int) -> list[int]:
        return sorted({min(i * step, length - window) for i in range(-(-(length - window) // step) + 1)})

    return torch.stack([image[:, y:y + window, x:x + window] for y in starts(image.shape[1])
                        for x in starts(image.shape[2])])


def _bare_network(model: TaskModel, windows: torch.Tensor, batch_size: int, device: str) -> float:
    """Windows per second of the bare network on ``windows`` in memory, batch by batch."""
    network = model.network.to(device).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            network(windows[i: i + batch_size].to(device)).softmax(1).cpu()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(windows) / (time.perf_counter() - start)


def _large_images(tmp: Path, args: argparse.Namespace) -> dict:
    """dex predict of a patch-trained segmentation model on large images against the bare forward of its windows."""
    _images(tmp / "large", args.large, args.large_size)
    model = _model("segmentation", ARCHITECTURES[args.model], args.size, tmp / "native", native=True)
    pictures = [picture for case in read_cases(find_inputs([tmp / "large"], []), model.preprocessing, [])
                for _, picture in case.pictures]
    windows = torch.cat([_windows(model.preprocessing.picture_input(p), args.size, 0.5) for p in pictures])
    assert len(windows) == sum(window_count(p.pixels.shape[:2], (args.size, args.size)) for p in pictures)
    _bare_network(model, windows[: args.batch_size], args.batch_size, args.device)  # warm-up
    before = _bare_network(model, windows, args.batch_size, args.device)
    start = time.perf_counter()
    predict(tmp / "native", [tmp / "large"], tmp / "out-native", args.batch_size, args.device)
    full = len(windows) / (time.perf_counter() - start)
    bare = (before + _bare_network(model, windows, args.batch_size, args.device)) / 2
    print(f"segmentation, {args.large} images of {args.large_size} px, sliding window: dex predict {full:.1f} "
          f"windows/s, bare forward {bare:.1f} windows/s, ratio {full / bare:.2f}")
    return {"task": "segmentation", "input": f"{args.large_size} px images, sliding window", "windows": len(windows),
            "bare_per_s": round(bare, 1), "predict_per_s": round(full, 1), "ratio": round(full / bare, 3)}


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
    parser.add_argument("--large", type=int, default=8, help="large images for the sliding window (8)")
    parser.add_argument("--large-size", type=int, default=1000, help="their side in pixels (1000)")
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
        if args.large:
            results.append(_large_images(tmp, args))
    report = {"model": ARCHITECTURES[args.model], "size": args.size, "volume": args.volume,
              "large": [args.large, args.large_size], "batch_size": args.batch_size,
              "device": args.device, "threads": torch.get_num_threads(), "machine": platform.processor() or
              platform.machine(), "torch": torch.__version__, "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
