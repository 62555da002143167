"""The collectives of the models and objectives under ``torch.distributed`` (DDP or FSDP ranks), each the identity
in a single process: gathering the global batch (with or without gradient) and summing over ranks with gradient.
The loss of a rank computed from gathered tensors then gets, through DDP's mean over ranks, the gradient of one
process holding the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_batch(tensor: Tensor) -> Tensor:
    """[b, ...] on each rank -> [world * b, ...], rank-major, without gradient (teacher keys and codes, logs)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _GatherWithGradient(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered tensor and keeps this rank's rows: the
    gradient a loss computed from the global batch on every rank sends back to each rank's own rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.rows = tensor.shape[0]
        return gather_batch(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_gradient(tensor: Tensor) -> Tensor:
    """[b, ...] on each rank (the same b everywhere) -> [world * b, ...], rank-major, differentiable: rank r's loss
    L_r reaches every rank's rows, so that DDP's mean over ranks of the gradients of L_r is the gradient of the
    mean of the L_r, as in one process holding the global batch (CLIP-style losses over the global batch)."""
    return _GatherWithGradient.apply(tensor) if is_distributed() else tensor


def batch_offset(local_batch: int) -> int:
    """The index of this rank's first image in :func:`gather_batch`'s order."""
    return dist.get_rank() * local_batch if is_distributed() else 0


def reduce_(tensor: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
    """``tensor`` reduced over ranks in place (``op``: sum by default), without gradient; returned."""
    if is_distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


def global_max(value: int, device: torch.device) -> int:
    """The largest of every rank's ``value`` (``device``: where the collective runs, a GPU under NCCL)."""
    if not is_distributed():
        return value
    return int(reduce_(torch.tensor([value], dtype=torch.long, device=device), dist.ReduceOp.MAX).item())


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over ranks, differentiable (its backward sums the ranks' gradients)."""
    return _AllReduceSum.apply(tensor) if is_distributed() else tensor
