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

from dex.collectives import all_reduce_sum, is_distributed
from dex.models.backbones import family, four_map_indices, four_maps, stage_shapes
from dex.models.director_experts import DEXAux

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

    def forward(self, images: Tensor, noise_std: float = 0.0,
                router_eps: Sequence[Tensor | None] | None = None) -> tuple[list[Tensor], Tensor, list[DEXAux]]:
        """[B, 3, H, W] -> ([F^1 [B, C_1, H/4, W/4], ..., F^4 [B, C_4, H/32, W/32]], the pooled global feature
        [B, C]: a ViT's class token, a Swin's average of its last stage; a DEX backbone's aux output per block, for
        its alignment and balance terms, empty for another backbone). ``noise_std`` and ``router_eps`` drive a DEX
        backbone's router noise (:func:`~dex.models.backbones.four_maps`)."""
        maps, pooled, aux = four_maps(self.encoder, images, self.block_indices, noise_std, router_eps)
        if not self.vit:
            return maps, pooled, aux
        quarter, half, three_quarters, deepest = maps
        return [self.up4(quarter), self.up8(half), three_quarters, self.down32(deepest)], pooled, aux


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of every image that reaches it on any rank (ours):
    under ``torch.distributed`` the per-channel sums are all-reduced, with gradient, so that an expert normalises
    its group as one process holding the global batch would, on any backend (``nn.SyncBatchNorm`` refuses CPUs).

        mean = sum_{ranks, n, h, w} x / N,   var = sum (x - mean)^2 / N      (N: the global count per channel)
        y = (x - mean) / sqrt(var + eps) * weight + bias,
        running_mean <- (1 - m) running_mean + m mean,   running_var <- (1 - m) running_var + m var * N / (N - 1)

    An empty input (an expert that none of this rank's images chose) still takes part in the collectives and keeps
    the weight and bias in the graph (zero gradient); when no image anywhere reached it the running statistics and
    ``num_batches_tracked`` stay as they were. In eval mode, and in one process on a non-empty input, this is
    ``nn.BatchNorm2d``. The state dict is ``nn.BatchNorm2d``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W] (B may be 0 in training)."""
        if not self.training or (x.shape[0] and not is_distributed()):
            return super().forward(x)
        dims = (0, 2, 3)
        local = torch.cat([x.sum(dims), x.new_full((1,), x.numel() / x.shape[1])])
        summed = all_reduce_sum(local)
        count = summed[-1].detach()
        if count == 0:
            return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        mean = summed[:-1] / count
        squares = ((x - mean.view(1, -1, 1, 1)) ** 2).sum(dims)
        var = all_reduce_sum(squares) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), momentum)
        scale = self.weight * (var + self.eps).rsqrt()
        return (x - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _projection(in_channels: int, dim: int) -> nn.Sequential:
    """The 3-layer convolutional module of one scale (paper: 3 layers, BatchNorm, ReLU; the layers ours):
    conv3x3-BN-ReLU, conv3x3-BN-ReLU, conv1x1, C_l -> D -> D -> D; BatchNorm over the global batch
    (:class:`GlobalBatchNorm2d`)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, dim, 3, padding=1, bias=False), GlobalBatchNorm2d(dim), nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), GlobalBatchNorm2d(dim), nn.ReLU(inplace=True),
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
    the images are grouped by expert index and each expert runs once on its group. In eval an expert with no image
    is not called. In training every expert is called, an expert with no image on an empty group (no computation):
    its BatchNorm then takes part in the global batch's statistics (:class:`GlobalBatchNorm2d`) and its parameters
    get a zero gradient, the same in one process and on every rank of DDP (which needs a gradient for every
    parameter). In training an expert's BatchNorm sees the statistics of its group, over all ranks."""

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
            if group.numel() or self.training:
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


def _pair_cross_entropy(image_rows: Tensor, text_rows: Tensor, offset: int) -> Tensor:
    """1/2 [CE(image_rows, own pair) + CE(text_rows, own pair)]: [b, B] logits of b images against the global
    batch's B reports and of b reports against its B images; pair i of this rank is global pair ``offset + i``."""
    targets = offset + torch.arange(image_rows.shape[0], device=image_rows.device)
    return (F.cross_entropy(image_rows, targets) + F.cross_entropy(text_rows, targets)) / 2


def global_infonce(image: Tensor, text: Tensor, temperature: float | Tensor, all_images: Tensor | None = None,
                   all_texts: Tensor | None = None, offset: int = 0) -> Tensor:
    """The global image-report InfoNCE (paper; CLIP's symmetric form): with u_i = image_i / |image_i| and
    w_j = text_j / |text_j|, ``S_ij = u_i . w_j / temperature``,

        L_global = 1/2 [ CE(S, diag) + CE(S^T, diag) ],

    the mean of the image->report and report->image cross-entropies, each row's target its own pair.

    Args:
        image: [b, D] global image embeddings; text: [b, D] global report embeddings (pair i is matched).
        temperature: tau (a float or a learned scalar tensor).
        all_images, all_texts: under DDP the global batch's embeddings [B, D] (gathered with gradient,
            :func:`dex.collectives.gather_with_gradient`), and ``offset`` this rank's first pair in them:
            the loss is then this rank's rows of S and of S^T, whose mean over ranks is the one-process loss.
    """
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    if all_images is None:
        logits = image @ text.t() / temperature
        return _pair_cross_entropy(logits, logits.t(), 0)
    all_images, all_texts = F.normalize(all_images.float(), dim=-1), F.normalize(all_texts.float(), dim=-1)
    return _pair_cross_entropy(image @ all_texts.t() / temperature, text @ all_images.t() / temperature, offset)


def local_similarity(words: Tensor, word_mask: Tensor, local: Tensor, temp_attention: float = 4.0,
                     temp_similarity: float = 5.0) -> Tensor:
    """GLoRIA's image-report similarity Z_ij of :func:`local_gloria_loss` for every image i of ``local``
    [B_i, D, h, w] and report j of ``words`` [B_j, T, D] (``word_mask`` [B_j, T]) -> [B_i, B_j] (float32)."""
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
    cosine = (dot / norms.clamp_min(1e-8)).masked_fill(padded.squeeze(-1), float("-inf"))
    return torch.logsumexp(temp_similarity * cosine, dim=2) / temp_similarity


def local_gloria_loss(words: Tensor, word_mask: Tensor, local: Tensor, temp_attention: float = 4.0,
                      temp_similarity: float = 5.0, temp_loss: float = 10.0, all_words: Tensor | None = None,
                      all_word_masks: Tensor | None = None, all_local: Tensor | None = None,
                      offset: int = 0) -> Tensor:
    """The local loss (paper: GLoRIA-style; GLoRIA's formulation and temperatures, Huang et al., ICCV 2021), for
    every pair of image i (local features v_in, n over the h*w locations) and report j (words w_jt, t over its real
    words, ``word_mask``):

        s_ijtn = w_jt . v_in                                        (dot product, as GLoRIA)
        s'_ijtn = exp(s_ijtn) / sum_{t' real} exp(s_ijt'n)          (softmax over the report's words, per location)
        a_ijtn = exp(g1 s'_ijtn) / sum_n' exp(g1 s'_ijtn')          (softmax over the locations)
        c_ijt = sum_n a_ijtn v_in,   R_ijt = cos(c_ijt, w_jt)
        Z_ij = log( sum_{t real} exp(g2 R_ijt) )^(1 / g2)           = logsumexp_t(g2 R_ijt) / g2
        L_local = 1/2 [ CE(g3 Z, diag) + CE(g3 Z^T, diag) ]         (image->report rows, report->image columns)

    with g1, g2, g3 = ``temp_attention``, ``temp_similarity``, ``temp_loss`` (Z: :func:`local_similarity`). The
    word softmax before the location softmax is GLoRIA's released code (inherited from AttnGAN's DAMSM; the paper's
    equation writes the location softmax alone): it bounds the scores in [0, 1], the scale its g1 = 4 was tuned for,
    where raw dot products of unnormalised features would make g1 * s an almost hard argmax. Z carries the paper's
    1/g2 (the released code omits it, scaling the logits by g2). Padding and special words (``word_mask`` False)
    count nowhere, neither in the word softmax nor in Z. Every report needs one real word.

    All B x B pairs at once (ours, equal in value): |c_ijt|^2 = a_ijt^T (V_i V_i^T) a_ijt from each image's Gram
    matrix, so no [B, B, T, D] tensor is formed; memory O(B^2 T h w).

    Args:
        words: [b, T, D] word embeddings of the reports; word_mask: [b, T] True for a real word.
        local: [b, D, h, w] the local image features (V_local).
        all_words, all_word_masks, all_local: under DDP the global batch's [B, T', D], [B, T'] and [B, D, h, w]
            (gathered with gradient, the words padded to one length), and ``offset`` this rank's first pair: the
            loss is then this rank's rows of Z and of Z^T (its images against every report, its reports against
            every image), whose mean over ranks is the one-process loss.

    Returns:
        the scalar loss (float32).
    """
    if all_words is None:
        similarity = temp_loss * local_similarity(words, word_mask, local, temp_attention, temp_similarity)
        return _pair_cross_entropy(similarity, similarity.t(), 0)
    image_rows = local_similarity(all_words, all_word_masks, local, temp_attention, temp_similarity)
    text_rows = local_similarity(words, word_mask, all_local, temp_attention, temp_similarity).t()
    return _pair_cross_entropy(temp_loss * image_rows, temp_loss * text_rows, offset)


def report_type_loss(router_logits: Tensor, report_type: Tensor) -> Tensor:
    """L_aux (ours, our reading of the paper's auxiliary cross-entropy on the report type from t_g): the
    cross-entropy of the report router's logits [B, K] against the report-type index [B] (long), K the number of
    report types; it is what makes the router specialise by report type. -> scalar."""
    return F.cross_entropy(router_logits.float(), report_type)
