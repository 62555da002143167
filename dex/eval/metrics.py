"""Downstream metrics: macro-F1 (the paper's classification score), accuracy, balanced accuracy and AUROC from
torchmetrics; DSC (Dice) averaged over foreground classes, at the original mask resolution, with MONAI."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from torch import Tensor
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_f1_score,
    multiclass_recall,
)


def classification_metrics(logits: Tensor, target: Tensor) -> dict[str, float]:
    """[N, C] logits, [N] class indices -> macro F1, accuracy, balanced accuracy (macro recall), macro AUROC."""
    classes = logits.shape[1]
    probs = logits.float().softmax(1)
    preds = probs.argmax(1)
    present = int(target.unique().numel())  # AUROC needs positives and negatives: NaN with one class only
    return {
        "f1_macro": float(multiclass_f1_score(preds, target, classes, average="macro")),
        "accuracy": float(multiclass_accuracy(preds, target, classes, average="micro")),
        "balanced_accuracy": float(multiclass_recall(preds, target, classes, average="macro")),
        "auroc": float(multiclass_auroc(probs, target, classes, average="macro")) if present > 1 else math.nan,
    }


class DiceAccumulator:
    """Per-image Dice of each foreground class (NaN where the class is absent from the ground truth), pooled as
    the mean over images for each class, then over classes."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes, self.scores = num_classes, []

    def add(self, logits: Tensor, target: Tensor) -> None:
        """[C, h, w] logits at the model's resolution and the [H, W] original mask: the logits are resized
        (bilinear) to the mask's size before the argmax."""
        logits = F.interpolate(logits[None].float(), size=target.shape, mode="bilinear", align_corners=False)
        pred = F.one_hot(logits.argmax(1), self.num_classes).permute(0, 3, 1, 2)
        truth = F.one_hot(target[None].long(), self.num_classes).permute(0, 3, 1, 2)
        self.scores.append(compute_dice(pred, truth, include_background=False, ignore_empty=True)[0])

    def value(self) -> float:
        per_class = torch.stack(self.scores).nanmean(0)
        return float(per_class.nanmean())
