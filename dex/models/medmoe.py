"""MedMoE's image side and losses (arXiv 2506.08356, "Modality-Specialized Mixture of Experts for Medical
Vision-Language Understanding"): a feature pyramid, K multi-scale experts chosen by the report, and the three losses.

The method (paper), with B images, K experts, L = 4 scales, D the shared width, h x w the local grid:

- a feature pyramid F^1..F^4 of the backbone at H/4, H/8, H/16, H/32 (:class:`FeaturePyramid`);
- K experts, each a 3-layer convolutional module with BatchNorm and ReLU: expert k projects every scale into D
  channels (F_k^l), aligns the resolutions by interpolation and fuses them by per-location soft attention over the
  scales (:class:`ScaleExpert`),

      V_k = sum_l beta_k^l * F_k^l,      sum_l beta_k^l = 1 at every location;

- a hard router on the global report embedding t_g (:class:`ReportRouter`),

      alpha = softmax(W2 ReLU(W1 t_g)),   k* = argmax_k alpha_k,   V_local = V_{k*},

  only the chosen expert running (:class:`MoELocal`);
- the losses: a global image-report InfoNCE with cosine similarity and a temperature (:func:`global_infonce`), a
  GLoRIA-style local loss in which each word attends over the local features, ``c_t = sum_n a_tn v_n``, and the
  attended context is contrasted with the word (:func:`local_gloria_loss`), an auxiliary cross-entropy on the report
  type from t_g (:func:`report_type_loss`); in total ``L_global + L_local + lambda * L_aux``.

Paper scale: Swin-T with the MoE, 37M parameters and 7.8 GFLOPs with one expert active; K = 4 (CT, MRI, X-ray, US).

Ours, each marked so where it is made: how the pyramid is taken from a Swin and built from a ViT, the expert's
widths, the bilinear resizing to H/``out_stride`` and the 1x1-conv scale attention, the straight-through gradient
through the argmax, the image router for images without a report, and the reading of the auxiliary loss as the
report router's cross-entropy against the report type. The text encoder (t_g, word embeddings and their mask) and
the objective that wires the parts belong elsewhere.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from dex.models.backbones import family, four_map_indices, four_maps, stage_shapes

REDUCTIONS: tuple[int, ...] = (4, 8, 16, 32)  # the pyramid's strides (paper)


class FeaturePyramid(nn.Module):
    """The backbone's four maps F^1..F^4 at H/4, H/8, H/16, H/32: [B, 3, H, W] -> list of [B, C_l, H/r_l, W/r_l].

    - A Swin (paper): its four stages, ``forward_intermediates(norm=True, intermediates_only=True)`` (ours: as timm's
      ``features_only``, the final norm on the last stage only, while the backbone stays a plain timm model that dex
      exports and fine-tunes).
    - A ViT (ours, so that DEX and MedMoE experts compare on one backbone): UNETR's blocks at depths L/4, L/2, 3L/4
      (raw) and L (the final normalised tokens), all at H/16, brought to the four strides by ViTDet's simple feature
      pyramid: H/4 by two stride-2 transposed convs (C -> C/2, LayerNorm2d, GELU, C/2 -> C/4), H/8 by one (C ->
      C/2), H/16 as is, H/32 by 2x2 max-pooling. It needs 16 px patches and at least 4 blocks.

    ``channels`` holds C_l and ``reductions`` r_l, from H/4 to H/32.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.reductions = list(REDUCTIONS)
        self.block_indices = four_map_indices(encoder)  # refuses an encoder without four such maps, saying why
        self.vit = family(encoder) == "vit"
        if not self.vit:
            self.channels = [channels for channels, _ in stage_shapes(encoder)]
            return
        dim = encoder.embed_dim
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
        self.up8 = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
        self.down32 = nn.MaxPool2d(2)
        self.channels = [dim // 4, dim // 2, dim, dim]

    def forward(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """[B, 3, H, W] -> ([F^1 [B, C_1, H/4, W/4], ..., F^4 [B, C_4, H/32, W/32]], the pooled global feature
        [B, C]: a ViT's class token, a Swin's average of its last stage)."""
        maps, pooled = four_maps(self.encoder, images, self.block_indices)
        if not self.vit:
            return maps, pooled
        quarter, half, three_quarters, deepest = maps
        return [self.up4(quarter), self.up8(half), three_quarters, self.down32(deepest)], pooled


def _projection(in_channels: int, dim: int) -> nn.Sequential:
    """The 3-layer convolutional module of one scale (paper: 3 layers, BatchNorm, ReLU; the layers ours):
    conv3x3-BN-ReLU, conv3x3-BN-ReLU, conv1x1, C_l -> D -> D -> D."""
    return nn.Sequential(
        nn.Conv2d(in_channels, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, 1),
    )


class ScaleExpert(nn.Module):
    """One expert: every scale projected into D channels, resized to a common grid, fused by scale attention.

        F_k^l = resize(P_k^l(F^l))                 [B, D, h, w], h = H / out_stride
        beta_k = softmax_l(A_k([F_k^1; ...; F_k^L]))  [B, L, h, w]
        V_k = sum_l beta_k^l * F_k^l               [B, D, h, w]

    P_k^l is the 3-layer module of :func:`_projection` (paper; its layers ours), the resizing bilinear to
    H/``out_stride`` (ours; the paper aligns the resolutions by interpolation), A_k a 1x1 conv on the concatenated
    projected maps giving L logits per location (ours; the paper: per-location soft attention over the scales).

    Args:
        channels: C_l of each scale (:attr:`FeaturePyramid.channels`).
        dim: D, the shared width.
        out_stride: the stride of V's grid (ours: 16, a Swin-T's H/16 and a ViT's patch grid).
        reductions: r_l of each scale (:attr:`FeaturePyramid.reductions`).
    """

    def __init__(self, channels: Sequence[int], dim: int, out_stride: int = 16,
                 reductions: Sequence[int] = REDUCTIONS) -> None:
        super().__init__()
        if len(channels) != len(reductions):
            raise ValueError(f"{len(channels)} channel counts for {len(reductions)} scales")
        self.out_stride = out_stride
        self.reductions = list(reductions)
        self.projections = nn.ModuleList(_projection(c, dim) for c in channels)
        self.attention = nn.Conv2d(len(channels) * dim, len(channels), 1)

    def forward(self, pyramid: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """L maps [B, C_l, H/r_l, W/r_l] -> (V_k [B, D, h, w], beta_k [B, L, h, w])."""
        height, width = (size * self.reductions[0] for size in pyramid[0].shape[-2:])
        grid = (height // self.out_stride, width // self.out_stride)
        projected = []
        for projection, features in zip(self.projections, pyramid):
            mapped = projection(features)
            if mapped.shape[-2:] != grid:
                mapped = F.interpolate(mapped, size=grid, mode="bilinear", align_corners=False)
            projected.append(mapped)
        beta = self.attention(torch.cat(projected, 1)).softmax(1)
        fused = sum(beta[:, l:l + 1] * mapped for l, mapped in enumerate(projected))
        return fused, beta


class MoELocal(nn.Module):
    """K :class:`ScaleExpert` s, each image computed by its own expert only (paper: only the chosen expert runs):
    the images are grouped by expert index, each expert runs once on its group, and an expert with no image is not
    called, in training and in eval alike. In training an expert's BatchNorm sees the statistics of its group."""

    def __init__(self, channels: Sequence[int], dim: int, num_experts: int, out_stride: int = 16,
                 reductions: Sequence[int] = REDUCTIONS) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.experts = nn.ModuleList(ScaleExpert(channels, dim, out_stride, reductions) for _ in range(num_experts))

    def forward(self, pyramid: Sequence[Tensor], experts: Tensor, gate: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """L maps [B, C_l, H/r_l, W/r_l] and each image's expert [B] (long) -> (V_local [B, D, h, w] = V_{k_i} of
        each image i, times ``gate`` [B] where given (:attr:`Routing.gate`); beta [B, L, h, w] of that expert)."""
        counts = torch.bincount(experts, minlength=self.num_experts)
        if counts.numel() != self.num_experts:
            raise ValueError(f"expert index {counts.numel() - 1} for {self.num_experts} experts")
        order = torch.argsort(experts, stable=True)
        fused, betas = [], []
        for expert, group in zip(self.experts, order.split(counts.tolist())):
            if group.numel():
                local, beta = expert([features[group] for features in pyramid])
                fused.append(local)
                betas.append(beta)
        restore = torch.argsort(order)
        local, beta = torch.cat(fused)[restore], torch.cat(betas)[restore]
        if gate is not None:
            local = local * gate.view(-1, 1, 1, 1)
        return local, beta


class Routing(NamedTuple):
    """The report router's decision for B images."""

    logits: Tensor  # [B, K] W2 ReLU(W1 t_g)
    probs: Tensor  # [B, K] alpha
    expert: Tensor  # [B] k*, long
    gate: Tensor  # [B] alpha_{k*} / stopgrad(alpha_{k*}): 1 in value, the router's gradient path


class ReportRouter(nn.Module):
    """The hard router on the report (paper): ``alpha = softmax(W2 ReLU(W1 t_g))``, ``k* = argmax alpha``.

    The argmax has no gradient; the router learns through a straight-through gate (ours),
    ``V_local = V_{k*} * alpha_{k*} / stopgrad(alpha_{k*})``: the value is V_{k*}, and the gradient reaches
    alpha_{k*} (pass :attr:`Routing.gate` to :class:`MoELocal`), besides the auxiliary loss on the logits.

    Args:
        text_dim: H_t, the width of t_g.
        num_experts: K.
        hidden: the width of W1 (ours).
    """

    def __init__(self, text_dim: int, num_experts: int, hidden: int = 256) -> None:
        super().__init__()
        self.w1 = nn.Linear(text_dim, hidden)
        self.w2 = nn.Linear(hidden, num_experts)

    def forward(self, report: Tensor) -> Routing:
        """t_g [B, H_t] -> :class:`Routing`."""
        logits = self.w2(F.relu(self.w1(report)))
        probs = logits.softmax(-1)
        expert = probs.argmax(-1)
        chosen = probs.gather(1, expert.unsqueeze(1)).squeeze(1)
        return Routing(logits, probs, expert, chosen / chosen.detach())


class ImageRouter(nn.Module):
    """The router of images without a report (ours, one of the issue's two options): a Linear-ReLU-Linear MLP on the
    pooled global image feature, [B, C] -> logits [B, K], its argmax the expert; trained by
    :func:`image_router_loss` to predict the report router's choice. Whether its loss reaches the backbone is the
    objective's choice (pass a detached feature to keep it from it).

    Args:
        image_dim: C, the width of the pooled feature.
        num_experts: K.
        hidden: the MLP's width (ours).
    """

    def __init__(self, image_dim: int, num_experts: int, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(image_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    def forward(self, pooled: Tensor) -> Tensor:
        """[B, C] -> [B, K] logits."""
        return self.mlp(pooled)


def image_router_loss(image_logits: Tensor, report_experts: Tensor) -> Tensor:
    """The image router's cross-entropy to the report router's choice k* (ours): logits [B, K], k* [B] (long; an
    index, so no gradient reaches the report router) -> scalar."""
    return F.cross_entropy(image_logits.float(), report_experts)


def global_infonce(image: Tensor, text: Tensor, temperature: float | Tensor) -> Tensor:
    """The global image-report InfoNCE (paper; CLIP's symmetric form): with u_i = image_i / |image_i| and
    w_j = text_j / |text_j|, ``S_ij = u_i . w_j / temperature``,

        L_global = 1/2 [ CE(S, diag) + CE(S^T, diag) ],

    the mean of the image->report and report->image cross-entropies, each row's target its own pair.

    Args:
        image: [B, D] global image embeddings; text: [B, D] global report embeddings (pair i is matched).
        temperature: tau (a float or a learned scalar tensor).
    """
    logits = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).t() / temperature
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def local_gloria_loss(words: Tensor, word_mask: Tensor, local: Tensor, temp_attention: float = 4.0,
                      temp_similarity: float = 5.0, temp_loss: float = 10.0) -> Tensor:
    """The local loss (paper: GLoRIA-style; GLoRIA's formulation and temperatures, Huang et al., ICCV 2021), for
    every pair of image i (local features v_in, n over the h*w locations) and report j (words w_jt, t over its real
    words, ``word_mask``):

        s_ijtn = w_jt . v_in                                        (dot product, as GLoRIA)
        s'_ijtn = exp(s_ijtn) / sum_{t' real} exp(s_ijt'n)          (softmax over the report's words, per location)
        a_ijtn = exp(g1 s'_ijtn) / sum_n' exp(g1 s'_ijtn')          (softmax over the locations)
        c_ijt = sum_n a_ijtn v_in,   R_ijt = cos(c_ijt, w_jt)
        Z_ij = log( sum_{t real} exp(g2 R_ijt) )^(1 / g2)           = logsumexp_t(g2 R_ijt) / g2
        L_local = 1/2 [ CE(g3 Z, diag) + CE(g3 Z^T, diag) ]         (image->report rows, report->image columns)

    with g1, g2, g3 = ``temp_attention``, ``temp_similarity``, ``temp_loss``. The word softmax before the location
    softmax is GLoRIA's released code (inherited from AttnGAN's DAMSM; the paper's equation writes the location
    softmax alone): it bounds the scores in [0, 1], the scale its g1 = 4 was tuned for, where raw dot products of
    unnormalised features would make g1 * s an almost hard argmax. Z carries the paper's 1/g2 (the released code
    omits it, scaling the logits by g2). Padding and special words (``word_mask`` False) count nowhere, neither in
    the word softmax nor in Z. Every report needs one real word.

    All B x B pairs at once (ours, equal in value): |c_ijt|^2 = a_ijt^T (V_i V_i^T) a_ijt from each image's Gram
    matrix, so no [B, B, T, D] tensor is formed; memory O(B^2 T h w).

    Args:
        words: [B, T, D] word embeddings of the reports; word_mask: [B, T] True for a real word.
        local: [B, D, h, w] the local image features (V_local).

    Returns:
        the scalar loss (float32).
    """
    if not bool(word_mask.any(1).all()):
        raise ValueError("every report needs at least one real word in word_mask")
    words = words.float()
    regions = local.float().flatten(2).transpose(1, 2)  # [B_i, N, D]
    padded = ~word_mask.bool()[None, :, :, None]  # [1, B_j, T, 1]
    scores = torch.einsum("jtd,ind->ijtn", words, regions)  # [B_i, B_j, T, N]
    normalised = scores.masked_fill(padded, float("-inf")).softmax(2)
    attention = (temp_attention * normalised).softmax(3)
    dot = (attention * scores).sum(-1)  # w_jt . c_ijt  [B_i, B_j, T]
    gram = regions @ regions.transpose(1, 2)  # [B_i, N, N]
    context_sq = (torch.einsum("ijtn,inm->ijtm", attention, gram) * attention).sum(-1)
    norms = context_sq.clamp_min(1e-16).sqrt() * words.norm(dim=-1).unsqueeze(0)
    cosine = dot / norms.clamp_min(1e-8)
    cosine = cosine.masked_fill(padded.squeeze(-1), float("-inf"))
    logits = temp_loss * torch.logsumexp(temp_similarity * cosine, dim=2) / temp_similarity  # [B_i, B_j]
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def report_type_loss(router_logits: Tensor, report_type: Tensor) -> Tensor:
    """L_aux (ours, our reading of the paper's auxiliary cross-entropy on the report type from t_g): the
    cross-entropy of the report router's logits [B, K] against the report-type index [B] (long), K the number of
    report types; it is what makes the router specialise by report type. -> scalar."""
    return F.cross_entropy(router_logits.float(), report_type)
