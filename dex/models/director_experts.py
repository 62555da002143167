"""The DEX module: a pool of MLP experts chosen per image, and a director updated by group EMA.

Equation numbers refer to the DEX paper (He, You, Li: "Learning Emergent Modular Representations in
Multi-modality Medical Vision Foundation Models"), Sec. 3 and App. B. Where the authors' reference code
differs, the paper is the default and the reference's choice is an option (see docs/paper-vs-reference.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dex.collectives import all_reduce_sum, is_distributed
from dex.models.kernels import segment_linear

Mode = Literal["pretrain", "experts", "director"]
MODES: tuple[str, ...] = ("pretrain", "experts", "director")
EPS = 1e-6  # the epsilon of Eq. 19 and of delta_r in Eq. 21
# Device types with autocast, asked once here: torch 2.11 raises when asked about autocast on other devices (meta),
# and torch.compile of 2.11 breaks the graph on is_autocast_available inside a forward.
AUTOCAST_DEVICES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(d))


@dataclass(frozen=True)
class DEXSettings:
    """The settings of the DEX modules of a model: the one definition that :class:`DirectorExperts`,
    :class:`ExpertRouter`, :class:`~dex.models.dex_vit.DEXViT` and a model folder's ``config.json`` (the ``dex``
    block of ``model_args``) share.

    ``num_experts`` (R) and ``top_k`` (K) are one value for every block or, for a whole model, one per block (R = 0
    makes a block a plain ViT block); :meth:`layer` gives one block's settings. The strength of the router noise,
    sigma of Eq. 21, is not a setting of the model: it is a schedule of training (``noise_std`` of the pretraining
    config), passed to every forward.
    """

    num_experts: int | tuple[int, ...] = 8  # R
    top_k: int | tuple[int, ...] = 2  # K
    activation: Literal["image", "token"] = "image"  # one expert set per image (the paper's) or per token
    pooling: Literal["cls", "mean"] = "cls"  # the image's routing feature: class token or mean patch token
    router_temperature: float = 1.0  # tau of softmax(logits / tau): 1 in the paper, 0.5 in the reference code (D3)
    balance: Literal["switch", "reference"] = "switch"  # Eq. 18, or the reference's R * sum P * stopgrad(P) (D2)
    alignment: Literal["cosine", "kd", "none"] = "cosine"  # Eq. 15, the reference's KD (D1), or no director
    usage_momentum: float = 0.99  # mu of Eq. 20: the long-term usage c that the frequency-aware noise follows
    expert_init: Literal["independent", "copy"] = "independent"  # experts drawn apart, or copies of the director (D10)

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int):
                object.__setattr__(self, name, tuple(int(v) for v in value))
        choices = {"activation": ("image", "token"), "pooling": ("cls", "mean"), "balance": ("switch", "reference"),
                   "alignment": ("cosine", "kd", "none"), "expert_init": ("independent", "copy")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.router_temperature <= 0:
            raise ValueError(f"router temperature must be positive, got {self.router_temperature}")
        if not 0 <= self.usage_momentum <= 1:
            raise ValueError(f"usage_momentum must be in [0, 1], got {self.usage_momentum}")

    @classmethod
    def resolve(cls, settings: DEXSettings | Mapping[str, Any] | None = None, **overrides: Any) -> DEXSettings:
        """Settings from a :class:`DEXSettings`, a mapping (a ``config.json`` block) or None (the defaults), with
        ``overrides`` (e.g. ``num_experts=4``) replacing fields; an unknown name is a TypeError, as for any
        constructor argument."""
        if isinstance(settings, Mapping):
            settings = cls(**settings)
        return dataclasses.replace(settings or cls(), **overrides)

    @classmethod
    def from_model_args(cls, model_args: Mapping[str, Any]) -> DEXSettings:
        """The settings in a model's arguments (a run's ``model_args``, a ``config.json``'s): its ``dex`` block and
        any fields given one by one, which win."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls.resolve(model_args.get("dex"), **{k: v for k, v in model_args.items() if k in fields})

    def per_layer(self, depth: int) -> tuple[list[int], list[int]]:
        """R and K of each of ``depth`` blocks (K is 0 where R is 0), checked."""
        experts = per_block(self.num_experts, depth, "num_experts")
        if any(r < 0 for r in experts):
            raise ValueError(f"num_experts (R) must be at least 1, or 0 for a plain MLP block, got {experts}")
        top_ks = [k if r else 0 for r, k in zip(experts, per_block(self.top_k, depth, "top_k"))]
        for r, k in zip(experts, top_ks):
            if r:
                _check_experts(r, k)
        return experts, top_ks

    def layer(self, index: int, depth: int) -> DEXSettings | None:
        """The settings of block ``index`` of ``depth`` (scalar R and K), or None where the block has no experts."""
        experts, top_ks = self.per_layer(depth)
        if not experts[index]:
            return None
        return dataclasses.replace(self, num_experts=experts[index], top_k=top_ks[index])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (per-block values as lists) that :meth:`resolve` reads back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def per_block(value: int | Sequence[int], depth: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * depth
    values = list(value)
    if len(values) != depth:
        raise ValueError(f"{name} lists one value per block: expected {depth} values, got {len(values)}")
    return values


class Routing(NamedTuple):
    """The routing of one forward pass of one DEX module.

    ``U`` is the number of routed units: B images (image-wise) or B*N tokens (token-wise).
    """

    indices: Tensor  # [U, K] long: the chosen experts, highest score first
    weights: Tensor  # [U, K] float: w_k = s_k / sum of the K chosen scores (Eq. 5)
    scores: Tensor  # [U, R] float: s = softmax((f pi + noise) / tau) (Eq. 21)


class DEXAux(NamedTuple):
    """Per-layer by-products of a DEX module forward, ``None`` where the mode does not compute them."""

    alignment: Tensor | None  # scalar L_co of this layer (Eq. 15)
    balance: Tensor | None  # scalar L_bal of this layer (Eq. 18)
    routing: Routing | None


def _dense(routing: Routing, num_experts: int) -> Tensor:
    """Scatter the K activation weights of each unit into a dense [U, R] matrix (zero where not chosen)."""
    return torch.zeros(
        routing.weights.shape[0], num_experts, dtype=routing.weights.dtype, device=routing.weights.device
    ).scatter(1, routing.indices, routing.weights)


def _batch_mean(values: Tensor, global_batch: bool) -> Tensor:
    """Mean over the units; with ``global_batch`` under torch.distributed, over the units of every rank.

    The all-reduce is differentiable: its backward sums the ranks' gradients, which DDP's averaging then divides
    by the world size again, so the gradient is that of one process holding the whole global batch.
    """
    mean = values.mean(0)
    if global_batch and is_distributed():
        mean = all_reduce_sum(mean) / dist.get_world_size()
    return mean


def balance_loss(scores: Tensor, indices: Tensor, global_batch: bool = False) -> Tensor:
    """Eq. 18: ``R * sum_r mean_u(s_ur) * mean_u(I_ur)`` with I the hard top-K indicator.

    Args:
        scores: [U, R] soft activation scores.
        indices: [U, K] chosen experts.
        global_batch: average over every rank's units (the batch B of Eq. 18 is the global batch).
    """
    num_experts = scores.shape[-1]
    chosen = torch.zeros_like(scores).scatter(1, indices, 1.0)
    return num_experts * (_batch_mean(scores, global_batch) * _batch_mean(chosen, global_batch)).sum()


def balance_loss_reference(scores: Tensor, global_batch: bool = False) -> Tensor:
    """The reference code's balance loss: ``R * sum_r P_r * stopgrad(P_r)``, P the mean soft score (D2)."""
    mean_scores = _batch_mean(scores, global_batch)
    return scores.shape[-1] * (mean_scores * mean_scores.detach()).sum()


def alignment_loss(experts_out: Tensor, director_out: Tensor) -> Tensor:
    """Eq. 15: ``1 - cos(f_E, f_D)`` per token, averaged over all tokens. Computed in float32."""
    return (1.0 - F.cosine_similarity(experts_out.float(), director_out.float(), dim=-1)).mean()


def alignment_loss_kd(
    experts_out: Tensor, director_out: Tensor, teacher_temperature: float = 0.5, student_temperature: float = 1.0
) -> Tensor:
    """The reference code's alignment loss (D1): softmax cross-entropy over channels, averaged over tokens."""
    teacher = F.softmax(director_out.float() / teacher_temperature, dim=-1)
    log_student = F.log_softmax(experts_out.float() / student_temperature, dim=-1)
    return -(teacher * log_student).sum(-1).mean()


@torch.no_grad()
def group_ema_(director: Sequence[Tensor], experts: Sequence[Tensor], omega: Tensor, momentum: float | Tensor) -> None:
    """Group EMA (Eq. 7): ``eta <- m * eta + (1 - m) * sum_r Omega_r * theta_r``, batched over the R experts
    (one weighted sum and one in-place lerp per tensor, no loop over experts).

    Args:
        director: the director's tensors eta, each of shape S.
        experts: the matching stacked expert tensors theta, each [R, *S].
        omega: [R] expert contribution weights (Eq. 6), summing to one.
        momentum: m in [0, 1]; m = 1 leaves the director unchanged.

    Sharded tensors (FSDP) are updated shard by shard: the experts are sharded along the dimension that matches
    the director's (see ``dex.train.distributed.shard_model``), so each rank's update is local.
    """
    for eta, theta in zip(director, experts, strict=True):
        eta, theta = _local(eta), _local(theta)
        weight = 1.0 - momentum
        if isinstance(weight, Tensor):
            weight = weight.to(eta.dtype)
        eta.lerp_(torch.tensordot(omega.to(theta.dtype), theta, dims=1), weight)


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def layer_weights(depth: int) -> Tensor:
    """The layer factors of Eq. 8: ``alpha_l = 1 / (L - (l - 1))`` for l = 1..L, i.e. 1/L ... 1/2, 1."""
    return 1.0 / torch.arange(depth, 0, -1, dtype=torch.float32)


class LayerLosses(NamedTuple):
    """The auxiliary terms of Eq. 8 before their coefficients, and their per-layer values."""

    alignment: Tensor  # (1/L) sum_l alpha_l L_co^l
    balance: Tensor  # (1/L) sum_l L_bal^l
    alignment_per_layer: Tensor  # [L] L_co^l (0 where the mode computes none)
    balance_per_layer: Tensor  # [L] L_bal^l (0 where the mode computes none)

    def added_to(self, loss: Tensor, lambda_co: float, lambda_bal: float) -> Tensor:
        """Eq. 8: a method's ``loss`` + lambda_co * alignment + lambda_bal * balance (summed in this order)."""
        return loss + lambda_co * self.alignment + lambda_bal * self.balance


def layer_losses(aux: Sequence[DEXAux], device: torch.device | None = None) -> LayerLosses:
    """Combine the per-layer alignment and balance losses as Eq. 8 does."""
    zero = torch.zeros((), device=device)
    if not aux:  # an encoder without DEX blocks
        return LayerLosses(zero, zero, zero.new_zeros(0), zero.new_zeros(0))
    alignment = torch.stack([zero if a.alignment is None else a.alignment.float() for a in aux])
    balance = torch.stack([zero if a.balance is None else a.balance.float() for a in aux])
    depth = len(aux)
    weights = layer_weights(depth).to(alignment.device)
    return LayerLosses((weights * alignment).sum() / depth, balance.sum() / depth, alignment, balance)


class ExpertRouter(nn.Module):
    """Chooses the top-K of R experts per image (Sec. 3.2, Eq. 5) or per token, with frequency-aware noise.

    The routing feature of an image is its class token or the mean of its patch tokens; a bias-free linear map
    pi (C x R) gives logits, training adds ``sigma * (eps + delta_r)`` (Eq. 21), and
    ``s = softmax(logits / tau)``. The buffer ``usage`` is the long-term activation distribution c (Eq. 20);
    ``usage_sum`` accumulates the batch-summed activation weights between two :meth:`update_usage_` calls.
    """

    def __init__(self, dim: int, settings: DEXSettings | None = None, num_prefix_tokens: int = 1,
                 **overrides: Any) -> None:
        super().__init__()
        settings = DEXSettings.resolve(settings, **overrides)
        if not isinstance(settings.num_experts, int) or not isinstance(settings.top_k, int):
            raise ValueError(f"a router takes one R and one K, got {settings.num_experts} and {settings.top_k}")
        _check_experts(settings.num_experts, settings.top_k)
        if settings.pooling == "cls" and num_prefix_tokens < 1:
            raise ValueError("pooling='cls' needs a class token (num_prefix_tokens >= 1)")
        num_experts = settings.num_experts
        self.num_experts = num_experts
        self.top_k = settings.top_k
        self.activation = settings.activation
        self.pooling = settings.pooling
        self.temperature = settings.router_temperature
        self.balance = settings.balance
        self.num_prefix_tokens = num_prefix_tokens
        self.usage_momentum = settings.usage_momentum
        self.proj = nn.Linear(dim, num_experts, bias=False)  # pi, stored as [R, C]
        self.register_buffer("usage", torch.zeros(num_experts))
        self.register_buffer("usage_sum", torch.zeros(num_experts), persistent=False)

    def routing_features(self, x: Tensor) -> Tensor:
        """[B, N, C] tokens -> [U, C]: one global feature per image, or every token."""
        if self.activation == "token":
            return x.reshape(-1, x.shape[-1])
        if self.pooling == "cls":
            return x[:, 0]
        return x[:, self.num_prefix_tokens :].mean(1)

    def forward(self, x: Tensor, noise_std: float = 0.0, eps: Tensor | None = None) -> tuple[Routing, Tensor]:
        """Route a batch of token sequences.

        Args:
            x: [B, N, C] normalised tokens.
            noise_std: sigma of Eq. 21; applied only in training.
            eps: [U, R] standard normal draws for the noise; drawn here when None.

        Returns:
            The routing (U = B image-wise, B*N token-wise) and the balance loss.
        """
        logits = self.proj(self.routing_features(x)).float()
        if self.training and noise_std > 0:
            delta = 1.0 - self.usage / (self.usage.sum() + EPS)
            eps = torch.randn_like(logits) if eps is None else eps.to(logits)
            logits = logits + noise_std * (eps + delta)
        scores = F.softmax(logits / self.temperature, dim=-1)
        top_scores, indices = scores.topk(self.top_k, dim=-1)
        weights = top_scores / top_scores.sum(-1, keepdim=True)
        if self.balance == "switch":
            loss = balance_loss(scores, indices, global_batch=self.training)
        else:
            loss = balance_loss_reference(scores, global_batch=self.training)
        return Routing(indices, weights, scores), loss

    @torch.no_grad()
    def accumulate_usage_(self, routing: Routing) -> None:
        """Add this batch's activation weights to ``usage_sum`` (the numerators of Eq. 6 and 19)."""
        self.usage_sum += _dense(routing, self.num_experts).sum(0).to(self.usage_sum.dtype)

    @torch.no_grad()
    def update_usage_(self, omega: Tensor, has_usage: Tensor) -> None:
        """Eq. 20: ``c <- mu * c + (1 - mu) * c_hat`` with c_hat = omega, skipped when nothing was routed."""
        self.usage.lerp_(omega, (1.0 - self.usage_momentum) * has_usage.to(omega.dtype))


class ExpertBank(nn.Module):
    """R MLP experts (C -> hidden -> C, GELU) stored as stacked tensors: fc1 [R, H, C], fc2 [R, C, H].

    Each expert r is ``fc2[r] @ gelu(fc1[r] @ x + b1[r]) + b2[r]``, the layout of a timm ``Mlp`` per slice.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dispatch = "grouped"  # or "loop": the reference code's per-expert gather / scatter
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform per expert (as each expert were an ``nn.Linear`` under MAE's init), zero biases."""
        for weight in (self.fc1_weight, self.fc2_weight):
            fan_out, fan_in = weight.shape[-2:]
            bound = (6.0 / (fan_in + fan_out)) ** 0.5
            nn.init.uniform_(weight, -bound, bound)
        nn.init.zeros_(self.fc1_bias)
        nn.init.zeros_(self.fc2_bias)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The stacked tensors in the order of a timm ``Mlp``'s fc1.weight, fc1.bias, fc2.weight, fc2.bias."""
        return self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias

    @torch.no_grad()
    def copy_from_mlp_(self, mlp: Mlp) -> None:
        """Set every expert to the weights of ``mlp`` (the reference code's warm start, D10)."""
        for stacked, source in zip(self.tensors(), _mlp_tensors(mlp), strict=True):
            stacked.copy_(source.unsqueeze(0).expand_as(stacked))

    def forward(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """Eq. 5: ``y_u = sum_k w_uk * E_{indices[u, k]}(x_u)``.

        Args:
            x: [U, T, C] routed units (T tokens each: T = N image-wise, T = 1 token-wise).
            indices: [U, K] chosen experts per unit.
            weights: [U, K] their activation weights.

        Returns:
            [U, T, C]. With ``dispatch == "grouped"`` (the default) the U*K (unit, expert) pairs are sorted by
            expert so that each expert's share is one contiguous segment, and each linear layer is one grouped
            matrix product (:func:`dex.models.kernels.segment_linear`): shapes stay static and nothing waits for the
            device. ``dispatch = "loop"`` runs the reference code's per-expert gather and scatter instead.
        """
        if self.dispatch == "loop":
            return self._forward_loop(x, indices, weights)
        num_units, tokens, dim = x.shape
        top_k = indices.shape[1]
        device = x.device.type
        autocast = device in AUTOCAST_DEVICES and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        flat_experts = indices.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        sorted_experts = flat_experts[order]
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_experts, torch.ones_like(flat_experts)) * tokens
        x_sorted = x[order // top_k].reshape(-1, dim).to(dtype)  # [U*K*T, C]
        hidden = segment_linear(x_sorted, self.fc1_weight.to(dtype), counts)
        hidden = hidden.view(-1, tokens, hidden.shape[-1]) + self.fc1_bias[sorted_experts].unsqueeze(1).to(dtype)
        hidden = F.gelu(hidden).reshape(-1, hidden.shape[-1])
        out = segment_linear(hidden, self.fc2_weight.to(dtype), counts)
        out = out.view(-1, tokens, dim) + self.fc2_bias[sorted_experts].unsqueeze(1).to(dtype)
        unsorted = torch.empty_like(out).index_copy_(0, order, out).view(num_units, top_k, tokens, dim)
        return torch.einsum("uktc,uk->utc", unsorted, weights.to(unsorted.dtype))

    def _forward_loop(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """The straightforward path, as the reference code does it: for each expert, find its units
        (``nonzero``, a host synchronisation), gather them, run the expert, scatter-add the weighted result."""
        out = torch.zeros_like(x)
        for r in range(self.num_experts):
            unit, slot = (indices == r).nonzero(as_tuple=True)
            if unit.numel() == 0:
                continue
            hidden = F.gelu(x[unit] @ self.fc1_weight[r].T + self.fc1_bias[r])
            result = hidden @ self.fc2_weight[r].T + self.fc2_bias[r]
            out = out.index_add(0, unit, result * weights[unit, slot].to(result.dtype)[:, None, None])
        return out


def _mlp_tensors(mlp: Mlp) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias


def _check_experts(num_experts: int, top_k: int) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts (R) must be at least 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k (K) must be between 1 and num_experts={num_experts}, got {top_k}")


class DirectorExperts(nn.Module):
    """One DEX module (Sec. 3.2-3.3): R experts chosen by an :class:`ExpertRouter`, and a director.

    Modes (switch with :meth:`set_mode`, no new model needed):

    - ``pretrain``: the output is the experts' mixture f_E (Eq. 5); the director's output f_D (no gradient)
      is the target of the alignment loss (Eq. 15); the routing's activation weights are accumulated for the
      group EMA (Eq. 6-7) and the usage statistics (Eq. 19-20), applied by :meth:`update_director_`.
    - ``experts``: fine-tuning through the K chosen experts (DEX-E); K may be changed.
    - ``director``: the director alone, so the block is a plain ViT block (DEX-D).

    With ``alignment="none"`` there is no director target and no group EMA: experts without a director, the
    "+Experts" ablation of Table 6.

    The director is a timm ``Mlp`` of the experts' shape. It is trainable only in ``director`` mode; in
    ``pretrain`` mode it changes only through :meth:`update_director_`.
    """

    def __init__(self, dim: int, hidden_dim: int, settings: DEXSettings | None = None, num_prefix_tokens: int = 1,
                 mode: Mode = "pretrain", **overrides: Any) -> None:
        super().__init__()
        settings = DEXSettings.resolve(settings, **overrides)
        self.alignment = settings.alignment
        self.expert_init = settings.expert_init
        self.router = ExpertRouter(dim, settings, num_prefix_tokens)
        num_experts = settings.num_experts
        self.experts = ExpertBank(dim, hidden_dim, num_experts)
        self.director = Mlp(dim, hidden_dim, act_layer=nn.GELU)
        self.mode: Mode = "pretrain"
        self.set_mode(mode)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def settings(self) -> DEXSettings:
        """This module's settings as they are now (K included, which :meth:`set_mode` may change)."""
        router = self.router
        return DEXSettings(router.num_experts, router.top_k, router.activation, router.pooling, router.temperature,
                           router.balance, self.alignment, router.usage_momentum, self.expert_init)

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def set_mode(self, mode: Mode, top_k: int | None = None) -> None:
        """Switch between ``pretrain``, ``experts`` and ``director``, optionally with a new K.

        Sets ``requires_grad`` of this module's parameters to what the mode uses: router and experts in
        ``pretrain``/``experts``, the director in ``director``. Freeze parts of the model after this call.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if top_k is not None:
            _check_experts(self.num_experts, top_k)
            self.router.top_k = top_k
        self.mode = mode
        self.router.requires_grad_(mode != "director")
        self.experts.requires_grad_(mode != "director")
        self.director.requires_grad_(mode == "director")

    def forward(self, x: Tensor, noise_std: float = 0.0, eps: Tensor | None = None) -> tuple[Tensor, DEXAux]:
        """[B, N, C] normalised tokens -> ([B, N, C], per-layer aux); ``eps`` as for :class:`ExpertRouter`."""
        if self.mode == "director":
            return self.director(x), DEXAux(None, None, None)
        routing, balance = self.router(x, noise_std, eps)
        batch, tokens, dim = x.shape
        units = x if self.router.activation == "image" else x.reshape(batch * tokens, 1, dim)
        out = self.experts(units, routing.indices, routing.weights).view(batch, tokens, dim)
        alignment = None
        if self.mode == "pretrain":
            if self.alignment != "none":
                with torch.no_grad():
                    target = self.director(x)
                loss = alignment_loss if self.alignment == "cosine" else alignment_loss_kd
                alignment = loss(out, target)
            if self.training:
                self.router.accumulate_usage_(routing)
        detached = Routing(routing.indices, routing.weights.detach(), routing.scores.detach())
        return out, DEXAux(alignment, balance, detached)

    @torch.no_grad()
    def update_director_(self, momentum: float | Tensor, usage_sum: Tensor | None = None) -> None:
        """After an optimizer step: group EMA of the director (Eq. 6-7), then the usage EMA (Eq. 19-20).

        Args:
            momentum: m of Eq. 7.
            usage_sum: [R] activation weights summed over the (global) batch; defaults to this module's
                accumulator. The accumulator is reset. Nothing changes if no weight was accumulated.
        """
        if usage_sum is None:
            usage_sum = self.router.usage_sum
        total = usage_sum.sum()
        has_usage = total > 0
        omega = usage_sum / (total + EPS)  # Eq. 6 and Eq. 19 (the same normalisation)
        if self.alignment != "none":  # without alignment the director plays no part
            # m = 1 (no change) when no image was routed since the last update; no host sync either way.
            momentum = torch.where(has_usage, torch.as_tensor(momentum, dtype=omega.dtype, device=omega.device), 1.0)
            group_ema_(_mlp_tensors(self.director), self.experts.tensors(), omega, momentum)
        self.router.update_usage_(omega, has_usage)
        self.router.usage_sum.zero_()


def _pretraining_modules(model: nn.Module) -> list[DirectorExperts]:
    return [m for m in model.modules() if isinstance(m, DirectorExperts) and m.mode == "pretrain"]


@torch.no_grad()
def update_directors_(model: nn.Module, momentum: float | Tensor) -> list[Tensor]:
    """Run :meth:`DirectorExperts.update_director_` on every DEX module of ``model``, after the optimizer step.

    Under ``torch.distributed`` the accumulated activation weights are summed over all ranks first (one
    all-reduce for all layers), so every rank applies the same update and holds the same director.

    Returns each module's share of the step's activation weight per expert (Omega of Eq. 6), in module order.
    """
    modules = _pretraining_modules(model)
    if not modules:
        return []
    sums = [m.router.usage_sum for m in modules]
    if dist.is_available() and dist.is_initialized():
        flat = torch.cat(sums)
        dist.all_reduce(flat)
        sums = list(flat.split([s.numel() for s in sums]))
    loads = [s / s.sum().clamp_min(EPS) for s in sums]
    for module, usage_sum in zip(modules, sums, strict=True):
        module.update_director_(momentum, usage_sum)
    return loads


@torch.no_grad()
def discard_usage_(model: nn.Module) -> None:
    """Forget the activation weights accumulated since the last update (a step that was skipped)."""
    for module in _pretraining_modules(model):
        module.router.usage_sum.zero_()
