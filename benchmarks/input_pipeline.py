"""How much of a segmentation fine-tuning step the training input pipeline costs (issue 30: at most a fifth of a step
with two workers on the 2-core CPU), on a real task at its own resolution.

The task's training patches are made by :class:`dex.downstream.patches.TaskPatches` (MONAI's
``RandCropByPosNegLabeld``, a third on foreground, nnU-Net's augmentation), as ``dex finetune`` makes them, and fed
to a scratch ViT-Ti UNETR or nnU-Net's 2D U-Net (``--encoder``) at ``--size`` px with the derived recipe's loss and
optimiser. In the same run:

- *pipeline*: seconds to make one batch of patches in the main process (no workers);
- *bare step*: seconds of one optimiser step on a batch already in memory (forward, Dice + CE, backward, AdamW);
- *loop*: seconds per step of the training loop fed by a ``DataLoader`` with ``--workers`` workers (two by
  default), the workers' start excluded;

and the share of a step spent on input, ``(loop - bare step) / loop`` (what the loop waits for, or loses to the
workers taking the cores): the target is at most 0.2.

    python benchmarks/input_pipeline.py [--task ../shared/data/fundus-vessels-chase] [--encoder vit|unet]
        [--size 64] [--batch-size 32] [--steps 40] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import dex  # noqa: F401  (registers the models in timm)
from dex.data.preprocess import Preprocessing
from dex.data.tasks import load_task
from dex.downstream.finetune import SegmentationLoss
from dex.downstream.optim import make_optimizer
from dex.downstream.patches import TaskPatches
from dex.downstream.task_model import build_network
from dex.models.peers import UNET_ARCHITECTURE

ARCHITECTURES = {"vit": "dex_vit_tiny_patch16_256", "unet": UNET_ARCHITECTURE}  # the scratch ViT-Ti: no experts


def _batches(loader: DataLoader, steps: int):
    iterator = iter(loader)
    for _ in range(steps):
        yield next(iterator)


def _step(model, loss, optimizer, batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss(model(batch["image"]), batch["target"], batch["roi"]).backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", type=Path, default=Path("../shared/data/fundus-vessels-chase"))
    parser.add_argument("--modality", default="Fundus")
    parser.add_argument("--encoder", choices=sorted(ARCHITECTURES), default="vit")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    task = load_task(args.task, {"modality": args.modality})
    preprocessing = Preprocessing(size=args.size, modality=args.modality, fit="native")
    torch.manual_seed(0)
    encoder_args = {"img_size": args.size, "num_experts": 0} if args.encoder == "vit" else {}
    model = build_network("segmentation", len(task.spec.classes), ARCHITECTURES[args.encoder], encoder_args).train()
    optimizer = make_optimizer(model, 5e-4, 0.05, 1.0)
    loss = SegmentationLoss(batch=True)

    def patches() -> TaskPatches:
        return TaskPatches(task, task.splits["train"], preprocessing, (args.size, args.size), args.steps + 4,
                           args.batch_size, 1 / 3, "nnunet", seed=0)

    start = time.perf_counter()
    data = patches()
    setup = time.perf_counter() - start
    serial = DataLoader(data, batch_size=args.batch_size)
    start = time.perf_counter()
    batches = list(_batches(serial, args.steps // 4))
    pipeline = (time.perf_counter() - start) / len(batches)

    _step(model, loss, optimizer, batches[0])  # warm-up
    start = time.perf_counter()
    for i in range(args.steps // 2):
        _step(model, loss, optimizer, batches[i % len(batches)])
    bare = (time.perf_counter() - start) / (args.steps // 2)

    loader = DataLoader(patches(), batch_size=args.batch_size, num_workers=args.workers,
                        persistent_workers=args.workers > 0)
    iterator = iter(loader)
    for _ in range(4):  # the workers' start and the first batches
        _step(model, loss, optimizer, next(iterator))
    start = time.perf_counter()
    for _ in range(args.steps):
        _step(model, loss, optimizer, next(iterator))
    loop = (time.perf_counter() - start) / args.steps
    share = (loop - bare) / loop
    print(f"{task.name}, {args.encoder} at {args.size} px, batch {args.batch_size}: setup {setup:.1f} s, pipeline "
          f"{pipeline:.3f} s a batch in the main process ({pipeline / bare:.2f} of a bare step), bare step "
          f"{bare:.3f} s, loop with {args.workers} workers {loop:.3f} s a step: input share {share:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "task": task.name, "encoder": args.encoder, "size": args.size, "batch_size": args.batch_size,
            "workers": args.workers, "steps": args.steps, "setup_s": round(setup, 2),
            "pipeline_s_per_batch": round(pipeline, 4), "bare_step_s": round(bare, 4), "loop_step_s": round(loop, 4),
            "input_share": round(share, 3), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
