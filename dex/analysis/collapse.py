"""Modality-collapse diagnostics (App. A, Theorem A.3): per layer, how well a linear probe predicts the modality from
an image's features, and which share of the feature variance lies between modalities rather than within them."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from dex.models.backbones import depth_features


@torch.no_grad()
def layer_features(encoder: nn.Module, images: Tensor) -> list[Tensor]:
    """Per block (a ViT) or stage (a Swin), the mean of the patch tokens of each image: a list of [B, C]."""
    return [t.mean((-2, -1)).float() for t in depth_features(encoder.eval(), images)]


def between_share(features: np.ndarray, labels: np.ndarray) -> float:
    """trace(between-modality scatter) / trace(total scatter): 0 when modalities share one mean, 1 when all the
    variance separates modalities."""
    centred = features - features.mean(0)
    total = float((centred ** 2).sum())
    between = sum(float((labels == m).sum()) * float(((features[labels == m].mean(0) - features.mean(0)) ** 2).sum())
                  for m in np.unique(labels))
    return between / total if total > 0 else 0.0


def probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Test accuracy of a logistic-regression probe on standardised features (a stratified 70/30 split)."""
    train_x, test_x, train_y, test_y = train_test_split(features, labels, test_size=0.3, random_state=seed,
                                                        stratify=labels)
    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x), train_y)
    return float(probe.score(scaler.transform(test_x), test_y))


def collapse_diagnostics(per_layer: list[np.ndarray], labels: np.ndarray, seed: int = 0) -> list[dict[str, float]]:
    return [{"layer": i + 1, "probe_accuracy": probe_accuracy(f, labels, seed),
             "between_share": between_share(f, labels)}
            for i, f in enumerate(per_layer)]
