"""Pattern layout (the paper's Fig. 7): the patch features of a modality clustered by k-means, and the patches
closest to each centroid."""

from __future__ import annotations

import numpy as np
from scipy.cluster.vq import kmeans2
from torch import Tensor


def pattern_layout(features: Tensor, clusters: int, per_cluster: int, seed: int = 0) -> tuple[np.ndarray, list]:
    """k-means (k-means++ start, seeded) on [B, N, C] patch features. Returns each patch's cluster [B, N] and, per
    cluster, the (image, patch) indices of the ``per_cluster`` patches nearest its centroid."""
    flat = features.reshape(-1, features.shape[-1]).double().numpy()
    clusters = min(clusters, len(flat))
    centroids, labels = kmeans2(flat, clusters, minit="++", seed=np.random.default_rng(seed))
    patches = features.shape[1]
    representatives = []
    for c in range(clusters):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(((flat[members] - centroids[c]) ** 2).sum(1))][:per_cluster]
        representatives.append([(int(i // patches), int(i % patches)) for i in order])
    return labels.reshape(features.shape[:2]), representatives
