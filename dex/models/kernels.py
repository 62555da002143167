"""Segment (grouped) matrix products for the expert layers, as PyTorch custom operators.

Rows of ``x`` come sorted by expert; segment r (``counts[r]`` rows) is multiplied by expert r's weight. As custom
operators with a shape-only ("fake") implementation, the products are opaque to ``torch.compile``: no data-dependent
shapes, no host synchronisation and no graph break reach the compiled graph, whatever the implementation inside
does. Inside, PyTorch's grouped GEMM (``torch.nn.functional.grouped_mm``) runs where it supports the inputs (CPU in
float32 and bfloat16, recent GPUs in bfloat16) and one matrix product per segment runs otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula


def _aligned(*tensors: Tensor) -> bool:
    return all(s == 1 or s * t.element_size() % 16 == 0 for t in tensors for s in t.stride())


def _grouped_ok(a: Tensor, b: Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or a.dtype != b.dtype or not _aligned(a, b):
        return False
    if a.device.type == "cpu":
        return a.dtype in (torch.float32, torch.bfloat16)
    return a.device.type == "cuda" and a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device)[0] >= 9


@torch.library.custom_op("dex::segment_linear", mutates_args=())
def segment_linear(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """[M, in] rows sorted by expert, [R, out, in] weights, [R] rows per expert -> [M, out]:
    rows of segment r times ``weight[r].T``."""
    weight_t = weight.transpose(1, 2)
    if _grouped_ok(x, weight_t):
        return F.grouped_mm(x, weight_t, offs=torch.cumsum(counts, 0).to(torch.int32))
    chunks = torch.split(x, counts.tolist())
    return torch.cat([chunk @ weight_t[r] for r, chunk in enumerate(chunks)])


@segment_linear.register_fake
def _(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("dex::segment_weight_grad", mutates_args=())
def segment_weight_grad(grad: Tensor, x: Tensor, counts: Tensor) -> Tensor:
    """[M, out] output gradients and [M, in] inputs, both sorted by expert -> [R, out, in]: per segment
    ``grad_r.T @ x_r``, the gradient of each expert's weight."""
    grad_t = grad.t().contiguous()
    if _grouped_ok(grad_t, x):
        return F.grouped_mm(grad_t, x, offs=torch.cumsum(counts, 0).to(torch.int32))
    out = grad.new_zeros(counts.shape[0], grad.shape[1], x.shape[1])
    start = 0
    for r, n in enumerate(counts.tolist()):
        out[r] = grad_t[:, start: start + n] @ x[start: start + n]
        start += n
    return out


@segment_weight_grad.register_fake
def _(grad: Tensor, x: Tensor, counts: Tensor) -> Tensor:
    return grad.new_empty(counts.shape[0], grad.shape[1], x.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, counts = inputs
    ctx.save_for_backward(x, weight, counts)


def _backward(ctx, grad: Tensor):
    x, weight, counts = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = segment_linear(grad, weight.transpose(1, 2).contiguous(), counts) if ctx.needs_input_grad[0] else None
    grad_w = segment_weight_grad(grad, x, counts) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


segment_linear.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.dex.segment_linear)
def _segment_linear_flops(x_shape, weight_shape, counts_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * weight_shape[1]


@register_flop_formula(torch.ops.dex.segment_weight_grad)
def _segment_weight_grad_flops(grad_shape, x_shape, counts_shape, *args, **kwargs) -> int:
    return 2 * grad_shape[0] * grad_shape[1] * x_shape[1]
