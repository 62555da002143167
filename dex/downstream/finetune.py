"""Fine-tuning an encoder on a task: a classification head on the class token (cross-entropy) or a 2D UNETR (Dice +
cross-entropy), AdamW with a linear warm-up then cosine, every parameter trained unless the adaptation says
otherwise. The model of the best validation epoch is tested.

The settings left unset are derived from the task by :mod:`dex.downstream.plans` (``recipe: derived``, the default),
or are the paper's fixed protocol (App. C.2.2, ``recipe: paper``). A segmentation model of the derived recipe trains
on patches of the images at their own resolution (:class:`dex.downstream.patches.TaskPatches`) and is validated,
tested and later run by ``dex predict`` with a Gaussian sliding window (:mod:`dex.downstream.windows`); layer-wise
learning-rate decay comes from timm (:mod:`dex.downstream.optim`), drop path from timm's ``DropPath``
(:func:`dex.models.backbones.set_drop_path`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from dex.checkpoint import CheckpointManager, check_same_settings, rng_state, set_rng_state
from dex.config import STRICT
from dex.data.preprocess import Preprocessing
from dex.data.readers import read_picture
from dex.data.tasks import Task, mask_labels, roi_mask
from dex.downstream.augment import classification_augmentation, seeded_call
from dex.downstream.encoders import (
    PEER,
    EncoderSpec,
    encoder_architecture,
    encoder_preprocessing,
    freeze_all_but_last,
    load_encoder,
)
from dex.downstream.lora import add_lora, merge_lora
from dex.downstream.metrics import (
    DiceAccumulator,
    bootstrap_intervals,
    classification_intervals,
    classification_metrics,
    dice_from_counts,
)
from dex.downstream.optim import make_optimizer, set_learning_rate
from dex.downstream.patches import TaskPatches
from dex.downstream.plans import RULES, derive, fingerprint, fit_budget
from dex.downstream.task_model import TaskModel
from dex.downstream.windows import MIRROR_AXES, SlidingWindow, window_count
from dex.models.backbones import input_size, set_drop_path
from dex.models.peers import UNet2D, peer_task_type
from dex.models.unetr import UNETR2D
from dex.schedules import warmup_cosine, warmup_warning
from dex.seeding import seed_everything
from dex.threads import shared_cores

log = logging.getLogger(__name__)

@STRICT
@dataclass
class FinetuneConfig:
    """Fine-tuning settings; ``None`` means derived by ``recipe`` (:mod:`dex.downstream.plans`)."""

    recipe: Literal["derived", "paper"] = "derived"
    epochs: int | None = None
    warmup_epochs: int | None = None
    steps_per_epoch: int | None = None  # optimiser steps an epoch; the paper's recipe: one pass over the images
    budget_minutes: float | None = None  # fit the derived schedule (epochs) to this much wall time
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    layer_decay: float | None = None  # layer-wise lr decay (timm): block i of L trains at lr * decay^(L - i)
    drop_path: float | None = None  # stochastic depth at the last block (timm's linear rule)
    batch_size: int | None = None
    fit: Literal["resize", "native"] | None = None  # segmentation: whole image resized, or patches at native size
    augmentation: Literal["flip", "nnunet", "randaugment"] | None = None
    random_erasing: float | None = None  # classification: probability of timm's random erasing
    mixup: float | None = None  # classification: mixup's alpha (timm.data.Mixup; 0: none)
    cutmix: float | None = None  # classification: cutmix's alpha (0: none)
    label_smoothing: float | None = None  # classification
    ema_decay: float | None = None  # weights EMA (timm.utils.ModelEmaV3 with its warm-up; 0: none)
    selection_metric: str | None = None  # the validation metric that picks the epoch kept
    foreground_oversample: float | None = None  # share of patches centred on foreground (nnU-Net: 1/3)
    mirror: Literal["none", "x", "xy"] | None = None  # test-time mirroring of segmentation
    overlap: float = 0.5  # of the sliding windows
    data_fraction: float = 1.0  # share of the training split used (Fig. 5-b)
    trainable_blocks: int | None = None  # train only the last n encoder blocks (Fig. 5-c); None: all
    freeze_encoder: bool = False  # train the head or UNETR decoder on a frozen encoder (kept in eval mode)
    lora_rank: int = 0  # > 0: a frozen encoder with LoRA adapters of this rank on attention (dex.downstream.lora)
    lora_alpha: float = 16.0
    feature_size: int = 16  # UNETR
    device: str = "auto"
    num_workers: int = 0
    #: the settings a run may resume with changed: where and how it runs, never what it computes
    resume_free: ClassVar[tuple[str, ...]] = ("device", "num_workers")
    #: the settings a recipe derives (:func:`dex.downstream.plans.derive`)
    derived: ClassVar[tuple[str, ...]] = ("epochs", "warmup_epochs", "steps_per_epoch", "lr", "layer_decay",
                                          "drop_path", "batch_size", "fit", "augmentation", "random_erasing", "mixup",
                                          "cutmix", "label_smoothing", "ema_decay", "selection_metric",
                                          "foreground_oversample", "mirror")


class TaskImages(Dataset):
    """A split of a task: images read by ``preprocessing`` (a :class:`Preprocessing`, or an int: the default one at
    that square size); masks resized to the same size with nearest neighbours (kept whole with ``fit="native"``).

    ``augmentation`` (training): ``flip`` (left-right, p 0.5, the paper's) or, for classification, ``randaugment``
    (:func:`dex.downstream.augment.classification_augmentation`, ``random_erasing`` its probability); each item's
    draw is a function of (seed, epoch, index)."""

    def __init__(self, task: Task, ids: list[str], preprocessing: Preprocessing | int, augmentation: str | None = None,
                 seed: int = 0, random_erasing: float = 0.0) -> None:
        self.preprocessing = preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing(
            size=preprocessing)
        self.task, self.ids, self.augmentation, self.seed, self.epoch = task, ids, augmentation, seed, 0
        if augmentation not in (None, "flip", "randaugment"):
            raise ValueError(f"augmentation {augmentation!r} does not apply to whole images: flip, or randaugment "
                             "for classification")
        if augmentation == "randaugment":
            if task.spec.type != "classification":
                raise ValueError("augmentation randaugment is for classification; segmentation takes flip or nnunet")
            self.randaugment = classification_augmentation(self.preprocessing, task.spec.channels == 1,
                                                           random_erasing)

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, item: str) -> torch.Tensor:
        return self.preprocessing.read(self.task.images[item])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.ids[index]
        if self.augmentation == "randaugment":
            image = seeded_call([self.seed, self.epoch, index], self.randaugment,
                                read_picture(self.task.images[item]))
            return {"image": image, "target": torch.tensor(self.task.labels[item]), "index": index}
        image = self.image(item)
        if self.task.spec.type == "segmentation":
            target = torch.from_numpy(mask_labels(self.task, item))
            if self.preprocessing.fit == "resize":
                target = TF.resize(target[None], list(self.preprocessing.size),
                                   interpolation=TF.InterpolationMode.NEAREST)[0]
        else:
            target = torch.tensor(self.task.labels[item])
        if self.augmentation == "flip" and np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5:
            image = image.flip(-1)
            if target.ndim:
                target = target.flip(-1)
        return {"image": image, "target": target, "index": index}


def build_model(encoder: nn.Module, task: Task, config: FinetuneConfig) -> nn.Module:
    """The network of ``task`` on ``encoder``: a :class:`UNETR2D` of ``config.feature_size`` for segmentation, the
    encoder with a classifier of the task's classes for classification; a U-Net peer (:mod:`dex.models.peers`) is
    the whole segmentation network, its output convolution made for the task's classes."""
    classes = len(task.spec.classes)
    if task.spec.type == "segmentation" and not isinstance(encoder, UNet2D):
        return UNETR2D(encoder, classes, config.feature_size)
    encoder.reset_classifier(classes)
    return encoder


def train_subset(task: Task, fraction: float, seed: int) -> list[str]:
    """The training ids of a ``data_fraction`` run: a seeded share of the split, at least one image (Fig. 5-b)."""
    ids = task.splits["train"]
    if not 0 < fraction <= 1:
        raise ValueError(f"data_fraction must be in (0, 1], got {fraction}")
    count = max(1, round(len(ids) * fraction))
    order = np.random.default_rng([seed, 7]).permutation(len(ids))[:count]
    return [ids[i] for i in sorted(order)]


class SegmentationLoss(nn.Module):
    """Dice + cross-entropy over the pixels of a region of interest: MONAI's soft Dice of the foreground classes
    (``batch``: pooled over the batch, nnU-Net's batch Dice for 2D) on the softmax restricted to the region, plus the
    pixel-wise cross-entropy averaged over the region. ``forward(logits [B, K, H, W], target [B, H, W], roi
    [B, H, W] or None)``; without a region every pixel counts."""

    def __init__(self, batch: bool = True) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=False, batch=batch)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, roi: torch.Tensor | None = None) -> torch.Tensor:
        roi = torch.ones_like(target, dtype=logits.dtype) if roi is None else roi.to(logits.dtype)
        inside = roi[:, None]
        dice = self.dice(logits.softmax(1) * inside, (target * roi.long())[:, None])
        cross_entropy = nn.functional.cross_entropy(logits, target, reduction="none")
        return dice + (cross_entropy * roi).sum() / roi.sum().clamp_min(1)


@torch.no_grad()
def _collect(model: nn.Module, data: TaskImages, device: torch.device, batch_size: int,
             window: SlidingWindow | None = None) -> tuple[torch.Tensor, torch.Tensor] | DiceAccumulator:
    """Classification: the logits and targets of every image; segmentation: the Dice counts of every image (inside
    its region of interest, where the task has one), its logits by ``window`` (whole images of the model's input
    size when None)."""
    model.eval()
    task = data.task
    native = data.preprocessing.fit == "native"
    loader = DataLoader(data, batch_size=1 if native else batch_size)
    if task.spec.type == "classification":
        logits, targets = [], []
        for batch in loader:
            logits.append(model(batch["image"].to(device)).cpu())
            targets.append(batch["target"])
        return torch.cat(logits), torch.cat(targets)
    dice = DiceAccumulator(len(task.spec.classes))
    for batch in loader:
        images = batch["image"].to(device)
        logits = (window(model, images, batch_size) if window is not None else model(images)).cpu()
        for row, index in zip(logits, batch["index"].tolist()):
            item = data.ids[index]
            roi = roi_mask(task, item)
            dice.add(row, torch.from_numpy(mask_labels(task, item)), task.cases[item][0] if task.cases else None,
                     None if roi is None else torch.from_numpy(roi))
    return dice


def _scores(collected: tuple[torch.Tensor, torch.Tensor] | DiceAccumulator) -> dict[str, float]:
    if isinstance(collected, tuple):
        return classification_metrics(*collected)
    scores = {"dice": collected.value()}
    if collected.cases:
        scores["dice_3d"] = collected.value_3d()
    return scores


def evaluate(model: nn.Module, data: TaskImages, device: torch.device, batch_size: int,
             window: SlidingWindow | None = None) -> dict[str, float]:
    """Classification metrics, or DSC over foreground classes computed at each mask's original resolution (inside
    the region of interest, where the task has one): ``dice`` per slice and, for a task whose images are slices of
    cases (``cases.csv``), ``dice_3d`` per case."""
    return _scores(_collect(model, data, device, batch_size, window))


def evaluate_test(model: nn.Module, data: TaskImages, device: torch.device, batch_size: int, resamples: int = 0,
                  seed: int = 0, window: SlidingWindow | None = None
                  ) -> tuple[dict[str, float], dict[str, list[float]], dict[str, Any]]:
    """:func:`evaluate`'s metrics with :func:`scores_with_intervals` and the per-image outputs of
    :func:`per_image_outputs`."""
    collected = _collect(model, data, device, batch_size, window)
    return (*scores_with_intervals(collected, resamples, seed), per_image_outputs(collected, data.ids))


def scores_with_intervals(collected: tuple[torch.Tensor, torch.Tensor] | DiceAccumulator, resamples: int = 0,
                          seed: int = 0) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The metrics of collected test outputs (logits and targets, or Dice counts) and, with ``resamples`` > 0, their
    95% percentile bootstrap intervals, resampling the images (and, for ``dice_3d``, the cases)."""
    intervals: dict[str, list[float]] = {}
    if resamples and isinstance(collected, tuple):
        intervals = classification_intervals(*collected, resamples, seed)
    elif resamples:
        per_image = torch.stack(collected.scores)  # [N, C - 1]
        intervals = bootstrap_intervals(lambda idx: {"dice": float(per_image[idx].mean(0).mean())}, len(per_image),
                                        resamples, seed)
        if collected.cases:
            counts = torch.stack(list(collected.cases.values()), 1)  # [3, cases, C - 1]
            per_case = dice_from_counts(counts)  # [cases, C - 1]: a case's Dice depends on its own counts only
            intervals |= bootstrap_intervals(lambda idx: {"dice_3d": float(per_case[idx].mean(0).mean())},
                                             counts.shape[1], resamples, seed)
    return _scores(collected), intervals


def per_image_outputs(collected: tuple[torch.Tensor, torch.Tensor] | DiceAccumulator,
                      ids: list[str]) -> dict[str, Any]:
    """What a paired comparison of two encoders on the same test images needs, per image in order: the labels and
    the class probabilities (classification), or the Dice of each foreground class and whether the class is in
    the image's truth (segmentation; per case too, for a task of slices of cases: what scoring a trivial predictor
    on the same images needs, :func:`dex.downstream.metrics.trivial_score`)."""
    if isinstance(collected, tuple):
        logits, targets = collected
        return {"ids": list(ids), "labels": targets.tolist(),
                "probabilities": np.round(logits.float().softmax(1).numpy(), 6).tolist()}
    outputs = {"ids": list(ids), "dice": np.round(torch.stack(collected.scores).numpy(), 6).tolist(),
               "present": torch.stack(collected.present).tolist()}
    if collected.cases:
        outputs["case_present"] = {case: (counts[2] > 0).tolist() for case, counts in collected.cases.items()}
    return outputs


def finetune(encoder_spec: EncoderSpec, task: Task, seed: int, config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune ``encoder_spec`` on ``task`` with ``seed``; returns the run's record (validation and test
    metrics of the best validation epoch, the settings, the time taken). :func:`train_task_model` also gives the
    model."""
    return train_task_model(encoder_spec, task, seed, config)[0]


def train_task_model(encoder_spec: EncoderSpec, task: Task, seed: int, config: FinetuneConfig,
                     checkpoints: str | Path | None = None, bootstrap: int = 0) -> tuple[dict[str, Any], TaskModel]:
    """Fine-tune ``encoder_spec`` on ``task`` with ``seed``: the run's record (see :func:`finetune`) and the model
    of the best validation epoch as a :class:`TaskModel` (on the CPU, in eval mode), ready to save.

    The settings ``config`` leaves unset are derived (:mod:`dex.downstream.plans`); the record's ``config`` holds
    the values used and its ``plans`` the fingerprint, where each value came from, and the budget's measurements.
    With ``checkpoints`` (a folder), the state after every epoch (weights, optimiser, the best epoch so far, the
    history, the random generators and the data order) is kept there (:class:`dex.checkpoint.CheckpointManager`, the
    last one), and a run that finds one goes on from it: a run stopped and resumed ends as one that was not (on a
    CPU, bit for bit; a budgeted run keeps the schedule it chose); one written with other settings is refused (only
    ``FinetuneConfig.resume_free`` may differ). ``bootstrap``: resamples of the test metrics' 95% intervals
    (``test_intervals`` of the record; none with 0, the benchmark's default: a thousand resamples of the
    classification metrics take seconds)."""
    with shared_cores(config.num_workers):
        return _train_task_model(encoder_spec, task, seed, config, checkpoints, bootstrap)


def _train_task_model(encoder_spec: EncoderSpec, task: Task, seed: int, config: FinetuneConfig,
                      checkpoints: str | Path | None, bootstrap: int) -> tuple[dict[str, Any], TaskModel]:
    started = time.perf_counter()
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    seed_everything(seed, device)
    net = _network(encoder_spec, task, seed, config, device)
    manager = CheckpointManager(checkpoints, keep=1) if checkpoints is not None else None
    saved = manager.load_latest() if manager is not None else None
    config, plans = _settings(config, task, net, encoder_spec, seed, saved)
    if encoder_spec.source != PEER:
        set_drop_path(net.encoder, config.drop_path)
    preprocessing = replace(encoder_preprocessing(encoder_spec, net.encoder), fit=config.fit)
    window = (SlidingWindow(preprocessing.size, config.overlap, config.mirror)
              if task.spec.type == "segmentation" else None)
    ids = train_subset(task, config.data_fraction, seed)
    val, test = (TaskImages(task, task.splits[split], preprocessing) for split in ("val", "test"))
    if not ids or not len(val) or not len(test):
        raise ValueError(f"{task.root}: every split needs images (train {len(ids)}, val {len(val)}, "
                         f"test {len(test)})")
    train = _training_data(task, ids, preprocessing, config, seed)
    optimizer = make_optimizer(net.model, config.lr, config.weight_decay, config.layer_decay)
    params = [p for p in net.model.parameters() if p.requires_grad]
    if config.budget_minutes and config.epochs is None:
        config, plans["budget"] = _fit_to_budget(net, train, val, test, optimizer, config, window, seed, device,
                                                 started)
        plans["settings"] |= {k: getattr(config, k) for k in ("epochs", "steps_per_epoch", "warmup_epochs")}
        plans["sources"] |= {k: "budget" for k in ("epochs", "steps_per_epoch", "warmup_epochs")
                             if plans["sources"][k] != "given"}
        if isinstance(train, TaskPatches):
            train.length = config.steps_per_epoch * config.batch_size
    _check_schedule(config)
    score_name = "dice" if task.spec.type == "segmentation" else "f1_macro"
    best, history = _fit(net, train, val, optimizer, config, seed, device, manager, saved, window)
    model = net.model
    model.load_state_dict(best["state"])
    test_scores, test_intervals, outputs = evaluate_test(model, test, device, config.batch_size, bootstrap, seed,
                                                         window)
    record = {
        "task": task.name, "modality": task.spec.modality, "type": task.spec.type, "encoder": encoder_spec.name,
        "seed": seed, "score_name": score_name, "selection_metric": config.selection_metric,
        "best_epoch": best["epoch"], "val": best["val"],
        "test": test_scores, "test_intervals": test_intervals, "encoder_spec": asdict(encoder_spec),
        "encoder_sha256": net.encoder_sha256, "config": asdict(config), "plans": plans, "train_images": len(ids),
        "split_images": {"train": len(ids), "val": len(val), "test": len(test)},
        "trainable_parameters": sum(p.numel() for p in params), "history": history, "test_outputs": outputs,
        "seconds": time.perf_counter() - started,
    }
    if config.lora_rank:
        merge_lora(model)
    kept = TaskModel(model.cpu().eval(), task.spec.type, list(task.spec.classes),
                     task_preprocessing(preprocessing, task), net.architecture, net.encoder_args, config.feature_size,
                     {"name": task.name, "modality": task.spec.modality}, window, plans)
    return record, kept


def _settings(config: FinetuneConfig, task: Task, net: _Network, spec: EncoderSpec, seed: int,
              saved: dict[str, Any] | None) -> tuple[FinetuneConfig, dict[str, Any]]:
    """``config`` with its unset settings derived (:func:`dex.downstream.plans.derive`), and the plans block: the
    recipe, the task's fingerprint, each setting's value and source. A budgeted run resumed from ``saved`` keeps
    the schedule its checkpoint chose."""
    if config.budget_minutes and config.recipe == "paper":
        raise ValueError("budget_minutes fits the derived recipe's schedule; the paper's recipe has its fixed epochs "
                         "(give epochs instead)")
    fingerprint_ = fingerprint(task, seed)
    given = {key: getattr(config, key) for key in FinetuneConfig.derived} | {"budget_minutes": config.budget_minutes}
    values, sources = derive(given, config.recipe, task.spec.type, fingerprint_, input_size(net.encoder),
                             pretrained=spec.source not in ("scratch", PEER))
    if spec.source == PEER and values["drop_path"]:  # a peer has no residual blocks to drop
        values["drop_path"], sources["drop_path"] = 0.0, PEER
    if task.spec.type == "classification" and values["fit"] != "resize":
        raise ValueError(f"fit: a classification model takes the whole image resized ('resize'), not "
                         f"{values['fit']!r}")
    if config.budget_minutes and saved is not None and values["epochs"] is None:
        values |= {k: saved["config"][k] for k in ("epochs", "steps_per_epoch", "warmup_epochs")}
        sources |= dict.fromkeys(("epochs", "steps_per_epoch", "warmup_epochs"), "budget (checkpoint)")
    resolved = replace(config, **{k: values[k] for k in FinetuneConfig.derived})
    plans = {"recipe": config.recipe, "fingerprint": fingerprint_, "settings": dict(values),
             "sources": sources, "rules": {k: RULES[k] for k in RULES if sources.get(k) == "derived"}}
    return resolved, plans


def _check_schedule(config: FinetuneConfig) -> None:
    if config.epochs is None or config.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {config.epochs}")
    warning = warmup_warning(config.epochs, config.warmup_epochs)
    if warning:
        log.warning(warning)


def _training_data(task: Task, ids: list[str], preprocessing: Preprocessing, config: FinetuneConfig,
                   seed: int) -> Dataset:
    """Patches (segmentation of the derived recipe, :class:`TaskPatches`) or whole images (:class:`TaskImages`)."""
    if task.spec.type == "segmentation" and config.recipe == "derived":
        return TaskPatches(task, ids, preprocessing, preprocessing.size, config.steps_per_epoch or 1,
                           config.batch_size, config.foreground_oversample, config.augmentation, seed)
    return TaskImages(task, ids, preprocessing, config.augmentation, seed, config.random_erasing or 0.0)


class TrainingLoss:
    """The loss of a training batch: :class:`SegmentationLoss` inside each patch's region, or cross-entropy with
    ``label_smoothing``, or with ``mixup`` / ``cutmix`` timm's :class:`~timm.data.Mixup` of the batch (its labels
    smoothed too) and soft-target cross-entropy."""

    def __init__(self, task: Task, config: FinetuneConfig) -> None:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        self.segmentation, self.mix = task.spec.type == "segmentation", None
        if self.segmentation:
            self.criterion = SegmentationLoss(batch=config.recipe == "derived")
        elif config.mixup or config.cutmix:
            self.mix = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                             label_smoothing=config.label_smoothing or 0.0, num_classes=len(task.spec.classes))
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing or 0.0)

    def __call__(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        images, target = batch["image"].to(device), batch["target"].to(device)
        if self.segmentation:
            roi = batch.get("roi")
            return self.criterion(model(images), target, None if roi is None else roi.to(device))
        if self.mix is not None:
            images, target = self.mix(images, target)
        return self.criterion(model(images), target)


def _loader(train: Dataset, config: FinetuneConfig, seed: int) -> DataLoader:
    """The training batches of an epoch: a patch dataset in its own (seeded) order; whole images shuffled, one pass
    (``steps_per_epoch`` None) or ``steps_per_epoch`` batches drawn without replacement across passes."""
    generator = torch.Generator().manual_seed(seed)
    common = {"batch_size": config.batch_size, "num_workers": config.num_workers, "generator": generator}
    if isinstance(train, TaskPatches):
        return DataLoader(train, shuffle=False, **common)
    if config.steps_per_epoch is None:
        return DataLoader(train, shuffle=True, drop_last=len(train) > config.batch_size, **common)
    sampler = RandomSampler(train, num_samples=config.steps_per_epoch * config.batch_size, generator=generator)
    return DataLoader(train, sampler=sampler, **common)


class _Network(NamedTuple):
    encoder: nn.Module
    model: nn.Module  # the encoder with its head or UNETR decoder, on the device
    architecture: str  # how to build the encoder again (timm), with its arguments
    encoder_args: dict[str, Any]
    encoder_sha256: str  # its weights before fine-tuning


def _network(encoder_spec: EncoderSpec, task: Task, seed: int, config: FinetuneConfig,
             device: torch.device) -> _Network:
    """The encoder as the adaptation wants it (some blocks trainable, frozen, or with LoRA adapters) with the task's
    head or decoder, initialised from ``seed`` whatever the encoder, so that encoders compare paired. A peer
    (:mod:`dex.models.peers`) of another task type, or with the settings of a foundation encoder's adaptation,
    raises a ``ValueError`` naming the encoder."""
    if encoder_spec.source == PEER:
        kind = peer_task_type(encoder_spec.model)
        if kind != task.spec.type:
            raise ValueError(f"encoder {encoder_spec.name!r}: peer {encoder_spec.model!r} is a {kind} network, "
                             f"task {task.name!r} is {task.spec.type}")
        whole = {"trainable_blocks": None, "freeze_encoder": False, "lora_rank": 0, "drop_path": 0.0,
                 "layer_decay": 1.0}  # the values that train the whole network at one rate (None: unset)
        adapted = [f"{key}={getattr(config, key)}" for key, value in whole.items()
                   if getattr(config, key) not in (value, None)]
        if adapted:
            raise ValueError(f"encoder {encoder_spec.name!r}: a peer trains whole from scratch, without "
                             f"{', '.join(adapted)} (settings of foundation encoders)")
    encoder = load_encoder(encoder_spec)
    architecture, encoder_args = encoder_architecture(encoder_spec, encoder)
    encoder_sha256 = state_dict_sha256(encoder.state_dict())
    if config.trainable_blocks is not None:
        freeze_all_but_last(encoder, config.trainable_blocks)
    if config.freeze_encoder:
        encoder.requires_grad_(False)
    if config.lora_rank < 0:
        raise ValueError(f"lora_rank must be 0 (no LoRA) or positive, got {config.lora_rank}")
    if config.lora_rank:
        add_lora(encoder, config.lora_rank, config.lora_alpha)
    torch.manual_seed(seed)  # the same head / decoder initialisation for every encoder: paired comparisons
    return _Network(encoder, build_model(encoder, task, config).to(device), architecture, encoder_args,
                    encoder_sha256)



def _fit(net: _Network, train: Dataset, val: TaskImages, optimizer, config: FinetuneConfig, seed: int,
         device: torch.device, manager: CheckpointManager | None, saved: dict[str, Any] | None,
         window: SlidingWindow | None) -> tuple[dict[str, Any], list[dict]]:
    """Train every epoch left (from the checkpoint ``saved``, if any), validate after each (segmentation: sliding
    windows without mirroring; with ``ema_decay``, the weights' EMA) and keep the best one's weights by
    ``selection_metric``: returns the best epoch (``score``, ``epoch``, ``state``, ``val``) and one history row per
    epoch, each also logged as a progress line (and, on a terminal, a bar over the epoch's steps)."""
    from timm.utils import ModelEmaV3

    loss_of = TrainingLoss(val.task, config)
    loader = _loader(train, config, seed)
    steps_per_epoch = len(loader)
    total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
    validation = replace(window, mirror="none") if window is not None else None
    model = net.model
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema_decay else None
    best = {"score": -math.inf, "epoch": -1, "state": None, "val": None}
    history, step, start = [], 0, 0
    if saved is not None:
        start, step, history, best = _restore(saved, model, optimizer, loader.generator, config, device, ema)
    selection = config.selection_metric
    for epoch in range(start, config.epochs):
        began = time.perf_counter()
        model.train()
        if config.freeze_encoder:  # no dropout, drop-path or router noise in the frozen features
            net.encoder.eval()
        train.epoch = epoch
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", leave=False,
                   disable=not sys.stderr.isatty())  # a bar on a terminal; the epoch's line below in any log
        for batch in bar:
            set_learning_rate(optimizer, warmup_cosine(config.lr, config.min_lr, step, warmup, total))
            losses.append(_step(model, batch, loss_of, optimizer, device))
            step += 1
            if ema is not None:
                ema.update(model, step)
        judged = ema.module if ema is not None else model
        scores = evaluate(judged, val, device, config.batch_size, validation)
        seconds = time.perf_counter() - began
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **{f"val_{k}": v for k, v in scores.items()}})
        value = scores[selection] if math.isfinite(scores[selection]) else -math.inf  # AUROC: NaN with one class
        improved = best["state"] is None or value > best["score"]
        if improved:
            best = {"score": value, "epoch": epoch, "state": copy.deepcopy(judged.state_dict()), "val": scores}
        log.info("epoch %d/%d: loss %.4f, validation %s %.4f%s (%.1f s)", epoch + 1, config.epochs,
                 history[-1]["loss"], selection, scores[selection], " (best)" if improved else "", seconds)
        if manager is not None:
            _save_checkpoint(manager, model, optimizer, loader.generator, epoch + 1, step, history, best, config,
                             device, ema)
    return best, history


def _step(model: nn.Module, batch: dict[str, Any], loss_of: TrainingLoss, optimizer, device: torch.device) -> float:
    """One optimiser step on ``batch``; returns its loss."""
    loss = loss_of(model, batch, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _fit_to_budget(net: _Network, train: Dataset, val: TaskImages, test: TaskImages, optimizer,
                   config: FinetuneConfig, window: SlidingWindow | None, seed: int, device: torch.device,
                   started: float) -> tuple[FinetuneConfig, dict[str, Any]]:
    """The epochs (and steps an epoch) that fit ``config.budget_minutes``, from this machine's speed: three
    training steps timed with their batches' making (after one untimed) on a copy of the model and optimiser, and
    one forward of a batch of windows or images timed, from which the validation and the test are estimated
    (:func:`fit_budget`). The
    global random generators are left as they were, so the run that follows does not depend on the trial."""
    model, trial_optimizer = copy.deepcopy(net.model), copy.deepcopy(optimizer)
    loss_of = TrainingLoss(val.task, config)
    state = rng_state(device)
    if isinstance(train, TaskPatches):  # at least the four batches timed (train_task_model sets the epoch's length)
        train.length = max(train.length, 4 * config.batch_size)
    batches = iter(_loader(train, replace(config, steps_per_epoch=max(4, config.steps_per_epoch or 1)), seed))
    model.train()
    _step(model, next(batches), loss_of, trial_optimizer, device)
    timed = time.perf_counter()
    for _ in range(3):  # the batches made as in training (workers included) and the steps on them
        batch = next(batches)
        _step(model, batch, loss_of, trial_optimizer, device)
    step_seconds = (time.perf_counter() - timed) / 3
    del batches
    model.eval()
    images = batch["image"].to(device)
    timed = time.perf_counter()
    with torch.no_grad():
        model(images)
    per_input = (time.perf_counter() - timed) / len(images)
    set_rng_state(state, device)
    del model, trial_optimizer

    def seconds(data: TaskImages, mirror: str) -> float:
        if window is None:
            return per_input * len(data)
        copies = 2 ** len(MIRROR_AXES[mirror])
        if data.preprocessing.fit == "resize":  # one window: the image resized to the input
            return per_input * copies * len(data)
        return per_input * copies * sum(window_count(_image_size(data, i), window.window, window.overlap)
                                        for i in range(len(data)))

    validation_seconds, test_seconds = seconds(val, "none"), seconds(test, window.mirror if window else "none")
    needed = time.perf_counter() - started + validation_seconds + test_seconds
    if needed > config.budget_minutes * 60:
        log.warning("budget_minutes=%s is less than what the set-up, one validation and the test take on this machine "
                    "(about %.0f s): the run will take longer", config.budget_minutes, needed)
    epochs, steps, warmup = fit_budget(config.budget_minutes, time.perf_counter() - started, step_seconds,
                                       validation_seconds, test_seconds, config.steps_per_epoch or 1)
    if epochs == 1 and steps < (config.steps_per_epoch or 1):
        log.warning("budget_minutes=%s leaves time for %d training step(s) and one validation only",
                    config.budget_minutes, steps)
    budget = {"minutes": config.budget_minutes, "step_seconds": round(step_seconds, 4),
              "forward_seconds_per_input": round(per_input, 5), "validation_seconds": round(validation_seconds, 1),
              "test_seconds": round(test_seconds, 1), "epochs": epochs, "steps_per_epoch": steps}
    log.info("budget of %s min: %d epochs of %d steps (%.2f s a step; validation about %.0f s, test %.0f s)",
             config.budget_minutes, epochs, steps, step_seconds, validation_seconds, test_seconds)
    return replace(config, epochs=epochs, steps_per_epoch=steps, warmup_epochs=warmup), budget


def _image_size(data: TaskImages, index: int) -> tuple[int, int]:
    """(height, width) of a split's image ``index``, from its header."""
    from PIL import Image

    with Image.open(data.task.images[data.ids[index]]) as image:
        return image.height, image.width

def task_preprocessing(preprocessing: Preprocessing, task: Task) -> Preprocessing:
    """The preprocessing a model fine-tuned on ``task`` records: the encoder's, with the task's modality and, for
    images cut from volumes, the Table 2 rule and slice axis that cut them (``task.yaml``), so that ``dex predict``
    cuts a new volume the same way."""
    return replace(preprocessing, modality=task.spec.modality,
                   volume_normalization=task.spec.volume_normalization or "",
                   slice_axis=task.spec.slice_axis or "axial")


def _save_checkpoint(manager: CheckpointManager, model: nn.Module, optimizer, generator: torch.Generator, epoch: int,
                     step: int, history: list[dict], best: dict[str, Any], config: FinetuneConfig,
                     device: torch.device, ema: nn.Module | None = None) -> None:
    manager.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                  "history": history, "best": best, "rng": rng_state(device), "data_order": generator.get_state(),
                  "config": asdict(config), **({"ema": ema.state_dict()} if ema is not None else {})}, epoch)


def _restore(state: dict[str, Any], model: nn.Module, optimizer, generator: torch.Generator, config: FinetuneConfig,
             device: torch.device, ema: nn.Module | None = None) -> tuple[int, int, list[dict], dict[str, Any]]:
    """The position of a fine-tuning checkpoint (epoch, step, history, best epoch so far), with the model, its EMA,
    optimiser, data order and generators restored."""
    try:
        check_same_settings(state["config"], config, state["path"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        generator.set_state(state["data_order"])
        set_rng_state(state["rng"], device)
        return state["epoch"], state["step"], state["history"], state["best"]
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"{state.get('path')}: not a checkpoint of this fine-tuning run ({err})") from err


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a model's weights: SHA-256 over the tensors' names, dtypes, shapes and bytes in name
    order (the same for the same weights whatever file holds them)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
