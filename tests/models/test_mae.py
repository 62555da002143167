"""MaskedAutoencoderDEX: masking, norm-pix reconstruction loss, and Eq. 8 assembled from the layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dex.models import (
    MaskedAutoencoderDEX,
    alignment_loss,
    balance_loss,
    patchify,
    random_masking,
    unpatchify,
    update_directors_,
)
from tests.conftest import experts_by_loop, tiny_vit


def tiny_mae(**kwargs) -> MaskedAutoencoderDEX:
    return MaskedAutoencoderDEX(tiny_vit(**kwargs), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def test_patchify_round_trip_and_layout():
    imgs = torch.randn(2, 3, 16, 24)
    patches = patchify(imgs, 8)
    assert patches.shape == (2, 6, 8 * 8 * 3)
    # patch (row 1, col 2) is pixel block [8:16, 16:24], flattened (row, col, channel)
    torch.testing.assert_close(patches[:, 5], imgs[:, :, 8:16, 16:24].permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(unpatchify(patches, 8, (2, 3)), imgs)


def test_random_masking_keeps_a_quarter():
    tokens = torch.randn(3, 16, 4)
    kept, mask, ids_restore = random_masking(tokens, 0.75)
    assert kept.shape == (3, 4, 4) and mask.sum(1).tolist() == [12, 12, 12]
    for b in range(3):
        visible = tokens[b, mask[b] == 0]
        assert torch.equal(torch.sort(visible, 0).values, torch.sort(kept[b], 0).values)
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(16).expand(3, -1))


def test_reconstruction_loss_is_norm_pix_mse_on_masked_patches():
    mae = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 16, 192)
    mask = (torch.rand(2, 16) > 0.5).float()
    target = patchify(imgs, 8)
    target = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, keepdim=True) + 1e-6)
    expected = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(mae.reconstruction_loss(imgs, pred, mask), expected)
    changed = pred.clone()
    changed[mask == 0] += 10.0  # visible patches do not count
    torch.testing.assert_close(mae.reconstruction_loss(imgs, changed, mask), expected)


def test_forward_returns_every_term_and_eq8_total():
    mae = tiny_mae().train()
    out = mae(torch.randn(4, 3, 32, 32), noise_std=1.0, lambda_co=0.3, lambda_bal=0.02)
    assert out.pred.shape == (4, 16, 192) and out.mask.shape == (4, 16)
    assert out.alignment_per_layer.shape == out.balance_per_layer.shape == (3,)
    alpha = torch.tensor([1 / 3, 1 / 2, 1.0])
    alignment = (alpha * out.alignment_per_layer).sum() / 3
    balance = out.balance_per_layer.sum() / 3
    torch.testing.assert_close(out.alignment, alignment)
    torch.testing.assert_close(out.balance, balance)
    torch.testing.assert_close(out.loss, out.reconstruction + 0.3 * alignment + 0.02 * balance)


def test_layer_losses_equal_a_manual_pass_through_the_blocks():
    """Recompute each block's L_co and L_bal from its inputs with the routing the model recorded."""
    mae = tiny_mae().eval()
    encoder = mae.encoder
    captured = []
    hooks = [b.norm2.register_forward_hook(lambda m, i, o: captured.append(o)) for b in encoder.blocks]
    out = mae(torch.randn(3, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    for layer, (block, f, routing) in enumerate(zip(encoder.blocks, captured, encoder.last_routing)):
        experts = experts_by_loop(block.dex.experts, f, routing.indices, routing.weights)
        expected = 1 - F.cosine_similarity(experts, block.dex.director(f), dim=-1).mean()
        torch.testing.assert_close(out.alignment_per_layer[layer], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.alignment_per_layer[layer], alignment_loss(experts, block.dex.director(f)),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.balance_per_layer[layer], balance_loss(routing.scores, routing.indices))


def test_a_training_step_moves_experts_by_gradient_and_director_by_group_ema():
    mae = tiny_mae().train()
    optimizer = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-2)
    director = mae.encoder.blocks[1].dex.director.fc1.weight
    experts = mae.encoder.blocks[1].dex.experts.fc1_weight
    before_director, before_experts = director.clone(), experts.detach().clone()
    out = mae(torch.randn(4, 3, 32, 32), noise_std=1.0)
    out.loss.backward()
    optimizer.step()
    assert torch.equal(director, before_director)  # the optimizer does not touch it
    assert not torch.equal(experts, before_experts)
    usage_sum = mae.encoder.blocks[1].dex.router.usage_sum.clone()
    omega = usage_sum / usage_sum.sum()
    update_directors_(mae, momentum=0.9)
    expected = 0.9 * before_director + 0.1 * torch.einsum("r,rij->ij", omega, experts.detach())
    torch.testing.assert_close(director, expected)


def test_director_mode_is_a_plain_mae():
    mae = tiny_mae(mode="director").train()
    out = mae(torch.randn(2, 3, 32, 32))
    assert float(out.alignment) == 0.0 and float(out.balance) == 0.0
    torch.testing.assert_close(out.loss, out.reconstruction)


def test_bad_mask_ratio():
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedAutoencoderDEX(tiny_vit(), mask_ratio=1.0)


def test_experts_without_director():
    """alignment='none': no director target, no group EMA, but the usage statistics still move (Table 6 +Experts)."""
    mae = tiny_mae(alignment="none").train()
    out = mae(torch.randn(4, 3, 32, 32), noise_std=1.0)
    assert float(out.alignment.detach()) == 0.0 and float(out.balance.detach()) > 0
    director = mae.encoder.blocks[0].dex.director.fc1.weight.clone()
    usage = mae.encoder.blocks[0].dex.router.usage.clone()
    update_directors_(mae, 0.5)
    assert torch.equal(mae.encoder.blocks[0].dex.director.fc1.weight, director)
    assert not torch.equal(mae.encoder.blocks[0].dex.router.usage, usage)


@pytest.mark.parametrize("activation", ["image", "token"])
def test_explicit_noise_makes_a_step_independent_of_the_batch_split(activation):
    """The same global noise, cut per rank, gives each image the same masking and routing as one process would."""
    mae = tiny_mae(activation=activation).train()
    images = torch.randn(6, 3, 32, 32)
    noise = mae.draw_noise(torch.Generator().manual_seed(3), 6, slice(0, 6))
    whole = mae(images, noise_std=1.0, **noise)
    routing_whole = [r.indices for r in mae.encoder.last_routing]
    halves, routing = [], []
    for rows in (slice(0, 4), slice(4, 6)):
        part = mae.draw_noise(torch.Generator().manual_seed(3), 6, rows)
        halves.append(mae(images[rows], noise_std=1.0, **part))
        routing.append([r.indices for r in mae.encoder.last_routing])
    torch.testing.assert_close(torch.cat([h.pred for h in halves]), whole.pred, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([h.mask for h in halves]), whole.mask)
    for layer, indices in enumerate(routing_whole):
        assert torch.equal(torch.cat([routing[0][layer], routing[1][layer]]), indices)
