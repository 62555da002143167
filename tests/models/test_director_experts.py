"""The DEX module's equations (Sec. 3.2-3.3, App. B) against direct, independent computations."""

from __future__ import annotations

import pytest
import torch

from dex.models import (
    DirectorExperts,
    ExpertBank,
    ExpertRouter,
    alignment_loss,
    alignment_loss_kd,
    balance_loss,
    balance_loss_reference,
    group_ema_,
    update_directors_,
)
from tests.conftest import experts_by_loop

B, N, C, H, R, K = 5, 7, 16, 64, 6, 2


def make_module(**kwargs) -> DirectorExperts:
    return DirectorExperts(C, H, **{"num_experts": R, "top_k": K, **kwargs})


# --- routing (Eq. 5, Eq. 21) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_router_scores_are_softmax_of_class_token_projection(temperature):
    router = ExpertRouter(C, num_experts=R, top_k=K, router_temperature=temperature).eval()
    x = torch.randn(B, N, C)
    routing, _ = router(x)
    expected = torch.softmax(x[:, 0] @ router.proj.weight.T / temperature, dim=-1)
    torch.testing.assert_close(routing.scores, expected)


def test_router_mean_pooling_uses_patch_tokens_only():
    router = ExpertRouter(C, num_prefix_tokens=1, num_experts=R, top_k=K, pooling="mean").eval()
    x = torch.randn(B, N, C)
    routing, _ = router(x)
    expected = torch.softmax(x[:, 1:].mean(1) @ router.proj.weight.T, dim=-1)
    torch.testing.assert_close(routing.scores, expected)


def test_router_picks_top_k_and_renormalises_weights():
    router = ExpertRouter(C, num_experts=R, top_k=3).eval()
    routing, _ = router(torch.randn(B, N, C))
    for u in range(B):
        ranked = sorted(range(R), key=lambda r: -float(routing.scores[u, r].detach()))[:3]
        assert routing.indices[u].tolist() == ranked
        chosen = routing.scores[u, ranked]
        torch.testing.assert_close(routing.weights[u], chosen / chosen.sum())  # Eq. 5: w_k = s_k / sum s


def test_frequency_aware_noise_matches_eq21():
    router = ExpertRouter(C, num_experts=R, top_k=K, router_temperature=0.5).train()
    usage = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0])
    router.usage.copy_(usage)
    x = torch.randn(B, N, C)
    sigma = 0.7
    torch.manual_seed(123)
    routing, _ = router(x, noise_std=sigma)
    torch.manual_seed(123)
    eps = torch.randn(B, R)
    delta = 1 - usage / (usage.sum() + 1e-6)
    expected = torch.softmax((x[:, 0] @ router.proj.weight.T + sigma * (eps + delta)) / 0.5, dim=-1)
    torch.testing.assert_close(routing.scores, expected)


def test_no_noise_in_eval_or_at_zero_sigma():
    router = ExpertRouter(C, num_experts=R, top_k=K)
    x = torch.randn(B, N, C)
    clean = torch.softmax(x[:, 0] @ router.proj.weight.T, dim=-1)
    torch.testing.assert_close(router.eval()(x, noise_std=1.0)[0].scores, clean)
    torch.testing.assert_close(router.train()(x, noise_std=0.0)[0].scores, clean)
    assert not torch.allclose(router.train()(x, noise_std=1.0)[0].scores, clean)


def test_token_wise_router_routes_every_token():
    router = ExpertRouter(C, num_experts=R, top_k=K, activation="token").eval()
    x = torch.randn(B, N, C)
    routing, _ = router(x)
    assert routing.indices.shape == (B * N, K)
    expected = torch.softmax(x.reshape(-1, C) @ router.proj.weight.T, dim=-1)
    torch.testing.assert_close(routing.scores, expected)


# --- balance loss (Eq. 18) -----------------------------------------------------------------------------------

def test_balance_loss_eq18():
    scores = torch.softmax(torch.randn(B, R), dim=-1)
    indices = scores.topk(K, dim=-1).indices
    expected = 0.0
    for r in range(R):
        mean_score = sum(float(scores[b, r]) for b in range(B)) / B
        mean_chosen = sum(1.0 for b in range(B) if r in indices[b].tolist()) / B
        expected += mean_score * mean_chosen
    assert float(balance_loss(scores, indices)) == pytest.approx(R * expected, rel=1e-6)


def test_balance_loss_reference_value_and_gradient():
    logits = torch.randn(B, R, requires_grad=True)
    scores = torch.softmax(logits, dim=-1)
    scores.retain_grad()
    loss = balance_loss_reference(scores)
    mean = scores.detach().mean(0)
    assert float(loss.detach()) == pytest.approx(float(R * (mean**2).sum()), rel=1e-6)
    loss.backward()
    # d/ds_br of R * sum_r P_r * stopgrad(P_r) = R * P_r / B: the stop-gradient halves the squared form's gradient
    torch.testing.assert_close(scores.grad, (R * mean / B).expand(B, R))


def test_module_balance_option_selects_the_formula():
    x = torch.randn(B, N, C)
    for option, formula in [("switch", lambda r: balance_loss(r.scores, r.indices)),
                            ("reference", lambda r: balance_loss_reference(r.scores))]:
        module = make_module(balance=option).eval()
        _, aux = module(x)
        torch.testing.assert_close(aux.balance, formula(aux.routing))


# --- experts (Eq. 5) -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim,hidden", [(16, 64), (6, 10)])  # the second is too narrow for the grouped GEMM
def test_expert_bank_equals_per_expert_loop(dim, hidden):
    bank = ExpertBank(dim, hidden, R)
    with torch.no_grad():
        for t in bank.tensors():
            t.normal_()
    units = torch.randn(B, N, dim, requires_grad=True)
    scores = torch.softmax(torch.randn(B, R), -1)
    top, indices = scores.topk(K, -1)
    weights = (top / top.sum(-1, keepdim=True)).requires_grad_()
    out = bank(units, indices, weights)
    grads = torch.autograd.grad(out.square().sum(), [units, weights, *bank.tensors()])
    expected = experts_by_loop(bank, units, indices, weights)
    expected_grads = torch.autograd.grad(expected.square().sum(), [units, weights, *bank.tensors()])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_image_wise_module_sends_every_token_through_the_image_experts():
    module = make_module(mode="experts").eval()
    x = torch.randn(B, N, C)
    out, aux = module(x)
    assert aux.routing.indices.shape == (B, K)  # one expert set per image
    expected = experts_by_loop(module.experts, x, aux.routing.indices, aux.routing.weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_token_wise_module_routes_each_token_separately():
    module = make_module(activation="token", mode="experts").eval()
    x = torch.randn(B, N, C)
    out, aux = module(x)
    units = x.reshape(B * N, 1, C)
    expected = experts_by_loop(module.experts, units, aux.routing.indices, aux.routing.weights).view(B, N, C)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len({tuple(i) for i in aux.routing.indices.view(B, N, K)[0].tolist()}) > 1  # tokens differ


# --- alignment loss (Eq. 15) ---------------------------------------------------------------------------------

def test_alignment_loss_is_one_minus_cosine_per_token():
    a, b = torch.randn(B, N, C), torch.randn(B, N, C)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(alignment_loss(a, b), (1 - cos).mean())
    assert float(alignment_loss(a, 3 * a)) == pytest.approx(0.0, abs=1e-6)


def test_alignment_loss_kd_is_reference_cross_entropy():
    a, b = torch.randn(B, N, C), torch.randn(B, N, C)
    teacher = torch.exp(b / 0.5) / torch.exp(b / 0.5).sum(-1, keepdim=True)
    student = torch.exp(a) / torch.exp(a).sum(-1, keepdim=True)
    expected = -(teacher * torch.log(student)).sum(-1).mean()
    torch.testing.assert_close(alignment_loss_kd(a, b), expected)


def test_pretrain_mode_aligns_experts_to_director_output():
    for option, formula in [("cosine", alignment_loss), ("kd", alignment_loss_kd)]:
        module = make_module(alignment=option).eval()
        x = torch.randn(B, N, C)
        out, aux = module(x)
        torch.testing.assert_close(aux.alignment, formula(out, module.director(x)))


# --- director: no gradient, group EMA (Eq. 6-7), usage statistics (Eq. 19-20) ---------------------------------

def test_director_gets_no_gradient_and_no_optimizer_update():
    module = make_module().train()
    before = {n: p.clone() for n, p in module.director.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.1)
    out, aux = module(torch.randn(B, N, C), noise_std=1.0)
    (out.square().mean() + aux.alignment + aux.balance).backward()
    optimizer.step()
    for name, param in module.director.named_parameters():
        assert param.grad is None and not param.requires_grad
        assert torch.equal(param, before[name])
    assert module.experts.fc1_weight.grad is not None and module.router.proj.weight.grad is not None


def test_group_ema_eq7():
    director = [torch.randn(3, 4), torch.randn(3)]
    experts = [torch.randn(R, 3, 4), torch.randn(R, 3)]
    omega = torch.softmax(torch.randn(R), 0)
    expected = [0.9 * d + 0.1 * sum(omega[r] * e[r] for r in range(R)) for d, e in zip(director, experts)]
    group_ema_(director, experts, omega, 0.9)
    for got, want in zip(director, expected):
        torch.testing.assert_close(got, want)
    frozen = [d.clone() for d in director]
    group_ema_(director, experts, omega, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(director, frozen))


def test_update_director_uses_batch_summed_activation_weights():
    module = make_module().train()
    x1, x2 = torch.randn(B, N, C), torch.randn(3, N, C)
    _, aux1 = module(x1, noise_std=0.5)
    _, aux2 = module(x2, noise_std=0.5)  # two micro-batches accumulate into one update
    summed = torch.zeros(R)
    for routing in (aux1.routing, aux2.routing):
        for u in range(routing.indices.shape[0]):
            for k in range(K):
                summed[routing.indices[u, k]] += routing.weights[u, k]
    omega = summed / summed.sum()  # Eq. 6
    eta = [p.clone() for p in (module.director.fc1.weight, module.director.fc1.bias,
                               module.director.fc2.weight, module.director.fc2.bias)]
    theta = [t.detach().clone() for t in module.experts.tensors()]
    usage = module.router.usage.clone()
    module.update_director_(momentum=0.95)
    got = [module.director.fc1.weight, module.director.fc1.bias, module.director.fc2.weight, module.director.fc2.bias]
    for g, e, t in zip(got, eta, theta):
        torch.testing.assert_close(g, 0.95 * e + 0.05 * torch.einsum("r,r...->...", omega, t))
    torch.testing.assert_close(module.router.usage, 0.99 * usage + 0.01 * omega)  # Eq. 19-20, mu = 0.99
    assert float(module.router.usage_sum.abs().sum()) == 0.0


def test_update_without_routed_images_changes_nothing():
    module = make_module().train()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    module.update_director_(momentum=0.5)
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("mode", ["experts", "director"])
def test_only_pretraining_forwards_accumulate_usage(mode):
    module = make_module(mode=mode).train()
    module(torch.randn(B, N, C), noise_std=1.0)
    assert float(module.router.usage_sum.sum()) == 0.0
    module.set_mode("pretrain")
    module.eval()(torch.randn(B, N, C))
    assert float(module.router.usage_sum.sum()) == 0.0
    module.train()(torch.randn(B, N, C))
    assert float(module.router.usage_sum.sum()) == pytest.approx(B)  # each image's K weights sum to one


def test_update_directors_walks_every_pretraining_module():
    model = torch.nn.Sequential(make_module(), make_module(), make_module(mode="experts"))
    x = torch.randn(B, N, C)
    for module in model:
        module.train()(x)
    before = [m.director.fc1.weight.clone() for m in model]
    update_directors_(model, 0.5)
    assert not torch.equal(model[0].director.fc1.weight, before[0])
    assert not torch.equal(model[1].director.fc1.weight, before[1])
    assert torch.equal(model[2].director.fc1.weight, before[2])


# --- modes and configuration ---------------------------------------------------------------------------------

def test_director_mode_is_the_director_mlp():
    module = make_module(mode="director")
    x = torch.randn(B, N, C)
    out, aux = module(x)
    torch.testing.assert_close(out, module.director(x))
    assert aux.routing is None and aux.alignment is None
    assert all(p.requires_grad for p in module.director.parameters())
    assert not any(p.requires_grad for p in module.experts.parameters())


def test_experts_mode_with_a_different_k():
    module = make_module()
    module.set_mode("experts", top_k=4)
    out, aux = module.eval()(torch.randn(B, N, C))
    assert aux.routing.indices.shape == (B, 4) and aux.alignment is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=2, top_k=3), "top_k"),
    (dict(num_experts=0, top_k=1), "num_experts"),
    (dict(top_k=0), "top_k"),
    (dict(mode="teacher"), "mode"),
    (dict(alignment="mse"), "alignment"),
    (dict(balance="aux"), "balance"),
    (dict(activation="patch"), "activation"),
    (dict(router_temperature=0.0), "temperature"),
])
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(**kwargs)
    with pytest.raises(ValueError, match="top_k"):
        make_module().set_mode("experts", top_k=R + 1)
