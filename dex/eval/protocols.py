"""Frozen-feature protocols of ``dex benchmark`` (``protocols:`` in a suite): the encoder is never trained, its
features of each split are computed once (:mod:`dex.eval.features`, cached) and classifiers are fitted on them
(:mod:`dex.eval.probes`), the way foundation models are compared (DINOv2: linear and kNN; RETFound, M-IDoL: linear
probing; MedMoE: linear probes at a fraction of the labels).

- ``linear``: a logistic regression on the training split's features, its L2 strength chosen on the validation
  split, tested on the test split (one record, variant ``linear``);
- ``knn``: the temperature-weighted kNN vote of DINO for each ``k`` of ``knn_k`` (variants ``knn-k10``,
  ``knn-k20``); no fitting, so validation and test are scored alike;
- ``fewshot``: for each ``n`` of ``fewshot_n``, ``fewshot_draws`` draws of n training images per class, the linear
  protocol on each drawn set (its L2 strength chosen on the full validation split), the test metrics' mean and
  standard deviation over the draws (variants ``fewshot-1``, ``fewshot-5``, ``fewshot-10``).

``data_fraction`` < 1 fits every probe on that share of the training split (the same seeded subset fine-tuning's
``data_fraction`` takes; MedMoE's linear probes at 1 % and 10 % of the labels); validation and test stay whole.

They apply to classification tasks; on a segmentation task ``linear`` is DINOv2's linear segmentation: a batch
norm and linear head on each frozen patch token, its logits upsampled to the mask
(:func:`dex.eval.probes.fit_patch_classifier`), the learning rate of best validation Dice kept, scored by Dice as
fine-tuning scores it. Each record has the fields of a fine-tuning record that the reports read (task, modality,
type, seed, score_name, val, test, and the test metrics' 95% bootstrap intervals; few-shot: the standard deviation
over draws instead) and names its ``protocol``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from dex.config import STRICT
from dex.data.tasks import SPLITS, Task, mask_labels
from dex.downstream.encoders import EncoderSpec, encoder_preprocessing, load_encoder
from dex.downstream.finetune import per_image_outputs, scores_with_intervals, state_dict_sha256, train_subset
from dex.downstream.metrics import DiceAccumulator, classification_metrics
from dex.eval.features import split_features
from dex.eval.probes import (
    KNN_TEMPERATURE,
    LINEAR_C,
    SEGMENTATION_LR,
    fewshot_indices,
    fit_patch_classifier,
    knn_probabilities,
    linear_probe,
    patch_logits,
)
from dex.models.backbones import token_grid
from dex.seeding import seed_everything

PROTOCOLS = ("finetune", "linear", "knn", "fewshot", "lora", "frozen-unetr")
FROZEN_PROTOCOLS = ("linear", "knn", "fewshot")
SCORE = "f1_macro"


@STRICT
@dataclass
class ProbeConfig:
    """``probe:`` in a suite: the settings of the frozen protocols, and the adapters of the ``lora`` protocol
    (fine-tuning's settings otherwise)."""

    features: Literal["cls", "mean", "both"] = "both"  # class token, mean patch token, or both concatenated
    linear_c: list[float] = field(default_factory=lambda: list(LINEAR_C))
    knn_k: list[int] = field(default_factory=lambda: [10, 20])
    knn_temperature: float = KNN_TEMPERATURE
    fewshot_n: list[int] = field(default_factory=lambda: [1, 5, 10])
    fewshot_draws: int = 5
    batch_size: int = 64  # images per forward pass of the feature extraction
    bootstrap: int = 1000  # resamples of the test images for the 95% intervals (0: none)
    device: str = "cpu"
    segmentation_lr: list[float] = field(default_factory=lambda: list(SEGMENTATION_LR))  # linear, segmentation
    segmentation_epochs: int = 20
    lora_rank: int = 8  # the lora protocol: fine-tuning's settings with these adapters (dex.downstream.lora)
    lora_alpha: float = 16.0
    data_fraction: float = 1.0  # share of the training split the probes are fitted on (an ablation's values)

    def __post_init__(self) -> None:
        if (self.fewshot_draws < 1 or any(n < 1 for n in self.fewshot_n) or any(k < 1 for k in self.knn_k)
                or self.lora_rank < 1):
            raise ValueError("probe: fewshot_draws, fewshot_n, knn_k and lora_rank must be positive")
        if not 0 < self.data_fraction <= 1:
            raise ValueError(f"probe: data_fraction must be in (0, 1], got {self.data_fraction}")


def protocol_variants(protocol: str, config: ProbeConfig) -> list[str]:
    """The records a frozen protocol makes (see the module's docstring)."""
    if protocol == "linear":
        return ["linear"]
    if protocol == "knn":
        return [f"knn-k{k}" for k in config.knn_k]
    if protocol == "fewshot":
        return [f"fewshot-{n}" for n in config.fewshot_n]
    raise ValueError(f"{protocol!r} is not a frozen protocol ({', '.join(FROZEN_PROTOCOLS)})")


def _metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return classification_metrics(torch.from_numpy(probs).clamp_min(1e-12).log(), torch.from_numpy(labels))


def run_frozen(spec: EncoderSpec, task: Task, seed: int, variants: list[str], config: ProbeConfig,
               cache: str | Path | None) -> dict[str, dict[str, Any]]:
    """The records of ``variants`` (of :func:`protocol_variants`; a segmentation task: ``["linear"]``) for ``spec``
    on ``task``: one feature pass per split (or none, from ``cache``), then every classifier."""
    if task.spec.type != "classification" and variants != ["linear"]:
        raise ValueError(f"{task.name}: a segmentation task takes the linear protocol only, not {variants}")
    started = time.perf_counter()
    seed_everything(seed, config.device)  # a scratch encoder is the seed's, as in fine-tuning, whatever ran before
    encoder = load_encoder(spec).to(config.device).eval()
    sha256 = state_dict_sha256(encoder.state_dict())
    preprocessing = encoder_preprocessing(spec, encoder)
    # an ablation's top_k or mode changes the features, not the weights: both belong to the cache key
    runs_as = "".join(f"|{k}={getattr(spec, k)}" for k in ("mode", "top_k") if getattr(spec, k) is not None)
    splits = {name: split_features(encoder, sha256 + runs_as, task, name, preprocessing, cache, config.batch_size,
                                   config.device) for name in SPLITS}
    if config.data_fraction < 1:
        splits["train"] = splits["train"].subset(train_subset(task, config.data_fraction, seed))
    feature_seconds = time.perf_counter() - started
    if task.spec.type == "segmentation":
        grid = token_grid(encoder)
        return {"linear": _linear_segmentation(spec, task, seed, config, sha256, splits, preprocessing, grid, started,
                                               feature_seconds)}
    x = {name: split.matrix(config.features) for name, split in splits.items()}
    y = {name: split.labels for name, split in splits.items()}
    classes = len(task.spec.classes)

    def score(probs: np.ndarray, labels: np.ndarray) -> float:
        return _metrics(probs, labels)[SCORE]

    records = {}
    for variant in variants:
        fit_started = time.perf_counter()
        extra: dict[str, Any] = {}
        if variant == "linear":
            val_probs, test_probs, c = linear_probe(x["train"], y["train"], x["val"], y["val"], x["test"], classes,
                                                    score, config.linear_c, seed)
            extra["chosen"] = {"C": c}
        elif variant.startswith("knn-k"):
            k = int(variant.removeprefix("knn-k"))
            val_probs, test_probs = (knn_probabilities(x["train"], y["train"], x[name], classes, k,
                                                       config.knn_temperature) for name in ("val", "test"))
        elif variant.startswith("fewshot-"):
            n = int(variant.removeprefix("fewshot-"))
            draws = []
            for chosen in fewshot_indices(y["train"], n, config.fewshot_draws, seed):
                val_probs, test_probs, c = linear_probe(x["train"][chosen], y["train"][chosen], x["val"], y["val"],
                                                        x["test"], classes, score, config.linear_c, seed)
                draws.append((_metrics(val_probs, y["val"]), _metrics(test_probs, y["test"]), c, len(chosen)))
            records[variant] = _record(spec, task, seed, variant, config, sha256, splits, started, feature_seconds,
                                       fit_started, _mean(d[0] for d in draws), _mean(d[1] for d in draws), {},
                                       {"test_std": _std(d[1] for d in draws), "draws": len(draws),
                                        "train_images": draws[0][3], "chosen": {"C": [d[2] for d in draws]}})
            continue
        else:
            raise ValueError(f"unknown frozen protocol variant {variant!r}")
        collected = (torch.from_numpy(test_probs).clamp_min(1e-12).log(), torch.from_numpy(y["test"]))
        test, intervals = scores_with_intervals(collected, config.bootstrap, seed)
        extra["test_outputs"] = per_image_outputs(collected, splits["test"].ids)
        records[variant] = _record(spec, task, seed, variant, config, sha256, splits, started, feature_seconds,
                                   fit_started, _metrics(val_probs, y["val"]), test, intervals, extra)
    return records


def _linear_segmentation(spec, task, seed, config, sha256, splits, preprocessing, grid, started,
                         feature_seconds) -> dict[str, Any]:
    """The linear protocol on a segmentation task (see the module's docstring): patch tokens on ``grid``."""
    fit_started = time.perf_counter()
    size = list(preprocessing.size)
    masks = np.stack([TF.resize(torch.from_numpy(mask_labels(task, i))[None], size,
                                interpolation=TF.InterpolationMode.NEAREST)[0].numpy() for i in splits["train"].ids])
    classes = len(task.spec.classes)

    def dice(head, split) -> DiceAccumulator:
        accumulator = DiceAccumulator(classes)
        with torch.no_grad():
            logits = patch_logits(head, torch.from_numpy(splits[split].patches), grid)
        for item, row in zip(splits[split].ids, logits):
            accumulator.add(row, torch.from_numpy(mask_labels(task, item)), task.cases[item][0] if task.cases else None)
        return accumulator

    best = None
    for lr in config.segmentation_lr:
        head = fit_patch_classifier(splits["train"].patches, masks, grid, classes, lr, config.segmentation_epochs,
                                    seed=seed)
        value = dice(head, "val").value()
        if best is None or value > best[0]:
            best = (value, lr, head)
    _, lr, head = best
    val = scores_with_intervals(dice(head, "val"))[0]
    collected = dice(head, "test")
    test, intervals = scores_with_intervals(collected, config.bootstrap, seed)
    record = _record(spec, task, seed, "linear", config, sha256, splits, started, feature_seconds, fit_started, val,
                     test, intervals, {"chosen": {"lr": lr}, "test_outputs": per_image_outputs(collected,
                                                                                               splits["test"].ids)})
    return {**record, "score_name": "dice"}


def _mean(rows) -> dict[str, float]:
    rows = list(rows)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _std(rows) -> dict[str, float]:
    rows = list(rows)
    return {k: float(np.std([r[k] for r in rows])) for k in rows[0]}


def _record(spec, task, seed, variant, config, sha256, splits, started, feature_seconds, fit_started, val, test,
            intervals, extra) -> dict[str, Any]:
    return {
        "task": task.name, "modality": task.spec.modality, "type": task.spec.type, "encoder": spec.name,
        "protocol": variant.split("-")[0], "seed": seed, "score_name": SCORE, "val": val, "test": test,
        "test_intervals": intervals, "encoder_spec": asdict(spec), "encoder_sha256": sha256, "config": asdict(config),
        "split_images": {name: len(split.ids) for name, split in splits.items()},
        "features_cached": all(split.cached for split in splits.values()), "feature_seconds": feature_seconds,
        "fit_seconds": time.perf_counter() - fit_started, "seconds": time.perf_counter() - started, **extra,
    }
