"""The fast expert path: segment products against direct ones, the grouped dispatch against the reference code's
per-expert loop (outputs, losses, gradients, director update; float32 tight, bfloat16 loose), a graph-break-free
compile, and FLOP counts against their closed forms."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch.utils.flop_counter import FlopCounterMode

from dex.models import DirectorExperts, MaskedAutoencoderDEX, update_directors_
from dex.models.kernels import segment_linear, segment_weight_grad
from tests.conftest import tiny_vit


def direct(x, weight, counts):
    out, start = [], 0
    for r, n in enumerate(counts.tolist()):
        out.append(x[start:start + n] @ weight[r].T)
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("dims", [(16, 32), (6, 10)])  # aligned (grouped GEMM) and unaligned (per-segment) inputs
@pytest.mark.parametrize("counts", [[3, 0, 5, 8], [0, 0, 16, 0]])  # empty segments included
def test_segment_linear_and_its_gradients(dims, counts):
    dim_in, dim_out = dims
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), dim_in, requires_grad=True)
    weight = torch.randn(len(counts), dim_out, dim_in, requires_grad=True)
    out = segment_linear(x, weight, counts)
    torch.testing.assert_close(out, direct(x, weight, counts))
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, weight], grad)
    want = torch.autograd.grad(direct(x, weight, counts), [x, weight], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(segment_weight_grad(grad, x.detach(), counts), want[1], rtol=1e-5, atol=1e-5)


def test_segment_linear_in_bfloat16():
    counts = torch.tensor([8, 0, 24, 16])
    x, weight = torch.randn(48, 32), torch.randn(4, 64, 32)
    out = segment_linear(x.bfloat16(), weight.bfloat16(), counts)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), direct(x, weight, counts), rtol=2e-2, atol=0.2)


def _step(mae, images, dispatch, dtype):
    for block in mae.encoder.blocks:
        block.dex.experts.dispatch = dispatch
    noise = mae.draw_noise(torch.Generator().manual_seed(0), len(images), slice(0, len(images)))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = mae(images, noise_std=0.7, **noise)
    grads = torch.autograd.grad(out.loss, [p for p in mae.parameters() if p.requires_grad])
    update_directors_(mae, 0.9)
    directors = [b.dex.director.fc1.weight.detach().clone() for b in mae.encoder.blocks]
    return out, grads, directors


@pytest.mark.parametrize("activation", ["image", "token"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_dispatch_equals_the_reference_loop(activation, dtype, tolerance):
    torch.manual_seed(0)
    mae = MaskedAutoencoderDEX(tiny_vit(activation=activation), decoder_embed_dim=16, decoder_depth=1,
                               decoder_num_heads=2).train()
    state = {k: v.clone() for k, v in mae.state_dict().items()}
    images = torch.randn(6, 3, 32, 32)
    fast = _step(mae, images, "grouped", dtype)
    mae.load_state_dict(state)
    loop = _step(mae, images, "loop", dtype)
    for name in ("loss", "reconstruction", "alignment", "balance", "pred"):
        torch.testing.assert_close(getattr(fast[0], name).float(), getattr(loop[0], name).float(),
                                   rtol=tolerance, atol=tolerance, msg=name)
    for a, b in zip(fast[1], loop[1]):
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance)
    for a, b in zip(fast[2], loop[2]):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("mode", ["pretrain", "experts", "director"])
def test_the_block_compiles_without_graph_breaks(mode):
    model = tiny_vit().train()
    model.set_mode(mode)
    for activation, units in (("image", 4), ("token", 4 * 17)):
        for block in model.blocks:
            block.dex.router.activation = activation
        explanation = dynamo.explain(model.blocks[0])(torch.randn(4, 17, 32), 0.5, torch.randn(units, 4))
        dynamo.reset()
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def test_the_whole_mae_step_compiles_without_graph_breaks():
    mae = MaskedAutoencoderDEX(tiny_vit(), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).train()
    noise = mae.draw_noise(torch.Generator().manual_seed(0), 4, slice(0, 4))
    explanation = dynamo.explain(lambda images: mae(images, noise_std=0.5, **noise).loss)(torch.randn(4, 3, 32, 32))
    dynamo.reset()
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("activation", ["image", "token"])
def test_flop_counts_match_the_closed_form(activation):
    batch, tokens, dim, hidden, experts, top_k = 4, 17, 32, 128, 4, 2
    module = DirectorExperts(dim, hidden, num_experts=experts, top_k=top_k, activation=activation, mode="experts").eval()
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(batch, tokens, dim))
    units, per_unit = (batch, tokens) if activation == "image" else (batch * tokens, 1)
    router = 2 * units * dim * experts
    expert_mlps = 2 * 2 * units * top_k * per_unit * dim * hidden  # K expert MLPs on every token
    combine = 2 * batch * tokens * dim * top_k  # the weighted sum over the K outputs
    assert counter.get_total_flops() == router + expert_mlps + combine
