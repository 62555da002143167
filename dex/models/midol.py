"""M-IDoL's parts (seed 002, arXiv 2604.08936): a mixture-of-experts projector with Sinkhorn-balanced top-1 routing,
the routing-consistency loss ``L_route`` and the in-subspace contrast ``L_cst``.

The paper's text is not public here; seed 002 gives the two objectives (specificity: disperse the modalities into
separable expert subspaces, maximising the inter-modality entropy; diversity: fine-grained discrimination inside
each subspace, minimising the intra-modality uncertainty). A secondary description (unverified) gives the rest:
N = 5 projector experts with top-1 routing, each image assigned by Sinkhorn-Knopp balancing over the batch as SwAV
does, all views of an image routed alike (``L_route``, for maximising H(X|Z)), an InfoNCE inside each expert's
subspace (``L_cst``, for minimising H(X|Y,Z)), total ``L_route + L_cst``, a DINO-style EMA teacher. Every other
detail is ours and marked so: the router as cosine similarity to learned prototypes (SwAV's form), the
swapped-prediction form of ``L_route``, teacher codes and teacher keys, the temperatures, epsilon and iterations.

Shapes: B images, V views, N experts, D the projection width.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dex.collectives import reduce_
from dex.models.dex_vit import DEXViT
from dex.models.director_experts import DEXAux

Negatives = Literal["all", "same_expert"]


def pooled_features(encoder: nn.Module, images: Tensor, noise_std: float = 0.0,
                    router_eps: list[Tensor | None] | None = None) -> tuple[Tensor, list[DEXAux]]:
    """[B, 3, H, W] -> (the pooled feature [B, C] of ``forward_head(pre_logits=True)``: the class token of a DEX
    ViT, a Swin's average; the DEX blocks' aux outputs, none for another encoder). ``noise_std`` and
    ``router_eps`` drive a DEX encoder's router noise (training only)."""
    if isinstance(encoder, DEXViT):
        tokens, aux = encoder.forward_tokens(encoder.embed(images), noise_std, router_eps)
        return encoder.forward_head(tokens, pre_logits=True), aux
    return encoder.forward_head(encoder.forward_features(images), pre_logits=True), []


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3,
                   row_marginal: Tensor | None = None, col_marginal: Tensor | None = None) -> Tensor:
    """The entropic optimal-transport plan between images and experts (Cuturi 2013; SwAV's Algorithm 1).

    ``P = diag(u) exp(S / epsilon) diag(v)`` with ``P 1 = r`` (every image carries its share of mass) and
    ``P^T 1 = c`` (every expert receives its share), found by alternately rescaling columns and rows
    ``iterations`` times, columns first (SwAV). After the last (row) step the rows hold ``r`` exactly and the
    columns ``c`` to the precision the iterations reach. Under ``torch.distributed`` the scores of all ranks form
    one batch: column sums are all-reduced, rows stay local.

    Args:
        scores: [B, N] router scores (any dtype; computed in float32).
        epsilon: the entropic regularisation (SwAV's 0.05; ours for M-IDoL).
        iterations: rescaling rounds (SwAV's 3; ours).
        row_marginal: [B] r; default uniform 1/B_global.
        col_marginal: [N] c; default uniform 1/N.

    Returns:
        [B, N] the plan P (sums to 1 over the global batch). ``P * B_global`` are SwAV's codes: one distribution
        over the experts per image.
    """
    scores = scores.float()
    batch, experts = scores.shape
    global_batch = int(reduce_(torch.tensor(float(batch), device=scores.device)).item())
    r = torch.full((batch,), 1.0 / global_batch, device=scores.device) if row_marginal is None else row_marginal
    c = torch.full((experts,), 1.0 / experts, device=scores.device) if col_marginal is None else col_marginal
    plan = torch.exp((scores - reduce_(scores.max().reshape(1), dist.ReduceOp.MAX)) / epsilon)
    plan /= reduce_(plan.sum().reshape(1))
    for _ in range(iterations):
        plan *= (c / reduce_(plan.sum(0)).clamp_min(1e-30)).unsqueeze(0)
        plan *= (r / plan.sum(1).clamp_min(1e-30)).unsqueeze(1)
    return plan


class PrototypeRouter(nn.Module):
    """The projector's router (ours, SwAV's form): cosine similarity of the backbone feature to N learned
    prototypes, ``s_ik = <h_i / |h_i|, w_k / |w_k|>`` in [-1, 1]. The student's routing distribution is
    ``p_i = softmax(s_i / tau)``; the teacher's scores go through :func:`sinkhorn_knopp`."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.prototypes = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.prototypes.weight, std=dim ** -0.5)

    def forward(self, features: Tensor) -> Tensor:
        """[B, C] -> [B, N] scores."""
        return F.normalize(features, dim=-1) @ F.normalize(self.prototypes.weight, dim=-1).t()


class ExpertHeads(nn.Module):
    """N projection heads, one subspace each (widths ours, DINO's head form): Linear-GELU-Linear-GELU-Linear, the
    output L2-normalised. ``forward`` applies every head to every feature: [B, C] -> [N, B, D]."""

    def __init__(self, dim: int, num_experts: int, hidden_dim: int = 2048, out_dim: int = 256) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                          nn.Linear(hidden_dim, out_dim))
            for _ in range(num_experts)
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(torch.stack([head(features) for head in self.heads]), dim=-1)


class MoEProjector(nn.Module):
    """The M-IDoL projector head: a :class:`PrototypeRouter` and N :class:`ExpertHeads` (secondary source: N = 5,
    one per modality, top-1). Discarded after pretraining."""

    def __init__(self, dim: int, num_experts: int = 5, hidden_dim: int = 2048, out_dim: int = 256) -> None:
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"an MoE projector needs at least 2 experts, got {num_experts}")
        self.num_experts = num_experts
        self.router = PrototypeRouter(dim, num_experts)
        self.experts = ExpertHeads(dim, num_experts, hidden_dim, out_dim)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """[B, C] -> (router scores [B, N], every expert's embedding [N, B, D])."""
        return self.router(features), self.experts(features)


def route_loss(student_scores: Tensor, codes: Tensor, temperature: float = 0.1) -> Tensor:
    """``L_route`` (ours: SwAV's swapped prediction, Eq. 1-2 there): each view's routing distribution predicts the
    (teacher's) Sinkhorn code of every other view of the same image,

        L_route = 1 / (B V (V-1)) * sum_i sum_{v != w} H(q_w,i, p_v,i),   p_v,i = softmax(s_v,i / tau),

    with H(q, p) = -sum_k q_k log p_k. It is lowest when every view routes with confidence to the expert the
    others' codes choose, and grows as the views disagree; the codes' equipartition (Sinkhorn) is what sends
    different images to different experts.

    Args:
        student_scores: [V, B, N] the student router's scores of each view.
        codes: [V, B, N] the teacher's Sinkhorn codes (rows sum to 1; no gradient).
    """
    views = student_scores.shape[0]
    if views < 2:
        raise ValueError(f"L_route needs at least two views per image, got {views}")
    log_p = F.log_softmax(student_scores.float() / temperature, dim=-1)
    total = student_scores.new_zeros((), dtype=torch.float32)
    for v in range(views):
        for w in range(views):
            if v != w:
                total = total - (codes[w] * log_p[v]).sum(-1).mean()
    return total / (views * (views - 1))


def subspace_infonce(queries: Tensor, keys: Tensor, assignment: Tensor, key_assignment: Tensor,
                     temperature: float = 0.2, negatives: Negatives = "same_expert",
                     offset: int = 0) -> Tensor:
    """``L_cst``: InfoNCE inside each expert's subspace (secondary source; the negatives' set and tau are ours).

    Image i is routed to expert k_i. Its view v, embedded by expert k_i (query q_v,i), must pick out its own view
    w != v embedded by the same expert (key z^{k_i}_w,i) among the keys of the other images in that subspace:

        L_cst = -1 / (B V (V-1)) sum_i sum_{v != w} log [ exp(q_v,i . z^{k_i}_w,i / tau) /
                                                           sum_{j in J_i} exp(q_v,i . z^{k_i}_w,j / tau) ]

    with J_i every image (``negatives="all"``) or the images routed to k_i too (``"same_expert"``, the
    fine-grained, intra-subspace discrimination).

    Args:
        queries: [V, B, D] the student's embeddings, each image by its own expert (L2-normalised).
        keys: [V, N, B', D] every expert's embeddings of the key images (the teacher's; B' = B, or the global
            batch under torch.distributed).
        assignment: [B] k_i of the query images; key_assignment: [B'] of the key images.
        offset: the index of query image 0 among the keys (its rank's place in the gathered batch).
    """
    views, batch, _ = queries.shape
    if views < 2:
        raise ValueError(f"L_cst needs at least two views per image, got {views}")
    own = torch.arange(batch, device=queries.device) + offset
    # keys[w, k_i, j] for each query image i: [V, B, B', D]
    routed_keys = keys[:, assignment]
    mask = None
    if negatives == "same_expert":
        mask = key_assignment.unsqueeze(0) != assignment.unsqueeze(1)  # [B, B'] True: not a candidate
    elif negatives != "all":
        raise ValueError(f"negatives must be 'all' or 'same_expert', got {negatives!r}")
    total = queries.new_zeros((), dtype=torch.float32)
    for v in range(views):
        for w in range(views):
            if v == w:
                continue
            logits = torch.einsum("bd,bjd->bj", queries[v].float(), routed_keys[w].float()) / temperature
            if mask is not None:
                logits = logits.masked_fill(mask, float("-inf"))
            total = total + F.cross_entropy(logits, own)
    return total / (views * (views - 1))


class RoutingStats(NamedTuple):
    """What one M-IDoL step's routing looked like (for the log)."""

    load: Tensor  # [N] share of the batch's images assigned to each expert
    agreement: Tensor  # share of images whose views' student routers agree with each other (argmax)
    code_agreement: Tensor  # share of images whose teacher codes agree across views (argmax)


def routing_stats(student_scores: Tensor, codes: Tensor, assignment: Tensor, num_experts: int) -> RoutingStats:
    """[V, B, N] scores and codes, [B] assignment -> :class:`RoutingStats` of this batch."""
    load = torch.bincount(assignment, minlength=num_experts).float() / assignment.numel()
    student_choice = student_scores.argmax(-1)
    code_choice = codes.argmax(-1)
    return RoutingStats(load, (student_choice == student_choice[0]).all(0).float().mean(),
                        (code_choice == code_choice[0]).all(0).float().mean())
