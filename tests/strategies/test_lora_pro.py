"""LoRA-Pro: g̃ = s(B g_A' + g_B' A) is the tangent-space projection of the true G; X solves the Sylvester eq."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from scipy.linalg import solve_sylvester

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.models import tiny_llama
from lorakit.strategies.lora_pro import LoRAPro, adjust, equivalent_gradient
from lorakit.train import TrainConfig, Trainer


@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons in float64, restored after each test (no global side effect)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def toy(m=12, n=9, r=3, s=2.0, seed=0):
    """A, B, the dense G of a loss through W0 + s·B·A, and LoRA's g_A, g_B from autograd."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(m, n, generator=g)
    A = torch.randn(r, n, generator=g).requires_grad_(True)
    B = torch.randn(m, r, generator=g).requires_grad_(True)
    x, y = torch.randn(20, n, generator=g), torch.randn(20, m, generator=g)
    W = (W0 + s * B @ A).detach().requires_grad_(True)
    ((x @ W.T - y) ** 2).mean().backward()  # true full-weight gradient
    ((x @ (W0 + s * B @ A).T - y) ** 2).mean().backward()
    return A.detach(), B.detach(), A.grad, B.grad, W.grad, s


def test_equivalent_gradient_is_projection_of_full_gradient():
    A, B, gA, gB, G, s = toy()
    assert torch.allclose(gA, s * B.T @ G) and torch.allclose(gB, s * G @ A.T)  # the chain rule
    nA, nB = adjust(A, B, gA, gB, s)
    P_B = B @ torch.linalg.inv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    proj = P_B @ G + G @ P_A - P_B @ G @ P_A
    assert torch.allclose(equivalent_gradient(A, B, nA, nB, s), proj, atol=1e-10)
    # and it is the best rank-tangent approximation: plain LoRA's g̃ is farther from G
    plain = equivalent_gradient(A, B, gA, gB, s)
    best_scale = (plain * G).sum() / (plain * plain).sum()
    assert (proj - G).norm() < (best_scale * plain - G).norm()


def test_X_solves_sylvester_and_minimises_distance_to_lora_gradients():
    A, B, gA, gB, G, s = toy(seed=1)
    nA, nB, X = adjust(A, B, gA, gB, s, return_X=True)
    BtB, AAt = B.T @ B, A @ A.T
    C = -torch.linalg.inv(BtB) @ gA @ A.T / s ** 2
    assert torch.allclose(BtB @ X + X @ AAt, C, atol=1e-10)
    assert torch.allclose(X, torch.from_numpy(solve_sylvester(BtB.numpy(), AAt.numpy(), C.numpy())), atol=1e-10)

    def f(Y):
        a = torch.linalg.inv(BtB) @ gA / s ** 2 + Y @ A
        b = (torch.eye(B.shape[0]) - B @ torch.linalg.inv(BtB) @ B.T) @ gB @ torch.linalg.inv(AAt) / s ** 2 - B @ Y
        return ((a - gA) ** 2).sum() + ((b - gB) ** 2).sum()

    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        assert f(X) < f(X + 1e-3 * torch.randn(X.shape, generator=g))
    # g̃ does not depend on X
    other = equivalent_gradient(A, B, nA - X @ A, nB + B @ X, s)
    assert torch.allclose(other, equivalent_gradient(A, B, nA, nB, s), atol=1e-10)


def test_first_step_rule_with_B_zero():
    A, B, gA, gB, G, s = toy(seed=3)
    B = torch.zeros_like(B)
    gA, gB = s * B.T @ G, s * G @ A.T
    nA, nB = adjust(A, B, gA, gB, s, first=True)
    assert torch.allclose(nA, gA)
    assert torch.allclose(nB, gB @ torch.linalg.pinv(A @ A.T) / s ** 2, atol=1e-8)
    # with B = 0, s·g_B'·A = G·P_A: the projection of G onto the row space of A
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    assert torch.allclose(equivalent_gradient(A, B, nA, nB, s), G @ P_A, atol=1e-8)


def test_adam_mode_matches_dense_reference_over_two_steps():
    torch.manual_seed(0)
    layer = torch.nn.Linear(9, 12, bias=False)
    model = torch.nn.Sequential(layer)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 3, "alpha": 6}, targets=["0"]), seed=0)
    form = next(iter(adapter_modules(model, "default").values()))
    opt = torch.optim.AdamW([form.lora_A, form.lora_B], lr=1e-2, weight_decay=0.0)
    trainer = SimpleNamespace(model=model, optimizer=opt, config=SimpleNamespace(betas=(0.9, 0.999)))
    strat = LoRAPro(mode="adam")
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 9, generator=g), torch.randn(16, 12, generator=g)
    A, B, s = form.lora_A.detach().clone(), form.lora_B.detach().clone(), form.scaling
    m = v = torch.zeros(12, 9)
    for t in (1, 2):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        gA, gB = form.lora_A.grad.clone(), form.lora_B.grad.clone()
        strat.on_before_optimizer_step(trainer, t - 1)
        opt.step()  # must not touch A, B again
        # dense reference, written out from the official algorithm
        a0, b0 = adjust(A, B, gA, gB, s, first=t == 1)
        ge = s * (B @ a0 + b0 @ A)
        m, v = 0.9 * m + 0.1 * ge, 0.999 * v + 0.001 * ge * ge
        gh = (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        nA, nB = adjust(A, B, s * B.T @ gh, s * gh @ A.T, s, first=t == 1)
        A, B = A - 1e-2 * nA, B - 1e-2 * nB
        assert torch.allclose(form.lora_A.detach(), A, atol=1e-9)
        assert torch.allclose(form.lora_B.detach(), B, atol=1e-9)
    assert not opt.state  # the trainer's AdamW kept no moments: LoRA-Pro's dense m, v replace them
    assert strat.state[0]["m"].shape == (12, 9)


@pytest.mark.parametrize("mode", ["adam", "adjust"])
def test_trains_with_trainer(mode):
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(3, 128, (10,), generator=gen) for _ in range(16)]
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}), seed=0)
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, progress=False, eval_at_start=False)
    res = Trainer(model, data, lambda b: {"ids": torch.stack(b)},
                  lambda mdl, b: mdl(input_ids=b["ids"], labels=b["ids"]).loss, cfg,
                  strategies=[LoRAPro(mode=mode)]).train(resume=False)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert any(f.lora_B.abs().sum() > 0 for f in adapter_modules(model, "default").values())



def test_refuses_frozen_A():
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form="ffa", form_args={"r": 4}), seed=0)
    with pytest.raises(ValueError, match="A frozen"):
        LoRAPro()._forms(model)
