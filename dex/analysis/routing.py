"""Which experts each modality uses (the paper's Fig. 9) and how specialised the routing is.

The routing table of a layer is [M, R]: the activation weight (Eq. 5) the images of modality m give expert r,
summed over images. Its normalised mutual information says how much the chosen experts tell about the modality:
0 when every modality uses the experts alike, 1 when each modality has experts of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from dex.data.recipe import MODALITIES
from dex.models import DEXViT


@torch.no_grad()
def routing_tables(encoder: DEXViT, batches: Iterable[dict], device: torch.device | str = "cpu",
                   max_images: int | None = None) -> Tensor:
    """[L, M, R] routing tables of the encoder's DEX layers (all with the same R) over labelled batches
    (dicts with ``image`` [B, 3, H, W] and ``modality`` [B] indices into MODALITIES). Token-wise layers count each
    image's mean over its tokens."""
    encoder = encoder.eval().to(device)
    layers = [i for i, block in enumerate(encoder.blocks) if block.dex is not None]
    experts = {encoder.blocks[i].dex.num_experts for i in layers}
    if len(experts) != 1:
        raise ValueError(f"routing tables need the same number of experts in every DEX layer, got {sorted(experts)}")
    tables = torch.zeros(len(layers), len(MODALITIES), experts.pop(), dtype=torch.float64)
    seen = 0
    for batch in batches:
        images, modality = batch["image"].to(device), torch.as_tensor(batch["modality"])
        encoder.forward_features(images)
        for slot, layer in enumerate(layers):
            routing = encoder.last_routing[layer]
            dense = torch.zeros_like(routing.scores).scatter(1, routing.indices, routing.weights)
            dense = dense.view(len(images), -1, dense.shape[-1]).mean(1).double().cpu()  # per image
            tables[slot].index_add_(0, modality, dense)
        seen += len(images)
        if max_images is not None and seen >= max_images:
            break
    return tables


def normalized_mutual_information(table: Tensor) -> float:
    """NMI of a joint table [M, R]: ``I(M; E) / ((H(M) + H(E)) / 2)`` (arithmetic normalisation, as
    scikit-learn's ``normalized_mutual_info_score``); 0 when either variable is constant."""
    joint = table.double() / table.sum()
    pm, pe = joint.sum(1), joint.sum(0)

    def entropy(p: Tensor) -> float:
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    h_m, h_e = entropy(pm), entropy(pe)
    if h_m == 0 or h_e == 0:
        return 0.0
    nz = joint > 0
    mutual = float((joint[nz] * (joint[nz] / (pm[:, None] * pe[None, :])[nz]).log()).sum())
    return max(0.0, mutual / ((h_m + h_e) / 2))


def layer_nmi(tables: Tensor) -> list[float]:
    return [normalized_mutual_information(t[t.sum(1) > 0]) for t in tables]


def usage_entropy(tables: Tensor) -> list[float]:
    """Per layer, the entropy of the overall expert usage divided by log R (1 = balanced)."""
    out = []
    for table in tables:
        usage = table.sum(0)
        p = usage / usage.sum()
        p = p[p > 0]
        out.append(float(-(p * p.log()).sum()) / math.log(table.shape[1]))
    return out
