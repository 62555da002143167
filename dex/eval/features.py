"""Frozen features of a task's images, computed once and kept on disk, so that every frozen protocol of
``dex benchmark`` (linear probe, kNN, few-shot) costs one forward pass over the data.

A split's features (:func:`split_features`) are the pooled feature (a ViT's class token, a Swin's average) and the
mean of the final normalised tokens (:func:`dex.models.backbones.final_tokens`, as ``dex embed`` gives them) of each
image, read by the
encoder's preprocessing, and for a segmentation task also every patch token (float16, [N, P, D]). They are cached as
``CACHE/<task>-<split>-<key>.npz``, the key a SHA-256 of everything they depend on: the encoder's weights
(:func:`dex.downstream.finetune.state_dict_sha256`, with a DEX encoder's ``mode`` and ``top_k`` where a run sets
them), the task's folder and the split's image ids, files (size and
modification time) and labels, the preprocessing, and this format's version; a change of any makes a new key, so a
stale file is never read. A file is written whole or not at all (a temporary
file renamed), so an interrupted suite leaves only complete ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dex.data.preprocess import Preprocessing
from dex.data.tasks import Task
from dex.models.backbones import final_tokens

FORMAT_VERSION = 1


@dataclass
class SplitFeatures:
    """The features of one split: ``cls`` and ``mean_patch`` [N, D] float32, ``labels`` [N] class indices (-1 for
    segmentation tasks), ``ids`` the images in order, ``patches`` [N, P, D] float16 (segmentation tasks, else
    None); ``cached`` whether they were read from the cache."""

    cls: np.ndarray
    mean_patch: np.ndarray
    labels: np.ndarray
    ids: list[str]
    patches: np.ndarray | None = None
    cached: bool = False

    def matrix(self, kind: str) -> np.ndarray:
        """``cls``, ``mean`` (the mean patch token) or ``both`` (the two concatenated, [N, 2D])."""
        if kind == "cls":
            return self.cls
        if kind == "mean":
            return self.mean_patch
        if kind == "both":
            return np.concatenate([self.cls, self.mean_patch], axis=1)
        raise ValueError(f"features must be cls, mean or both, got {kind!r}")

    def subset(self, ids: list[str]) -> SplitFeatures:
        """The rows of ``ids`` (in the order given)."""
        rows = [self.ids.index(i) for i in ids]
        return SplitFeatures(self.cls[rows], self.mean_patch[rows], self.labels[rows], list(ids),
                             None if self.patches is None else self.patches[rows], self.cached)


def feature_key(encoder_sha256: str, task: Task, split: str, preprocessing: Preprocessing) -> str:
    """The cache key of a split's features: a SHA-256 of what they depend on (see the module's docstring)."""
    ids = task.splits[split]
    files = []
    for item in ids:
        stat = task.images[item].stat()
        files.append([item, task.images[item].name, stat.st_size, stat.st_mtime_ns, task.labels.get(item, -1)])
    content = {"format": FORMAT_VERSION, "encoder": encoder_sha256, "task": str(task.root.resolve()),
               "split": split, "images": files, "preprocessing": preprocessing.to_dict()}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def split_features(encoder: nn.Module, encoder_sha256: str, task: Task, split: str, preprocessing: Preprocessing,
                   cache: str | Path | None = None, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> SplitFeatures:
    """The features of ``task``'s ``split``, from ``cache`` when it holds them under the current key, else
    computed (``encoder`` in eval mode, batches of ``batch_size``) and written there."""
    ids = list(task.splits[split])
    labels = np.array([task.labels.get(i, -1) for i in ids], dtype=np.int64)
    path = None
    if cache is not None:
        key = feature_key(encoder_sha256, task, split, preprocessing)
        path = Path(cache) / f"{task.name}-{split}-{key[:24]}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as stored:
                return SplitFeatures(stored["cls"], stored["mean_patch"], labels, ids,
                                     stored["patches"] if "patches" in stored else None, cached=True)
    encoder.eval()
    keep_patches = task.spec.type == "segmentation"
    rows: dict[str, list[np.ndarray]] = {"cls": [], "mean_patch": [], "patches": []}
    for start in range(0, len(ids), batch_size):
        images = torch.stack([preprocessing.read(task.images[i]) for i in ids[start: start + batch_size]])
        cls, patches = final_tokens(encoder, images.to(device))
        rows["cls"].append(cls.cpu().numpy())
        rows["mean_patch"].append(patches.mean(1).cpu().numpy())
        if keep_patches:
            rows["patches"].append(patches.cpu().numpy().astype(np.float16))
    empty = np.zeros((0, encoder.num_features), np.float32)
    arrays = {"cls": empty, "mean_patch": empty, **{name: np.concatenate(v) for name, v in rows.items() if v}}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    return SplitFeatures(arrays["cls"], arrays["mean_patch"], labels, ids, arrays.get("patches"))
