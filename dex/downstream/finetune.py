"""Fine-tuning an encoder on a task with the paper's protocol (App. C.2.2): a classification head on the class token
(cross-entropy) or a 2D UNETR (Dice + cross-entropy), AdamW at 1e-4 with a linear warm-up then cosine, every
parameter trained unless the adaptation says otherwise. The model of the best validation epoch is tested.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from dex.checkpoint import CheckpointManager, check_same_settings, rng_state, set_rng_state
from dex.config import STRICT
from dex.data.preprocess import Preprocessing
from dex.data.tasks import Task, mask_labels
from dex.downstream.encoders import (
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
from dex.downstream.task_model import TaskModel
from dex.models.unetr import UNETR2D
from dex.schedules import warmup_cosine
from dex.seeding import seed_everything


@STRICT
@dataclass
class FinetuneConfig:
    epochs: int = 100
    warmup_epochs: int = 10
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    batch_size: int = 16
    data_fraction: float = 1.0  # share of the training split used (Fig. 5-b)
    trainable_blocks: int | None = None  # train only the last n encoder blocks (Fig. 5-c); None: all
    freeze_encoder: bool = False  # train the head or UNETR decoder on a frozen encoder (kept in eval mode)
    lora_rank: int = 0  # > 0: a frozen encoder with LoRA adapters of this rank on attention (dex.downstream.lora)
    lora_alpha: float = 16.0
    feature_size: int = 16  # UNETR
    flip: bool = True  # random horizontal flips in training
    device: str = "auto"
    num_workers: int = 0
    #: the settings a run may resume with changed: where and how it runs, never what it computes
    resume_free: ClassVar[tuple[str, ...]] = ("device", "num_workers")


class TaskImages(Dataset):
    """A split of a task: images read by ``preprocessing`` (a :class:`Preprocessing`, or an int: the default one at
    that square size); masks resized to the same size with nearest neighbours."""

    def __init__(self, task: Task, ids: list[str], preprocessing: Preprocessing | int, flip: bool = False,
                 seed: int = 0) -> None:
        self.preprocessing = preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing(
            size=preprocessing)
        self.task, self.ids, self.flip, self.seed, self.epoch = task, ids, flip, seed, 0

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, item: str) -> torch.Tensor:
        return self.preprocessing.read(self.task.images[item])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.ids[index]
        image = self.image(item)
        if self.task.spec.type == "segmentation":
            target = torch.from_numpy(mask_labels(self.task, item))
            target = TF.resize(target[None], list(self.preprocessing.size),
                               interpolation=TF.InterpolationMode.NEAREST)[0]
        else:
            target = torch.tensor(self.task.labels[item])
        if self.flip and np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5:
            image = image.flip(-1)
            if target.ndim:
                target = target.flip(-1)
        return {"image": image, "target": target, "index": index}


def build_model(encoder: nn.Module, task: Task, config: FinetuneConfig) -> nn.Module:
    classes = len(task.spec.classes)
    if task.spec.type == "segmentation":
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


@torch.no_grad()
def _collect(model: nn.Module, data: TaskImages, device: torch.device,
             batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | DiceAccumulator:
    """Classification: the logits and targets of every image; segmentation: the Dice counts of every image."""
    model.eval()
    task = data.task
    loader = DataLoader(data, batch_size=batch_size)
    if task.spec.type == "classification":
        logits, targets = [], []
        for batch in loader:
            logits.append(model(batch["image"].to(device)).cpu())
            targets.append(batch["target"])
        return torch.cat(logits), torch.cat(targets)
    dice = DiceAccumulator(len(task.spec.classes))
    for batch in loader:
        logits = model(batch["image"].to(device)).cpu()
        for row, index in zip(logits, batch["index"].tolist()):
            item = data.ids[index]
            dice.add(row, torch.from_numpy(mask_labels(task, item)), task.cases[item][0] if task.cases else None)
    return dice


def _scores(collected: tuple[torch.Tensor, torch.Tensor] | DiceAccumulator) -> dict[str, float]:
    if isinstance(collected, tuple):
        return classification_metrics(*collected)
    scores = {"dice": collected.value()}
    if collected.cases:
        scores["dice_3d"] = collected.value_3d()
    return scores


def evaluate(model: nn.Module, data: TaskImages, device: torch.device, batch_size: int) -> dict[str, float]:
    """Classification metrics, or DSC over foreground classes computed at each mask's original resolution:
    ``dice`` per slice and, for a task whose images are slices of cases (``cases.csv``), ``dice_3d`` per case."""
    return _scores(_collect(model, data, device, batch_size))


def evaluate_test(model: nn.Module, data: TaskImages, device: torch.device, batch_size: int, resamples: int = 0,
                  seed: int = 0) -> tuple[dict[str, float], dict[str, list[float]], dict[str, Any]]:
    """:func:`evaluate`'s metrics with :func:`scores_with_intervals` and the per-image outputs of
    :func:`per_image_outputs`."""
    collected = _collect(model, data, device, batch_size)
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
    the class probabilities (classification), or the Dice of each foreground class (segmentation)."""
    if isinstance(collected, tuple):
        logits, targets = collected
        return {"ids": list(ids), "labels": targets.tolist(),
                "probabilities": np.round(logits.float().softmax(1).numpy(), 6).tolist()}
    return {"ids": list(ids), "dice": np.round(torch.stack(collected.scores).numpy(), 6).tolist()}


def finetune(encoder_spec: EncoderSpec, task: Task, seed: int, config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune ``encoder_spec`` on ``task`` with ``seed``; returns the run's record (validation and test
    metrics of the best validation epoch, the settings, the time taken). :func:`train_task_model` also gives the
    model."""
    return train_task_model(encoder_spec, task, seed, config)[0]


def train_task_model(encoder_spec: EncoderSpec, task: Task, seed: int, config: FinetuneConfig,
                     checkpoints: str | Path | None = None, bootstrap: int = 0) -> tuple[dict[str, Any], TaskModel]:
    """Fine-tune ``encoder_spec`` on ``task`` with ``seed``: the run's record (see :func:`finetune`) and the model
    of the best validation epoch as a :class:`TaskModel` (on the CPU, in eval mode), ready to save.

    With ``checkpoints`` (a folder), the state after every epoch (weights, optimiser, the best epoch so far, the
    history, the random generators and the data order) is kept there (:class:`dex.checkpoint.CheckpointManager`, the
    last one), and a run that finds one goes on from it: a run stopped and resumed ends as one that was not (on a
    CPU, bit for bit); one written with other settings is refused (only ``FinetuneConfig.resume_free`` may differ).
    ``bootstrap``: resamples of the test metrics' 95% intervals (``test_intervals`` of the record; none with 0, the
    benchmark's default: a thousand resamples of the classification metrics take seconds)."""
    started = time.perf_counter()
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    seed_everything(seed, device)
    net = _network(encoder_spec, task, seed, config, device)
    preprocessing = encoder_preprocessing(encoder_spec, net.encoder)
    train = TaskImages(task, train_subset(task, config.data_fraction, seed), preprocessing, config.flip,
                       seed)
    val, test = (TaskImages(task, task.splits[split], preprocessing) for split in ("val", "test"))
    if not len(train) or not len(val) or not len(test):
        raise ValueError(f"{task.root}: every split needs images (train {len(train)}, val {len(val)}, "
                         f"test {len(test)})")
    params = [p for p in net.model.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    score_name = "dice" if task.spec.type == "segmentation" else "f1_macro"
    best, history = _fit(net, train, val, optimizer, score_name, config, seed, device, checkpoints)
    model = net.model
    model.load_state_dict(best["state"])
    test_scores, test_intervals, outputs = evaluate_test(model, test, device, config.batch_size, bootstrap, seed)
    record = {
        "task": task.name, "modality": task.spec.modality, "type": task.spec.type, "encoder": encoder_spec.name,
        "seed": seed, "score_name": score_name, "best_epoch": best["epoch"], "val": best["val"],
        "test": test_scores, "test_intervals": test_intervals, "encoder_spec": asdict(encoder_spec),
        "encoder_sha256": net.encoder_sha256, "config": asdict(config), "train_images": len(train),
        "split_images": {"train": len(train), "val": len(val), "test": len(test)},
        "trainable_parameters": sum(p.numel() for p in params), "history": history, "test_outputs": outputs,
        "seconds": time.perf_counter() - started,
    }
    if config.lora_rank:
        merge_lora(model)
    kept = TaskModel(model.cpu().eval(), task.spec.type, list(task.spec.classes),
                     task_preprocessing(preprocessing, task), net.architecture, net.encoder_args, config.feature_size,
                     {"name": task.name, "modality": task.spec.modality})
    return record, kept


class _Network(NamedTuple):
    encoder: nn.Module
    model: nn.Module  # the encoder with its head or UNETR decoder, on the device
    architecture: str  # how to build the encoder again (timm), with its arguments
    encoder_args: dict[str, Any]
    encoder_sha256: str  # its weights before fine-tuning


def _network(encoder_spec: EncoderSpec, task: Task, seed: int, config: FinetuneConfig,
             device: torch.device) -> _Network:
    """The encoder as the adaptation wants it (some blocks trainable, frozen, or with LoRA adapters) with the task's
    head or decoder, initialised from ``seed`` whatever the encoder, so that encoders compare paired."""
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


def _fit(net: _Network, train: TaskImages, val: TaskImages, optimizer, score_name: str, config: FinetuneConfig,
         seed: int, device: torch.device, checkpoints: str | Path | None) -> tuple[dict[str, Any], list[dict]]:
    """Train every epoch left (from the checkpoint in ``checkpoints``, if any), validate after each and keep the best
    one's weights: returns the best epoch (``score``, ``epoch``, ``state``, ``val``) and one history row per
    epoch."""
    segmentation = train.task.spec.type == "segmentation"
    criterion = DiceCELoss(to_onehot_y=True, softmax=True) if segmentation else nn.CrossEntropyLoss()
    loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, drop_last=len(train) > config.batch_size,
                        num_workers=config.num_workers, generator=torch.Generator().manual_seed(seed))
    total, warmup = config.epochs * len(loader), config.warmup_epochs * len(loader)
    best = {"score": -math.inf, "epoch": -1, "state": None, "val": None}
    history, step, start = [], 0, 0
    manager = CheckpointManager(checkpoints, keep=1) if checkpoints is not None else None
    saved = manager.load_latest() if manager is not None else None
    if saved is not None:
        start, step, history, best = _restore(saved, net.model, optimizer, loader.generator, config, device)
    model = net.model
    for epoch in range(start, config.epochs):
        model.train()
        if config.freeze_encoder:  # no dropout, drop-path or router noise in the frozen features
            net.encoder.eval()
        train.epoch = epoch
        losses = []
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(config.lr, config.min_lr, step, warmup, total)
            images, target = batch["image"].to(device), batch["target"].to(device)
            logits = model(images)
            loss = criterion(logits, target[:, None]) if segmentation else criterion(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
        scores = evaluate(model, val, device, config.batch_size)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **{f"val_{k}": v for k, v in scores.items()}})
        if scores[score_name] > best["score"]:
            best = {"score": scores[score_name], "epoch": epoch, "state": copy.deepcopy(model.state_dict()),
                    "val": scores}
        if manager is not None:
            _save_checkpoint(manager, model, optimizer, loader.generator, epoch + 1, step, history, best, config,
                             device)
    return best, history


def task_preprocessing(preprocessing: Preprocessing, task: Task) -> Preprocessing:
    """The preprocessing a model fine-tuned on ``task`` records: the encoder's, with the task's modality and, for
    images cut from volumes, the Table 2 rule and slice axis that cut them (``task.yaml``), so that ``dex predict``
    cuts a new volume the same way."""
    return replace(preprocessing, modality=task.spec.modality,
                   volume_normalization=task.spec.volume_normalization or "",
                   slice_axis=task.spec.slice_axis or "axial")


def _save_checkpoint(manager: CheckpointManager, model: nn.Module, optimizer, generator: torch.Generator, epoch: int,
                     step: int, history: list[dict], best: dict[str, Any], config: FinetuneConfig,
                     device: torch.device) -> None:
    manager.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                  "history": history, "best": best, "rng": rng_state(device), "data_order": generator.get_state(),
                  "config": asdict(config)}, epoch)


def _restore(state: dict[str, Any], model: nn.Module, optimizer, generator: torch.Generator, config: FinetuneConfig,
             device: torch.device) -> tuple[int, int, list[dict], dict[str, Any]]:
    """The position of a fine-tuning checkpoint (epoch, step, history, best epoch so far), with the model, optimiser,
    data order and generators restored."""
    try:
        check_same_settings(state["config"], config, state["path"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
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
