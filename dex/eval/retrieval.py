"""Image-text evaluation of a vision-language model from its embeddings: retrieval between held-out image-report
pairs (Recall@K both ways) and zero-shot classification from class prompts.

Both take L2-normalisable embeddings in a shared space (a model's global image and report embeddings) and work on
cosine similarity, as CLIP's and GLoRIA's evaluations do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_similarity_matrix(images: Tensor, texts: Tensor) -> Tensor:
    """[N, D] image and [M, D] text embeddings -> [N, M] cosine similarities."""
    return F.normalize(images.float(), dim=-1) @ F.normalize(texts.float(), dim=-1).T


def true_ranks(similarity: Tensor) -> Tensor:
    """[N, N] similarities of N pairs (row i's true match is column i) -> [N] rank of each row's match, 1 best.

    A tie with the match counts against it (rank = 1 + the other columns scoring at least as high), so a model that
    scores everything alike ranks last, never first."""
    diagonal = similarity.diagonal()[:, None]
    others = ~torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    return 1 + ((similarity >= diagonal) & others).sum(1)


def retrieval_metrics(images: Tensor, texts: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K of image-to-text and text-to-image retrieval among N pairs ([N, D] each, pair i = row i of both),
    their chance levels K / N, and the median rank each way."""
    similarity = cosine_similarity_matrix(images, texts)
    count = len(similarity)
    result: dict[str, float] = {"pairs": count}
    for name, ranks in (("i2t", true_ranks(similarity)), ("t2i", true_ranks(similarity.T))):
        for k in ks:
            result[f"{name}_R@{k}"] = float((ranks <= k).float().mean())
        result[f"{name}_median_rank"] = float(ranks.float().median())
    for k in ks:
        result[f"chance_R@{k}"] = min(1.0, k / count)
    return result


def class_embeddings(prompt_embeddings: Tensor) -> Tensor:
    """[C, P, D] embeddings of P prompts per class -> [C, D]: the normalised mean of the normalised prompts
    (CLIP's prompt ensembling)."""
    return F.normalize(F.normalize(prompt_embeddings.float(), dim=-1).mean(1), dim=-1)


def zero_shot_logits(images: Tensor, classes: Tensor, temperature: float = 0.07) -> Tensor:
    """[N, D] image embeddings and [C, D] class embeddings -> [N, C] logits cos / temperature (argmax: the class)."""
    return cosine_similarity_matrix(images, classes) / temperature
