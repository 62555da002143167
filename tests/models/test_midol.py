"""M-IDoL's parts against direct computations: Sinkhorn-Knopp, L_route, the in-subspace InfoNCE, the projector."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dex.models.midol import MoEProjector, route_loss, routing_stats, sinkhorn_knopp, subspace_infonce


def test_sinkhorn_plan_has_the_prescribed_marginals():
    scores = torch.randn(32, 5)
    plan = sinkhorn_knopp(scores, epsilon=0.1, iterations=200)
    assert plan.sum(1) == pytest.approx(torch.full((32,), 1 / 32), abs=1e-7)
    assert plan.sum(0) == pytest.approx(torch.full((5,), 1 / 5), abs=1e-5)
    rows, cols = torch.rand(32) + 0.5, torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1])
    rows /= rows.sum()
    plan = sinkhorn_knopp(scores, epsilon=0.1, iterations=500, row_marginal=rows, col_marginal=cols)
    assert plan.sum(1) == pytest.approx(rows, abs=1e-7) and plan.sum(0) == pytest.approx(cols, abs=1e-5)
    # the plan is exp(S / eps) rescaled by rows and columns: its log is S / eps + a_i + b_k (rank-one residual)
    residual = plan.log() - scores / 0.1
    centred = residual - residual.mean(1, keepdim=True) - residual.mean(0, keepdim=True) + residual.mean()
    assert centred.abs().max() < 1e-3


def test_sinkhorn_balances_a_skewed_score_matrix():
    torch.manual_seed(1)
    scores = 0.05 * torch.randn(40, 5)
    scores[:, 0] += 0.5  # every image prefers expert 0
    assert set(scores.argmax(1).tolist()) == {0}
    plan = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)  # SwAV's three rounds
    assert plan.sum(0) == pytest.approx(torch.full((5,), 0.2), abs=0.02)
    counts = torch.bincount(plan.argmax(1), minlength=5)
    assert (counts > 0).all() and counts.max() <= 16


def test_route_loss_is_the_swapped_cross_entropy_and_lowest_when_views_agree():
    torch.manual_seed(2)
    scores, codes = torch.randn(2, 6, 4), torch.softmax(torch.randn(2, 6, 4) * 3, -1)
    log_p = F.log_softmax(scores / 0.1, -1)
    direct = -((codes[1] * log_p[0]).sum(-1).mean() + (codes[0] * log_p[1]).sum(-1).mean()) / 2
    assert route_loss(scores, codes, 0.1) == pytest.approx(float(direct), rel=1e-6)
    choice = torch.randint(0, 4, (6,))
    agree = F.one_hot(choice, 4).float().expand(2, 6, 4)
    other = F.one_hot((choice + 1) % 4, 4).float()
    disagree = torch.stack([agree[0], other])
    confident = 2 * agree - 1  # cosine scores: +1 for the chosen expert, -1 elsewhere
    assert route_loss(confident, agree) < 1e-6
    assert route_loss(confident, disagree) > 5.0
    assert route_loss(confident, agree) < route_loss(torch.zeros(2, 6, 4), agree) < route_loss(confident, disagree)
    with pytest.raises(ValueError, match="two views"):
        route_loss(scores[:1], codes[:1])


def _infonce_by_loop(queries, keys, assignment, key_assignment, tau, same_expert, offset):
    views, batch, _ = queries.shape
    terms = []
    for i in range(batch):
        k = int(assignment[i])
        for v in range(views):
            for w in range(views):
                if v == w:
                    continue
                candidates = [j for j in range(keys.shape[2]) if not same_expert or int(key_assignment[j]) == k]
                logits = torch.stack([queries[v, i] @ keys[w, k, j] / tau for j in candidates])
                terms.append(-(logits[candidates.index(i + offset)] - torch.logsumexp(logits, 0)))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("negatives", ["all", "same_expert"])
@pytest.mark.parametrize("views", [2, 3])
def test_subspace_infonce_equals_a_direct_computation(negatives, views):
    torch.manual_seed(3)
    batch, experts, dim, offset = 5, 3, 8, 2
    queries = F.normalize(torch.randn(views, batch, dim), dim=-1)
    keys = F.normalize(torch.randn(views, experts, batch + 4, dim), dim=-1)  # 4 images from another rank
    key_assignment = torch.randint(0, experts, (batch + 4,))
    assignment = key_assignment[offset: offset + batch]
    expected = _infonce_by_loop(queries, keys, assignment, key_assignment, 0.2, negatives == "same_expert", offset)
    got = subspace_infonce(queries, keys, assignment, key_assignment, 0.2, negatives, offset)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_same_expert_negatives_leave_out_the_other_subspaces():
    """Image 0 is alone in expert 0's subspace: with same-expert negatives it has no candidate but itself (its
    term is 0), with all negatives the images of expert 1 are its negatives."""
    queries = F.normalize(torch.randn(2, 3, 4), dim=-1)
    keys = F.normalize(torch.randn(2, 2, 3, 4), dim=-1)
    assignment = torch.tensor([0, 1, 1])
    alone = queries[:, :1], keys, assignment[:1], assignment  # image 0's queries against all three key images
    assert float(subspace_infonce(*alone, negatives="same_expert")) == 0.0
    assert float(subspace_infonce(*alone, negatives="all")) > 0.1
    assert subspace_infonce(queries, keys, assignment, assignment, negatives="same_expert") < \
        subspace_infonce(queries, keys, assignment, assignment, negatives="all")
    with pytest.raises(ValueError, match="negatives"):
        subspace_infonce(queries, keys, assignment, assignment, negatives="other")


def test_projector_shapes_norms_and_prototype_scores():
    projector = MoEProjector(16, num_experts=5, hidden_dim=32, out_dim=8)
    features = torch.randn(7, 16)
    with torch.no_grad():
        scores, embeddings = projector(features)
    assert scores.shape == (7, 5) and embeddings.shape == (5, 7, 8)
    assert embeddings.norm(dim=-1) == pytest.approx(torch.ones(5, 7), abs=1e-5)
    prototypes = projector.router.prototypes.weight.detach()
    expected = F.cosine_similarity(features.unsqueeze(1), prototypes.unsqueeze(0), dim=-1)
    assert scores == pytest.approx(expected, abs=1e-5)
    # scaling a feature does not change where it routes
    with torch.no_grad():
        assert projector(3 * features)[0] == pytest.approx(scores, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 experts"):
        MoEProjector(16, num_experts=1)


def test_routing_stats():
    scores = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    codes = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], [[0.7, 0.3], [0.4, 0.6], [0.3, 0.7]]])
    stats = routing_stats(scores, codes, torch.tensor([0, 1, 0]), 2)
    assert stats.load.tolist() == pytest.approx([2 / 3, 1 / 3])
    assert float(stats.agreement) == pytest.approx(2 / 3) and float(stats.code_agreement) == pytest.approx(2 / 3)
    assert math.isclose(float(stats.load.sum()), 1.0)
