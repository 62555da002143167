"""A fine-tuning recipe derived from the data: nnU-Net's idea (fingerprint the data set, derive the configuration by
rules) applied to fine-tuning a foundation encoder.

:func:`fingerprint` measures a task's training split: the images' sizes, the channels, how many images each split
has, the class counts (classification) or, from the masks, each foreground class's share of the pixels and the
typical width of its structures (from scipy's Euclidean distance transform: the pixels of a band w pixels wide lie
(w + 2) / 4 pixels from the background on average, so w = 4 x mean - 2: the width of a vessel or a membrane, about
the diameter of a blob). :func:`derive` turns it, with the encoder's input
size, into every fine-tuning setting the user left unset (``None`` in :class:`~dex.downstream.finetune.
FinetuneConfig`), by the rules of :data:`RULES` (each ours, the values from the recipes named there). A value the
user gives (``--set KEY=VALUE``) wins and is recorded as given.

Two recipes:

- ``derived`` (the default): the rules below.
- ``paper``: the fixed protocol of the DEX paper (App. C.2.2): 100 epochs of one pass over the training images,
  10 of warm-up, AdamW at 1e-4, batch 16, every image resized to the encoder's input, horizontal flips, one
  learning rate for every layer, no drop path, no test-time mirroring; the layout of Tables 1 and 5.

With ``budget_minutes`` the derived schedule is fitted to that much wall time by
:func:`fit_budget` from the speed measured on the machine (a few real steps and one forward, timed), so the number
of epochs depends on the machine: the plans record the epochs and steps chosen, and ``--set epochs=E
steps_per_epoch=S`` repeats the run bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dex.data.tasks import Task, mask_labels

#: each rule and where its value comes from; every one is our choice where no source fixes it
RULES: dict[str, str] = {
    "fit": "segmentation at the images' own resolution on patches of the encoder's input size, predicted with a "
           "Gaussian sliding window (nnU-Net), when the images' median side exceeds the input by a quarter and "
           "resizing them to the input would leave the thinnest class's structures under 4 px wide; else the "
           "image resized to the input, whose whole field of view the model then sees (ours: on Kvasir polyps, "
           "64 px windows over 256 px images scored below the resized image, on CHASE vessels far above)",
    "batch_size": "segmentation: 16 x 128^2 pixels a batch (nnU-Net 2D's order of magnitude), 2 to 32 patches; "
                  "classification: an eighth of the training images as a power of two, 8 to 64 (ours)",
    "steps_per_epoch": "at least 25 steps an epoch, else one pass over the training images (ours; nnU-Net counts "
                       "250 iterations an epoch whatever the data set's size)",
    "epochs": "50 (ours), or what fits budget_minutes",
    "warmup_epochs": "a tenth of the epochs, at least 1 (MAE fine-tuning: 5 of 100)",
    "lr": "5e-4 with AdamW, a linear warm-up then cosine (MAE fine-tuning's base rate)",
    "layer_decay": "0.75 for a pretrained ViT, DEX ViT or Swin (BEiT, MAE, RETFound: 0.65-0.75); 1.0 (none) from "
                   "scratch, whose early layers hold nothing to keep",
    "drop_path": "0.1 (MAE and DeiT fine-tuning of ViT-B and ViT-Ti)",
    "augmentation": "segmentation: nnU-Net's spatial (rotation, scaling, mirroring) and intensity (noise, blur, "
                    "brightness, contrast, gamma) transforms from MONAI; classification with at least 1,000 training "
                    "images: timm's random resized crop, flips and RandAugment rand-m9-mstd0.5-inc1 (MAE and RETFound "
                    "fine-tuning), below that horizontal flips (ours: on brain MR, 320 training images, a scratch "
                    "ViT-Ti fine-tuned for 3 minutes scored macro F1 47.3 with the strong transforms, 74.4 with flips)",
    "random_erasing": "classification with at least 1,000 training images: 0.25 (MAE, RETFound), constant-filled on "
                      "grey images; none below (ours, as the augmentation)",
    "mixup": "classification with at least 1,000 training images: mixup 0.8 and cutmix 1.0 (MAE, DeiT); none below "
             "(ours: mixing few images blurs what little there is to learn)",
    "cutmix": "as mixup",
    "label_smoothing": "classification: 0.1 (MAE, RETFound)",
    "ema_decay": "classification: 0.9998 with timm's EMA warm-up (decay 1 - (1 + step)^(-2/3) until it reaches "
                 "that), whose horizon grows with the run (DeiT: 0.99996); none for segmentation (nnU-Net)",
    "selection_metric": "the epoch kept: AUROC for binary classification, macro F1 for more classes, Dice for "
                        "segmentation (ours)",
    "foreground_oversample": "a third of the patches centred on foreground (nnU-Net)",
    "mirror": "test-time mirroring along both axes for segmentation (nnU-Net), none for classification",
}

PAPER: dict[str, Any] = {"epochs": 100, "warmup_epochs": 10, "lr": 1e-4, "batch_size": 16, "layer_decay": 1.0,
                         "drop_path": 0.0, "fit": "resize", "augmentation": "flip", "random_erasing": 0.0, "mixup": 0.0,
                         "cutmix": 0.0, "label_smoothing": 0.0, "ema_decay": 0.0, "foreground_oversample": 0.0,
                         "mirror": "none"}
STRONG_IMAGES = 1000  # training images from which the derived recipe uses RandAugment, random erasing and mixing
THIN_STRUCTURE = 4.0  # px: structures resized thinner than this are segmented at the images' own resolution
MAX_FINGERPRINT_IMAGES = 200  # masks read for the fingerprint (a seeded sample beyond that)


def fingerprint(task: Task, seed: int = 0) -> dict[str, Any]:
    """What the rules need to know of ``task``: image sizes (median, min, max of height and width over the
    training split), channels, images per split, and the class counts (classification) or each foreground class's
    share of the pixels and median structure width in pixels (segmentation; over at most
    :data:`MAX_FINGERPRINT_IMAGES` training masks)."""
    from PIL import Image
    from scipy import ndimage

    train = task.splits["train"]
    sizes = []
    for item in train:
        with Image.open(task.images[item]) as image:
            sizes.append((image.height, image.width))
    sizes_array = np.array(sizes or [(0, 0)])
    out: dict[str, Any] = {
        "images": {split: len(ids) for split, ids in task.splits.items()},
        "median_size": [int(v) for v in np.median(sizes_array, 0)],
        "min_size": [int(v) for v in sizes_array.min(0)], "max_size": [int(v) for v in sizes_array.max(0)],
        "channels": task.spec.channels,
    }
    if task.spec.type == "classification":
        counts = np.bincount([task.labels[i] for i in train], minlength=len(task.spec.classes))
        out["class_counts"] = dict(zip(task.spec.classes, counts.tolist()))
        return out
    sample = train
    if len(train) > MAX_FINGERPRINT_IMAGES:
        order = np.random.default_rng([seed, 11]).permutation(len(train))[:MAX_FINGERPRINT_IMAGES]
        sample = [train[i] for i in sorted(order)]
    pixels = np.zeros(len(task.spec.classes))
    widths: dict[int, list[float]] = {c: [] for c in range(1, len(task.spec.classes))}
    for item in sample:
        labels = mask_labels(task, item)
        pixels += np.bincount(labels.ravel(), minlength=len(task.spec.classes))[:len(task.spec.classes)]
        for c, found in widths.items():
            inside = labels == c
            if inside.any():
                found.append(float(4 * ndimage.distance_transform_edt(inside)[inside].mean() - 2))
    total = max(pixels.sum(), 1)
    out["foreground_share"] = {task.spec.classes[c]: float(pixels[c] / total) for c in widths}
    out["structure_width"] = {task.spec.classes[c]: float(np.median(w)) if w else None for c, w in widths.items()}
    return out


def _batch_size(task_type: str, window: tuple[int, int], train_images: int) -> int:
    if task_type == "segmentation":
        return int(min(32, max(2, (16 * 128 * 128) // (window[0] * window[1]))))
    return int(min(64, max(8, 2 ** math.floor(math.log2(max(train_images // 8, 1))))))


def derive(given: dict[str, Any], recipe: str, task_type: str, fingerprint_: dict[str, Any],
           window: tuple[int, int], pretrained: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings of a run: ``given`` (the user's values; ``None`` for unset) completed by ``recipe``
    (``derived``: the rules of :data:`RULES` from the fingerprint, the encoder's input ``window`` (h, w) and
    whether the encoder is ``pretrained``; ``paper``: :data:`PAPER`). Returns the values and, for each key, where
    it came from (``given``, ``derived`` or ``paper``). ``epochs`` stays ``None`` when a budget will fix it."""
    if recipe not in ("derived", "paper"):
        raise ValueError(f"recipe must be derived or paper, got {recipe!r}")
    train_images = fingerprint_["images"].get("train", 0)
    segmentation = task_type == "segmentation"
    binary = not segmentation and len(fingerprint_.get("class_counts", {})) == 2
    selection = "dice" if segmentation else "auroc" if binary and recipe == "derived" else "f1_macro"
    if recipe == "paper":
        rules = {**PAPER, "steps_per_epoch": None, "selection_metric": selection}  # an epoch: one pass
    else:
        median = fingerprint_["median_size"]
        shrink = max(m / w for m, w in zip(median, window))
        widths = [w for w in (fingerprint_.get("structure_width") or {}).values() if w is not None]
        native = segmentation and shrink > 1.25 and (not widths or min(widths) / shrink < THIN_STRUCTURE)
        fit = "native" if native else "resize"
        strong = not segmentation and train_images >= STRONG_IMAGES
        batch = given.get("batch_size") or _batch_size(task_type, window, train_images)
        epochs = None if given.get("budget_minutes") else 50
        rules = {
            "fit": fit, "batch_size": batch,
            "steps_per_epoch": max(25, math.ceil(train_images / batch)),
            "epochs": epochs, "warmup_epochs": None, "lr": 5e-4,
            "layer_decay": 0.75 if pretrained else 1.0, "drop_path": 0.1,
            "augmentation": "nnunet" if segmentation else "randaugment" if strong else "flip",
            "random_erasing": 0.25 if strong else 0.0,
            "mixup": 0.8 if strong else 0.0,
            "cutmix": 1.0 if strong else 0.0,
            "label_smoothing": 0.0 if segmentation else 0.1,
            "ema_decay": 0.0 if segmentation else 0.9998,
            "selection_metric": selection,
            "foreground_oversample": 1 / 3 if segmentation else 0.0,
            "mirror": "xy" if segmentation else "none",
        }
    values, sources = {}, {}
    for key, rule in rules.items():
        if given.get(key) is not None:
            values[key], sources[key] = given[key], "given"
        else:
            values[key], sources[key] = rule, recipe
    if values["warmup_epochs"] is None and values["epochs"] is not None:
        values["warmup_epochs"] = max(1, values["epochs"] // 10)
    return values, sources


def fit_budget(minutes: float, spent_seconds: float, step_seconds: float, validation_seconds: float,
               test_seconds: float, steps_per_epoch: int) -> tuple[int, int, int]:
    """Epochs, steps an epoch and warm-up epochs that fill ``minutes`` of wall time, ``spent_seconds`` of which are
    gone, with a step taking ``step_seconds``, a validation ``validation_seconds`` and the final test
    ``test_seconds`` (5% kept as a margin). An epoch is lengthened until its validation costs at most a quarter of
    its steps' time; a budget too small for one epoch gives one epoch of the steps that fit (at least one). The
    warm-up is a tenth of the epochs, none for a single epoch."""
    left = minutes * 60 * 0.95 - spent_seconds - test_seconds
    steps = max(steps_per_epoch, math.ceil(3 * validation_seconds / max(step_seconds, 1e-9)))
    epoch_seconds = steps * step_seconds + validation_seconds
    epochs = int(left // epoch_seconds)
    if epochs < 1:
        return 1, max(1, int((left - validation_seconds) // max(step_seconds, 1e-9))), 0
    return epochs, steps, max(1, epochs // 10) if epochs > 1 else 0
