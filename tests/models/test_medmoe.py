"""MedMoE's parts against direct computations: the pyramid of a Swin and of a ViT, the scale fusion, the routed experts
(only one computed per image), the straight-through router, and the global, local and auxiliary losses."""

from __future__ import annotations

import math
import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dex.collectives import batch_offset, gather_batch, gather_with_gradient

from dex.models import DEXViT, layer_losses
from dex.models.backbones import depth_features
from dex.models.medmoe import (
    FeaturePyramid,
    GlobalBatchNorm2d,
    ImageRouter,
    MoELocal,
    ReportRouter,
    ScaleExpert,
    global_infonce,
    image_router_loss,
    local_gloria_loss,
    report_type_loss,
)

SWIN = dict(img_size=64, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_classes=0)
CHANNELS = [3, 4, 5, 6]  # a small pyramid's C_l at H/4 .. H/32 of a 64 px image


def vit(**overrides) -> DEXViT:
    return DEXViT(**{**dict(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_experts=0),
                     **overrides}).eval()


def pyramid(batch: int = 4) -> list[torch.Tensor]:
    return [torch.randn(batch, c, 64 // r, 64 // r) for c, r in zip(CHANNELS, (4, 8, 16, 32))]


def test_swin_pyramid_is_its_four_stages():
    encoder = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **SWIN).eval()
    levels, images = FeaturePyramid(encoder), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps, pooled, aux = levels(images)
        final = encoder.forward_features(images)  # [B, H/32, W/32, C], normalised
    assert aux == []
    torch.testing.assert_close(pooled, encoder.forward_head(final, pre_logits=True))
    assert levels.channels == [16, 32, 64, 128] and levels.reductions == [4, 8, 16, 32]
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    torch.testing.assert_close(maps[3], final.permute(0, 3, 1, 2))


def test_vit_pyramid_resamples_blocks_at_quarter_depths():
    encoder = vit(depth=8)
    levels, images = FeaturePyramid(encoder).eval(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps, pooled, _ = levels(images)
        blocks = depth_features(encoder, images)
        output = encoder.forward_features(images)
        final = output[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)
    torch.testing.assert_close(pooled, output[:, 0])  # the class token
    assert levels.channels == [8, 16, 32, 32] and levels.reductions == [4, 8, 16, 32]
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    with torch.no_grad():  # blocks 2, 4, 6 (1-based) and the final normalised tokens
        torch.testing.assert_close(maps[0], levels.up4(blocks[1]))
        torch.testing.assert_close(maps[1], levels.up8(blocks[3]))
        torch.testing.assert_close(maps[2], blocks[5])
        torch.testing.assert_close(maps[3], F.max_pool2d(final, 2))


def test_a_dex_vit_pyramid_carries_its_routing_and_the_router_noise():
    torch.manual_seed(0)
    encoder = vit(num_experts=4, top_k=2).train()
    levels, images = FeaturePyramid(encoder), torch.randn(3, 3, 64, 64)
    eps = encoder.draw_router_eps(torch.Generator().manual_seed(1), 3, slice(0, 3), 17)
    maps, pooled, aux = levels(images, noise_std=1.0, router_eps=eps)
    again = levels(images, noise_std=1.0, router_eps=eps)
    noiseless = levels(images)
    assert len(aux) == 4 and all(a.routing is not None for a in aux)
    assert torch.equal(maps[2], again[0][2]) and torch.equal(pooled, again[1])  # the noise is the inputs' draw
    assert not torch.equal(aux[0].routing.weights, noiseless[2][0].routing.weights)
    losses = layer_losses(aux, device=images.device)
    assert losses.alignment.item() > 0 and losses.balance.item() > 0
    (pooled.sum() + losses.balance).backward()
    assert encoder.blocks[0].dex.router.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # without noise the maps are the blocks' outputs, as for a plain ViT
        blocks = depth_features(encoder.eval(), images)
        torch.testing.assert_close(levels.eval()(images)[0][2], blocks[2])


def test_vit_pyramid_refuses_other_patches_and_shallow_models():
    with pytest.raises(ValueError, match="16 px"):
        FeaturePyramid(vit(patch_size=8))
    with pytest.raises(ValueError, match="at least 4 blocks"):
        FeaturePyramid(vit(depth=3))


def test_scale_expert_fuses_the_projected_scales_with_weights_summing_to_one():
    torch.manual_seed(0)
    expert, maps = ScaleExpert(CHANNELS, dim=8).eval(), pyramid()
    with torch.no_grad():
        fused, beta = expert(maps)
        projected = [F.interpolate(p(m), size=(4, 4), mode="bilinear", align_corners=False)
                     for p, m in zip(expert.projections, maps)]
        weights = expert.attention(torch.cat(projected, 1)).softmax(1)
        by_hand = sum(weights[:, l:l + 1] * projected[l] for l in range(4))
    assert fused.shape == (4, 8, 4, 4) and beta.shape == (4, 4, 4, 4)
    torch.testing.assert_close(beta.sum(1), torch.ones(4, 4, 4))
    assert (beta > 0).all() and beta.std() > 0  # a real per-location mixture, not one scale
    torch.testing.assert_close(beta, weights)
    torch.testing.assert_close(fused, by_hand)
    assert ScaleExpert(CHANNELS, dim=8, out_stride=8).eval()(maps)[0].shape == (4, 8, 8, 8)


@pytest.mark.parametrize("training", [False, True])
def test_only_the_routed_expert_is_computed(training):
    torch.manual_seed(0)
    moe, maps = MoELocal(CHANNELS, dim=8, num_experts=3).train(training), pyramid()
    calls = {k: [] for k in range(3)}
    for k, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda module, args, out, k=k: calls[k].append(args[0][0].shape[0]))
    routed = torch.tensor([2, 2, 0, 2])  # grouping reorders the batch: [2, 0, 1, 3]
    local, beta = moe(maps, routed)
    # one call per used expert, on its images only; in training the unused expert runs on an empty group
    assert calls == {0: [1], 1: [0] if training else [], 2: [3]}
    assert local.shape == (4, 8, 4, 4) and beta.shape == (4, 4, 4, 4)
    # in training BatchNorm sees the group's statistics, so expert 2 alone on its three images gives the same
    alone, alone_beta = moe.experts[2]([m[routed == 2] for m in maps])
    torch.testing.assert_close(local[routed == 2], alone)
    torch.testing.assert_close(beta[routed == 2], alone_beta)
    if not training:
        single, _ = moe.experts[2]([m[3:4] for m in maps])
        torch.testing.assert_close(local[3:4], single)
        other, _ = moe.experts[1]([m[3:4] for m in maps])
        assert not torch.allclose(local[3:4], other)
    with pytest.raises(ValueError, match="expert index 3"):
        moe(maps, torch.tensor([0, 3, 1, 1]))


def test_straight_through_router_keeps_the_value_and_trains_the_router():
    torch.manual_seed(0)
    router, moe, maps = ReportRouter(12, 3, hidden=16), MoELocal(CHANNELS, dim=8, num_experts=3).eval(), pyramid()
    routing = router(torch.randn(4, 12))
    assert torch.equal(routing.expert, routing.probs.argmax(-1)) and routing.logits.shape == (4, 3)
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(4))
    torch.testing.assert_close(routing.gate, torch.ones(4))
    local, _ = moe(maps, routing.expert, routing.gate)
    for i, k in enumerate(routing.expert.tolist()):
        torch.testing.assert_close(local[i:i + 1], moe.experts[k]([m[i:i + 1] for m in maps])[0])
    (local * torch.randn_like(local)).sum().backward()
    for layer in (router.w1, router.w2):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_image_router_learns_the_report_routers_choice():
    torch.manual_seed(0)
    router, pooled, choice = ImageRouter(10, 3, hidden=16), torch.randn(5, 10), torch.tensor([0, 2, 1, 2, 0])
    logits = router(pooled)
    assert logits.shape == (5, 3)
    torch.testing.assert_close(image_router_loss(logits, choice), F.cross_entropy(logits, choice))


def test_global_infonce_is_the_symmetric_cosine_contrast():
    torch.manual_seed(0)
    image, text, tau = torch.randn(4, 6), torch.randn(4, 6), 0.1
    cos = [[F.cosine_similarity(image[i], text[j], dim=0).item() / tau for j in range(4)] for i in range(4)]
    rows = sum(-cos[i][i] + math.log(sum(math.exp(c) for c in cos[i])) for i in range(4)) / 4
    cols = sum(-cos[j][j] + math.log(sum(math.exp(cos[i][j]) for i in range(4))) for j in range(4)) / 4
    assert global_infonce(image, text, tau).item() == pytest.approx((rows + cols) / 2, rel=1e-5)
    matched = global_infonce(image, image + 0.05 * torch.randn(4, 6), tau)
    assert matched < global_infonce(image, image[torch.tensor([1, 2, 3, 0])], tau)
    assert matched < global_infonce(image, text, tau)


def local_loss_by_loop(words, mask, local, g1=4.0, g2=5.0, g3=10.0) -> float:
    """The GLoRIA local loss pair by pair, word by word, in float64."""
    words, local = words.double(), local.double()
    batch = words.shape[0]
    regions = local.flatten(2).transpose(1, 2)  # [B, N, D]
    z = torch.zeros(batch, batch, dtype=torch.float64)
    for i in range(batch):
        for j in range(batch):
            real = [t for t in range(words.shape[1]) if mask[j, t]]
            scores = {t: [float(words[j, t] @ v) for v in regions[i]] for t in real}
            total = 0.0
            for t in real:
                normalised = [math.exp(scores[t][n]) / sum(math.exp(scores[u][n]) for u in real)
                              for n in range(regions.shape[1])]
                attention = [math.exp(g1 * s) for s in normalised]
                attention = [a / sum(attention) for a in attention]
                context = sum(a * v for a, v in zip(attention, regions[i]))
                total += math.exp(g2 * F.cosine_similarity(context, words[j, t], dim=0).item())
            z[i, j] = math.log(total) / g2
    logits = g3 * z
    rows = sum(-logits[i, i] + torch.logsumexp(logits[i], 0) for i in range(batch)) / batch
    cols = sum(-logits[j, j] + torch.logsumexp(logits[:, j], 0) for j in range(batch)) / batch
    return float((rows + cols) / 2)


def test_local_gloria_loss_matches_the_loop_and_ignores_padding():
    torch.manual_seed(0)
    words, local = torch.randn(3, 5, 4), torch.randn(3, 4, 2, 2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    loss = local_gloria_loss(words, mask, local)
    assert loss.item() == pytest.approx(local_loss_by_loop(words, mask, local), rel=1e-5)
    changed = words.clone()
    changed[~mask] = 100 * torch.randn(int((~mask).sum()), 4)
    torch.testing.assert_close(local_gloria_loss(changed, mask, local), loss)
    kept = words.clone().requires_grad_()
    local_gloria_loss(kept, mask, local).backward()
    assert kept.grad[~mask].abs().max() == 0 and kept.grad[mask].abs().sum() > 0
    other = local_gloria_loss(words, mask, local, temp_attention=1.0, temp_similarity=2.0, temp_loss=3.0)
    assert other.item() == pytest.approx(local_loss_by_loop(words, mask, local, 1.0, 2.0, 3.0), rel=1e-5)
    with pytest.raises(ValueError, match="real word"):
        local_gloria_loss(words, torch.zeros(3, 5, dtype=torch.bool), local)


def test_report_type_loss_is_the_routers_cross_entropy():
    logits, types = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    torch.testing.assert_close(report_type_loss(logits, types), F.cross_entropy(logits, types))


def test_global_batch_norm_is_batch_norm_in_one_process_and_skips_empty_groups():
    torch.manual_seed(0)
    ours, reference = GlobalBatchNorm2d(3).train(), torch.nn.BatchNorm2d(3).train()
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    torch.testing.assert_close(ours(x), reference(x))
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    empty = ours(torch.zeros(0, 3, 5, 5))
    assert empty.shape == (0, 3, 5, 5)
    empty.sum().backward()  # weight and bias stay in the graph, with a zero gradient
    assert torch.equal(ours.weight.grad, torch.zeros(3)) and torch.equal(ours.bias.grad, torch.zeros(3))
    for key, value in ours.state_dict().items():  # no statistics from no image
        assert torch.equal(value, before[key]), key
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x))


def _distributed_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of :func:`test_two_ranks_compute_the_one_process_losses_and_batch_norm`: its losses over the global
    batch, their input gradients, and the BatchNorm of its share of the images."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        inputs = _distributed_inputs()
        mine = {k: v.chunk(world)[rank].clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        offset = batch_offset(mine["image"].shape[0])
        global_loss = global_infonce(mine["image"], mine["text"], 0.1, gather_with_gradient(mine["image"]),
                                     gather_with_gradient(mine["text"]), offset)
        local_loss = local_gloria_loss(mine["words"], mine["mask"], mine["local"],
                                       all_words=gather_with_gradient(mine["words"]),
                                       all_word_masks=gather_batch(mine["mask"]),
                                       all_local=gather_with_gradient(mine["local"]), offset=offset)
        norm = _distributed_norm()
        normalised = norm(mine["maps"] if rank == 0 else mine["maps"][:0])  # rank 1 has no image for this expert
        (global_loss + local_loss + (normalised * mine["weights"][:normalised.shape[0]]).sum()).backward()
        torch.save({"global": global_loss.detach(), "local": local_loss.detach(), "normalised": normalised.detach(),
                    "grads": {k: v.grad for k, v in mine.items() if v.grad is not None},
                    "norm": norm.state_dict(), "norm_grad": norm.weight.grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _distributed_inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 3:], mask[3, 4:] = False, False
    return {"image": torch.randn(4, 6), "text": torch.randn(4, 6), "words": torch.randn(4, 5, 3), "mask": mask,
            "local": torch.randn(4, 3, 2, 2), "maps": torch.randn(4, 2, 3, 3), "weights": torch.randn(4, 2, 3, 3)}


def _distributed_norm() -> GlobalBatchNorm2d:
    torch.manual_seed(1)
    norm = GlobalBatchNorm2d(2).train()
    torch.nn.init.normal_(norm.weight)
    return norm


def test_two_ranks_compute_the_one_process_losses_and_batch_norm(tmp_path):
    """Each rank's share of the losses over the global batch averages to the one-process loss, and its gradients,
    divided by the world size as DDP divides, are the one-process gradients of its rows; an expert's BatchNorm sees
    the images of every rank (here all on rank 0, rank 1 calling it on none)."""
    world, port = 2, 29000 + os.getpid() % 500
    mp.spawn(_distributed_rank, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    inputs = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in _distributed_inputs().items()}
    global_loss = global_infonce(inputs["image"], inputs["text"], 0.1)
    local_loss = local_gloria_loss(inputs["words"], inputs["mask"], inputs["local"])
    norm = _distributed_norm()
    normalised = norm(inputs["maps"][:2])  # the images rank 0 holds
    # the one-process loss is the ranks' mean: rank 1 adds nothing for the images it does not hold
    (global_loss + local_loss + (normalised * inputs["weights"][:2]).sum() / world).backward()
    torch.testing.assert_close(sum(r["global"] for r in ranks) / world, global_loss)
    torch.testing.assert_close(sum(r["local"] for r in ranks) / world, local_loss)
    for name in ("image", "text", "words", "local"):
        torch.testing.assert_close(torch.cat([r["grads"][name] for r in ranks]) / world, inputs[name].grad)
    torch.testing.assert_close(ranks[0]["normalised"], normalised)
    torch.testing.assert_close(ranks[0]["grads"]["maps"] / world, inputs["maps"].grad[:2])
    torch.testing.assert_close((ranks[0]["norm_grad"] + ranks[1]["norm_grad"]) / world, norm.weight.grad)
    for key, value in norm.state_dict().items():
        torch.testing.assert_close(ranks[0]["norm"][key], value)
        torch.testing.assert_close(ranks[1]["norm"][key], value)
