"""Specificity and diversity of an encoder's features: the two claims of M-IDoL (seed 002), measured for any encoder.

- Specificity, for an encoder pretrained with a routed projector (an M-IDoL run): each image's expert is the
  argmax of the teacher projector's router scores (ours: no batch balancing at inference); the normalised mutual
  information between that expert and the true modality (modality labels are used here only, never in
  pretraining) and the experts' load.
- Diversity inside each modality, on L2-normalised pooled features f: the spread ``E ||f - mean_m f||^2``; the
  alignment ``E ||f(x) - f(x')||^2`` of two augmented views of one image and the uniformity
  ``log E_{i != j} exp(-2 ||f_i - f_j||^2)`` (Wang and Isola 2020, Eq. 4-5 there, alpha = t = 2); lower alignment
  is better, lower uniformity spreads the features more evenly.
- A 2D map of the features (scikit-learn's t-SNE) coloured by modality and by expert.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dex.analysis.routing import normalized_mutual_information
from dex.models.midol import pooled_features


@torch.no_grad()
def features_and_experts(encoder: nn.Module, batches: Iterable[Tensor], projector: nn.Module | None = None
                         ) -> tuple[Tensor, Tensor | None]:
    """[N, C] L2-normalised pooled features of the images in ``batches`` (each [b, 3, H, W]) and, with a
    :class:`~dex.models.midol.MoEProjector`, each image's expert [N] (argmax of the router's scores)."""
    features, experts = [], []
    for images in batches:
        pooled = pooled_features(encoder, images)[0].float()
        features.append(F.normalize(pooled, dim=-1))
        if projector is not None:
            experts.append(projector.router(pooled).argmax(-1))
    return torch.cat(features), (torch.cat(experts) if projector is not None else None)


def alignment(a: Tensor, b: Tensor) -> float:
    """``E_i ||a_i - b_i||^2`` over the rows of two [N, C] views (Wang and Isola's alignment, alpha = 2)."""
    return float((a - b).pow(2).sum(-1).mean())


def uniformity(features: Tensor) -> float:
    """``log E_{i != j} exp(-2 ||f_i - f_j||^2)`` over the rows of [N, C] (Wang and Isola's uniformity, t = 2);
    NaN with fewer than two rows."""
    if len(features) < 2:
        return float("nan")
    return float(torch.pdist(features.double()).pow(2).mul(-2).exp().mean().log())


def spread(features: Tensor) -> float:
    """``E_i ||f_i - mean f||^2`` over the rows of [N, C]."""
    return float((features - features.mean(0)).pow(2).sum(-1).mean())


def subspace_diagnostics(features: Tensor, views: tuple[Tensor, Tensor], labels: Tensor, names: list[str],
                         experts: Tensor | None = None, num_experts: int | None = None) -> dict[str, Any]:
    """The diagnostics of the module docstring.

    Args:
        features: [N, C] normalised features of the images; views: two [N, C] of augmented views of them.
        labels: [N] modality indices into ``names``; experts: [N] the routed expert (or None).
    """
    per_modality = []
    for m in sorted(set(labels.tolist())):
        member = labels == m
        per_modality.append({"modality": names[m], "images": int(member.sum()), "spread": spread(features[member]),
                             "alignment": alignment(views[0][member], views[1][member]),
                             "uniformity": uniformity(features[member])})
    result: dict[str, Any] = {"per_modality": per_modality, "alignment": alignment(*views),
                              "uniformity": uniformity(features)}
    if experts is not None:
        num_experts = num_experts or int(experts.max()) + 1
        table = torch.zeros(len(names), num_experts)
        table.index_put_((labels, experts), torch.ones(len(labels)), accumulate=True)
        present = table[table.sum(1) > 0]
        result["nmi"] = normalized_mutual_information(present)
        result["expert_load"] = (table.sum(0) / table.sum()).tolist()
        result["expert_table"] = {names[m]: table[m].int().tolist() for m in sorted(set(labels.tolist()))}
    return result


def tsne_map(features: Tensor, seed: int = 0) -> np.ndarray:
    """[N, C] -> [N, 2] t-SNE embedding (scikit-learn; perplexity capped below N, PCA initialisation)."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, len(features) // 4)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features.double().numpy())
