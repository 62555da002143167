"""Downstream metrics: macro-F1 (the paper's classification score), accuracy, balanced accuracy and AUROC from
torchmetrics; DSC (Dice) of the foreground classes at the original mask resolution, per slice and per case (the
slices of one volume scored as one 3D volume).

Dice follows the Medical Segmentation Decathlon: 2|P∩T| / (|P| + |T|), so a non-empty prediction on an empty
ground truth scores 0, and an empty prediction on an empty ground truth scores 1 (MONAI's ``compute_dice`` with
``ignore_empty=False``, against which it is tested). Scores are averaged over images (or cases) for each class,
then over classes. nnU-Net's own evaluation differs in one point: it leaves a case out of a class's mean when
prediction and truth are both empty."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
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


def bootstrap_indices(count: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """[resamples, count] indices drawn with replacement by NumPy's generator seeded by ``seed``."""
    return np.random.default_rng(seed).integers(0, count, (resamples, count))


def percentile_intervals(draws: dict[str, np.ndarray], level: float = 0.95) -> dict[str, list[float]]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of each metric's [resamples] draws (NaN draws, e.g.
    AUROC of a resample with one class, left out; NaN when every draw is)."""
    intervals = {}
    for name, values in draws.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[~np.isnan(values)]
        low, high = (np.quantile(values, [(1 - level) / 2, (1 + level) / 2]) if values.size else (math.nan,) * 2)
        intervals[name] = [float(low), float(high)]
    return intervals


def bootstrap_intervals(statistics: Callable[[np.ndarray], dict[str, float]], count: int, resamples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals: ``statistics`` of each of :func:`bootstrap_indices`' draws, then
    :func:`percentile_intervals`."""
    draws = [statistics(indices) for indices in bootstrap_indices(count, resamples, seed)]
    return percentile_intervals({name: np.array([d[name] for d in draws]) for name in draws[0]}, level)


def classification_metric_draws(logits: Tensor, target: Tensor, indices: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`classification_metrics` of every row of ``indices`` [R, n] (a resample of the N images) at once, as
    [R] arrays, by the same rules as torchmetrics: macro F1 and macro recall over the classes that occur among the
    true or predicted labels, macro one-vs-rest AUROC over every class (0 for a class without positives; NaN for a
    resample with one class), ties ranked by their mean rank."""
    from scipy.stats import rankdata

    probs = logits.float().softmax(1).numpy().astype(np.float64)
    truth, classes = target.numpy(), probs.shape[1]
    pred = probs.argmax(1)
    resamples = len(indices)
    cells = (np.arange(resamples)[:, None] * classes * classes + truth[indices] * classes + pred[indices]).ravel()
    confusion = np.bincount(cells, minlength=resamples * classes * classes).reshape(resamples, classes, classes)
    tp = np.diagonal(confusion, axis1=1, axis2=2).astype(np.float64)
    fp, fn = confusion.sum(1) - tp, confusion.sum(2) - tp
    counted = (tp + fp + fn) > 0
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    positives = np.stack([(truth[indices] == c).sum(1) for c in range(classes)], 1)  # [R, C]
    auroc = np.zeros((resamples, classes))
    for c in range(classes):
        ranks = rankdata(probs[indices, c], axis=1)
        is_c = truth[indices] == c
        n_pos, n_neg = positives[:, c], indices.shape[1] - positives[:, c]
        u = (ranks * is_c).sum(1) - n_pos * (n_pos + 1) / 2
        auroc[:, c] = np.divide(u, n_pos * n_neg, out=np.zeros(resamples), where=(n_pos * n_neg) > 0)
    return {
        "f1_macro": (f1 * counted).sum(1) / counted.sum(1),
        "accuracy": tp.sum(1) / indices.shape[1],
        "balanced_accuracy": (recall * counted).sum(1) / counted.sum(1),
        "auroc": np.where((positives > 0).sum(1) > 1, auroc.mean(1), np.nan),
    }


def classification_intervals(logits: Tensor, target: Tensor, resamples: int = 1000,
                             seed: int = 0) -> dict[str, list[float]]:
    """95% bootstrap intervals of :func:`classification_metrics`, resampling the images (all resamples at once,
    :func:`classification_metric_draws`)."""
    return percentile_intervals(classification_metric_draws(logits, target,
                                                            bootstrap_indices(len(target), resamples, seed)))


def score_draws(outputs: dict, score_name: str, indices: np.ndarray) -> np.ndarray:
    """[R] the score of each bootstrap resample ``indices`` [R, N] of a record's ``test_outputs`` (labels and
    probabilities, or per-image Dice [N, C-1]: the mean over images, then classes)."""
    if "probabilities" in outputs:
        logits = torch.tensor(outputs["probabilities"]).clamp_min(1e-12).log()
        return classification_metric_draws(logits, torch.tensor(outputs["labels"]), indices)[score_name]
    return np.asarray(outputs["dice"], dtype=np.float64)[indices].mean(1).mean(-1)


def score_interval(outputs: dict, score_name: str, resamples: int = 1000, seed: int = 0,
                   level: float = 0.95) -> list[float] | None:
    """The percentile bootstrap interval of a record's test score from its ``test_outputs``; None without them."""
    if not outputs or not outputs.get("ids"):
        return None
    indices = bootstrap_indices(len(outputs["ids"]), resamples, seed)
    return percentile_intervals({"score": score_draws(outputs, score_name, indices)}, level)["score"]


def paired_gain_interval(baseline: dict, other: dict, score_name: str, resamples: int = 1000, seed: int = 0,
                         level: float = 0.95) -> list[float] | None:
    """The paired bootstrap interval of ``other``'s gain in ``score_name`` over ``baseline`` on the same test
    images: both scored on each of the same resamples of the images, the percentile interval of the differences.
    ``baseline`` and ``other`` are records' ``test_outputs`` (:func:`score_draws`); None when they are not of the
    same images in the same order."""
    if baseline.get("ids") != other.get("ids") or not baseline.get("ids"):
        return None
    indices = bootstrap_indices(len(baseline["ids"]), resamples, seed)
    gains = score_draws(other, score_name, indices) - score_draws(baseline, score_name, indices)
    return percentile_intervals({"gain": gains}, level)["gain"]


def label_map(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """[C, h, w] logits or probabilities at the model's resolution -> the [H, W] label map at ``size``: resized
    (bilinear) before the argmax, as the Dice of fine-tuning scores it and as ``dex predict`` writes it."""
    resized = F.interpolate(scores[None].float(), size=size, mode="bilinear", align_corners=False)
    return resized[0].argmax(0)


def segmentation_case_metrics(pred: np.ndarray, truth: np.ndarray, num_classes: int,
                              spacing: Sequence[float]) -> tuple[list[float], list[float]]:
    """Dice and HD95 of each foreground class (1 .. C-1) between the label arrays of one case, 2D [H, W] or 3D
    [Z, Y, X], by MONAI: ``compute_dice`` (1 when the class is absent from both, 0 when from one only: the Decathlon
    rule of :func:`dice_from_counts`) and ``compute_hausdorff_distance`` at the 95th percentile in the units of
    ``spacing`` (mm per axis; NaN when the class is absent from either, as MONAI gives it)."""
    from monai.metrics import compute_dice, compute_hausdorff_distance  # deferred: MONAI is slow to import

    def one_hot(labels: np.ndarray) -> Tensor:
        return F.one_hot(torch.from_numpy(labels.astype(np.int64)), num_classes).movedim(-1, 0)[None].float()

    predicted, target = one_hot(pred), one_hot(truth)
    dice = compute_dice(predicted, target, include_background=False, ignore_empty=False)[0]
    with warnings.catch_warnings():  # MONAI warns about each empty class; NaN says it
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(predicted, target, include_background=False, percentile=95,
                                          spacing=[float(v) for v in spacing])[0]
    hd95 = torch.where(torch.isinf(hd95), torch.nan, hd95)
    return [float(v) for v in dice], [float(v) for v in hd95]


def dice_from_counts(counts: Tensor) -> Tensor:
    """[3, ...] counts |P∩T|, |P|, |T| -> [...] Dice by the Decathlon rule (1 where prediction and truth are both
    empty)."""
    intersection, predicted, truth = counts
    total = predicted + truth
    return torch.where(total > 0, 2 * intersection / total.clamp_min(1), 1.0)


class DiceAccumulator:
    """Dice of each foreground class by the Decathlon rule, per image (pooled as the mean over images for each
    class, then over classes) and, for images added with their case, per case: the counts |P∩T|, |P|, |T| summed
    over a case's slices are those of the stacked volume, so its 3D Dice needs no volume in memory."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes, self.scores, self.present = num_classes, [], []  # present: [C - 1] truth non-empty
        self.cases: dict[str, Tensor] = {}  # case -> [3, C - 1] counts summed over its slices

    def add(self, logits: Tensor, target: Tensor, case: str | None = None, roi: Tensor | None = None) -> None:
        """[C, h, w] logits at the model's resolution and the [H, W] original mask: the logits are resized
        (bilinear) to the mask's size before the argmax. ``case``: the volume the slice belongs to, if any.
        ``roi``: an [H, W] region of interest (true inside); pixels outside it are not counted."""
        classes = torch.arange(1, self.num_classes)[:, None, None]
        pred, truth = label_map(logits, tuple(target.shape))[None] == classes, target[None].long() == classes
        if roi is not None:
            inside = torch.as_tensor(roi, dtype=torch.bool)[None]
            pred, truth = pred & inside, truth & inside
        counts = torch.stack([(pred & truth).sum((1, 2)), pred.sum((1, 2)), truth.sum((1, 2))]).double()
        self.scores.append(dice_from_counts(counts))
        self.present.append(counts[2] > 0)
        if case is not None:
            self.cases[case] = self.cases.get(case, 0) + counts

    def value(self) -> float:
        """Slice Dice: the mean over images for each class, then over classes."""
        return float(torch.stack(self.scores).mean(0).mean())

    def value_3d(self) -> float:
        """Per-case 3D Dice: the mean over cases for each class, then over classes."""
        return float(dice_from_counts(torch.stack(list(self.cases.values()), 1)).mean(0).mean())


def trivial_outputs(outputs: dict) -> dict | None:
    """The test outputs a trivial predictor gives on the same test images as a record's ``test_outputs``: background
    everywhere for segmentation (by the Decathlon rule, Dice 1 for a class absent from an image, 0 where present),
    the majority class of the test labels for classification (the best constant answer). None for outputs that lack
    what it needs (records older than the trivial rows)."""
    if "probabilities" in outputs:
        labels = np.asarray(outputs["labels"])
        classes = len(outputs["probabilities"][0])
        constant = np.eye(classes)[np.bincount(labels, minlength=classes).argmax()]
        return {"ids": outputs["ids"], "labels": outputs["labels"], "probabilities": [constant.tolist()] * len(labels)}
    if "present" not in outputs:
        return None
    return {"ids": outputs["ids"], "dice": (1.0 - np.asarray(outputs["present"], dtype=np.float64)).tolist()}


def trivial_score(outputs: dict, score_name: str) -> float | None:
    """The ``score_name`` of :func:`trivial_outputs` on a record's test images, by the rules of the record's own
    score: ``dice`` per image, ``dice_3d`` per case (from ``case_present``), classification metrics as
    :func:`classification_metric_draws` computes them. None where the outputs lack what it needs."""
    if score_name == "dice_3d":
        if "case_present" not in outputs:
            return None
        return float((1.0 - np.asarray(list(outputs["case_present"].values()), dtype=np.float64)).mean(0).mean())
    trivial = trivial_outputs(outputs)
    return None if trivial is None else float(score_draws(trivial, score_name, np.arange(len(trivial["ids"]))[None])[0])


def chance_f1_macro(labels: Sequence[int], classes: int) -> float:
    """The macro F1 a uniform random guess among ``classes`` is expected to score on test images of ``labels``, in
    the limit of many images: for a class of share p, precision p and recall 1 / classes, so F1 = 2p / (1 +
    classes p); averaged over every class (torchmetrics' macro average counts the classes among the true or
    predicted labels, and a random guess predicts every class; an absent class scores 0)."""
    counts = np.bincount(np.asarray(labels), minlength=classes)
    share = counts / counts.sum()
    return float(np.sum(2 * share / (1 + classes * share)) / classes)
