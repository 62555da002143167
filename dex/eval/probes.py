"""Classifiers on frozen features: the linear probe, weighted kNN and the few-shot draws of ``dex benchmark``'s
frozen protocols. Each takes [N, D] float features and [N] class indices and gives [M, C] class probabilities.

- :func:`linear_probe`: scikit-learn's ``LogisticRegression`` (L2, lbfgs, multinomial) on features standardised
  with the training split's mean and standard deviation, one fit per value of ``C`` (the inverse L2 strength; lbfgs
  has no learning rate, so the sweep of learning rate and weight decay of DINOv2's linear evaluation is a sweep of
  the regularisation here: our choice), the value of best validation score kept (the first of equal ones), its test
  probabilities reported.
- :func:`knn_probabilities`: cosine similarity to every training feature, the ``k`` nearest vote with weight
  ``exp(similarity / T)`` (T = 0.07), as DINO's kNN evaluation (Caron et al. 2021) does; the votes normalised to sum
  to one.
- :func:`fit_patch_classifier` (segmentation): DINOv2's linear segmentation head, batch norm and a linear map of
  each frozen patch token to the classes, its logits upsampled (bilinear) to the mask; cross-entropy, AdamW, a fixed
  number of epochs over the cached tokens, one fit per learning rate, the best by validation Dice (our choices:
  DINOv2 trains 40k iterations with SGD, far beyond a CPU budget).
- :func:`fewshot_indices`: ``n`` training images per class (all of a class with fewer), drawn without replacement
  by a generator seeded with (seed, n, draw): reproducible, and from the training split only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

LINEAR_C = (0.001, 0.01, 0.1, 1.0, 10.0)
SEGMENTATION_LR = (1e-3, 1e-2)
KNN_TEMPERATURE = 0.07


def knn_probabilities(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, num_classes: int, k: int,
                      temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """[M, C] probabilities of ``query`` [M, D] by the temperature-weighted vote of its ``k`` nearest (cosine)
    ``train`` [N, D] features with labels ``train_labels`` [N] (k is capped at N)."""
    bank = F.normalize(torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32)), dim=1)
    queries = F.normalize(torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32)), dim=1)
    similarity, index = (queries @ bank.T).topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, torch.from_numpy(train_labels)[index], (similarity.double() / temperature).exp())
    return (votes / votes.sum(1, keepdim=True)).numpy()


def _logistic(c: float, seed: int) -> LogisticRegression:
    """The linear probe's classifier at inverse L2 strength ``c``: pinned by a test."""
    return LogisticRegression(C=c, max_iter=1000, random_state=seed)


def _full_probabilities(model: LogisticRegression, x: np.ndarray, num_classes: int) -> np.ndarray:
    """predict_proba over every class (a class absent from the training data gets probability 0)."""
    probs = np.zeros((len(x), num_classes))
    probs[:, model.classes_] = model.predict_proba(x)
    return probs


def linear_probe(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray,
                 test: np.ndarray, num_classes: int, score: Callable[[np.ndarray, np.ndarray], float],
                 cs: Sequence[float] = LINEAR_C, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Fit one logistic regression per ``C`` of ``cs`` on standardised ``train`` features, keep the one whose
    validation probabilities score best by ``score(probabilities, labels)``; returns its validation and test
    probabilities ([M, C] each) and its ``C``. Training labels of one class (a small share of a task's labels)
    give that class with probability 1 and ``C`` None: there is nothing to fit."""
    present = np.unique(train_labels)
    if len(present) == 1:
        constant = np.eye(num_classes)[present[0]]
        return np.tile(constant, (len(val), 1)), np.tile(constant, (len(test), 1)), None
    scaler = StandardScaler().fit(train)
    train, val, test = scaler.transform(train), scaler.transform(val), scaler.transform(test)
    best = None
    for c in cs:
        model = _logistic(c, seed).fit(train, train_labels)
        val_probs = _full_probabilities(model, val, num_classes)
        value = score(val_probs, val_labels)
        if best is None or value > best[0]:
            best = (value, c, model, val_probs)
    _, c, model, val_probs = best
    return val_probs, _full_probabilities(model, test, num_classes), c


def fewshot_indices(labels: np.ndarray, n: int, draws: int, seed: int) -> list[np.ndarray]:
    """``draws`` sets of ``n`` indices per class of ``labels`` (sorted; a class of fewer images gives all)."""
    sets = []
    for draw in range(draws):
        rng = np.random.default_rng([seed, n, draw])
        chosen = [rng.choice(np.flatnonzero(labels == c), min(n, int((labels == c).sum())), replace=False)
                  for c in np.unique(labels)]
        sets.append(np.sort(np.concatenate(chosen)))
    return sets


def patch_logits(head: torch.nn.Module, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, P, D] patch tokens -> [B, C, h, w] logits on the patch grid (P = h * w, row-major)."""
    batch, count, dim = patches.shape
    logits = head(patches.reshape(-1, dim).float())
    return logits.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2)


def fit_patch_classifier(patches: np.ndarray, masks: np.ndarray, grid: tuple[int, int], num_classes: int, lr: float,
                         epochs: int = 20, batch_size: int = 16, seed: int = 0) -> torch.nn.Module:
    """Train ``BatchNorm1d(D)`` + ``Linear(D, C)`` on frozen patch tokens [N, P, D] against masks [N, H, W] (class
    indices at the model input's size): the logits on the patch grid upsampled (bilinear) to H x W, cross-entropy,
    AdamW (weight decay 1e-4), seeded initialisation and order. Returns the head in eval mode."""
    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(patches.shape[2]), torch.nn.Linear(patches.shape[2], num_classes))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    x, y = torch.from_numpy(patches), torch.from_numpy(masks).long()
    order = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=order).split(batch_size):
            logits = F.interpolate(patch_logits(head, x[index], grid), size=tuple(y.shape[-2:]), mode="bilinear",
                                   align_corners=False)
            loss = F.cross_entropy(logits, y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head.eval()
