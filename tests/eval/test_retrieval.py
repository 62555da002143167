"""Retrieval and zero-shot metrics against direct computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dex.eval.retrieval import class_embeddings, retrieval_metrics, true_ranks, zero_shot_logits


def direct_recall(images, texts, k):
    """Image-to-text Recall@K by sorting each row, a tie counted against the match."""
    sim = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    hits = 0
    for i in range(len(sim)):
        better = sum(1 for j in range(len(sim)) if j != i and sim[i, j] >= sim[i, i])
        hits += better < k
    return hits / len(sim)


def test_recall_at_k_equals_a_direct_count_both_ways():
    torch.manual_seed(0)
    images = torch.randn(30, 8)
    texts = images + 1.2 * torch.randn(30, 8)  # noisy matches: recall between chance and 1
    result = retrieval_metrics(images, texts)
    for k in (1, 5, 10):
        assert result[f"i2t_R@{k}"] == pytest.approx(direct_recall(images, texts, k))
        assert result[f"t2i_R@{k}"] == pytest.approx(direct_recall(texts, images, k))
        assert result[f"chance_R@{k}"] == pytest.approx(k / 30)
    assert 0 < result["i2t_R@1"] < result["i2t_R@10"] < 1
    perfect = retrieval_metrics(images, images)
    assert perfect["i2t_R@1"] == perfect["t2i_R@1"] == 1.0 and perfect["i2t_median_rank"] == 1.0


def test_a_model_that_scores_everything_alike_ranks_last():
    same = torch.ones(5, 4)
    assert true_ranks(same @ same.T).tolist() == [5] * 5
    assert retrieval_metrics(same, same)["i2t_R@1"] == 0.0


def test_zero_shot_picks_the_nearest_prompt_ensemble():
    prompts = torch.tensor([[[1.0, 0.0], [0.8, 0.2]], [[0.0, 1.0], [0.1, 0.9]]])  # 2 classes x 2 prompts
    classes = class_embeddings(prompts)
    torch.testing.assert_close(classes.norm(dim=-1), torch.ones(2))
    mean0 = F.normalize(F.normalize(prompts[0], dim=-1).mean(0), dim=-1)
    torch.testing.assert_close(classes[0], mean0)
    logits = zero_shot_logits(torch.tensor([[2.0, 0.1], [0.1, 3.0]]), classes, temperature=0.5)
    assert logits.argmax(1).tolist() == [0, 1]
    torch.testing.assert_close(logits[0, 0], F.cosine_similarity(torch.tensor([2.0, 0.1]), mean0, dim=0) / 0.5)
