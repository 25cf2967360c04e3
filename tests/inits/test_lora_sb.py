"""LoRA-SB: s·B·R·A is the best rank-r approximation (dense SVD) of the approximated first full fine-tuning
step ΔW₁ = −η₁·sign(Σ_b ∂L_b/∂W); a training step of R moves ΔW only within span(B)·span(A) (SGD: by
−η s² B Bᵀ G AᵀA); the residual variant keeps the output and exports for the original base."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core.caps import Cap
from lorakit.core.inject import adapter_modules
from lorakit.inits.lora_sb import LoRASBInit
from lorakit.models import tiny_llama

GEN = torch.Generator().manual_seed(0)
IDS = torch.randint(3, 128, (2, 9), generator=GEN)
BATCHES = [torch.randint(3, 128, (2, 9), generator=GEN) for _ in range(3)]
TARGETS = ["q_proj", "v_proj", "down_proj"]
R = 4


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _grad_sums(paths, weights=None):
    """Σ_b dL_b/dW on a fresh model (optionally with the given effective weights), by plain autograd."""
    model = tiny_llama(seed=0)
    with torch.no_grad():
        for p, w in (weights or {}).items():
            model.get_submodule(p).weight.copy_(w)
    ws = {p: model.get_submodule(p).weight.requires_grad_(True) for p in paths}
    for b in BATCHES:
        model(b, labels=b).loss.backward()
    return {p: w.grad.clone() for p, w in ws.items()}


def _best_rank(m, r):
    u, s, vh = torch.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_init_is_best_rank_r_of_the_sign_step_and_r_trains_inside_the_subspaces(alpha):
    lr, warmup = 1e-3, 2
    spec = lorakit.AdapterSpec(form="lora_xs", form_args={"r": R, "alpha": alpha}, init="lora_sb",
                               init_args={"lr": lr, "warmup_steps": warmup}, targets=TARGETS)
    original = tiny_llama(seed=0)
    weights = {p: original.get_submodule(p).weight.detach().clone() for p in adapter_modules(
        lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(targets=TARGETS)), "default")}
    model = lorakit.attach(tiny_llama(seed=0), spec, batches=BATCHES)
    forms = adapter_modules(model, "default")
    sums = _grad_sums(forms)
    effective = {}
    for path, form in forms.items():
        delta1 = -(lr / warmup) * torch.sign(sums[path])
        torch.testing.assert_close(form.delta_weight(), _best_rank(delta1, R), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(form.lora_A @ form.lora_A.T, torch.eye(R), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(form.lora_B.T @ form.lora_B, torch.eye(R), rtol=1e-5, atol=1e-5)
        # the base is NOT rewritten (official): the model starts at W + [ΔW₁]_r
        assert torch.equal(model.get_submodule(path).base_layer.weight, weights[path])
        effective[path] = weights[path] + form.delta_weight().detach()
    assert LoRASBInit().needs == Cap.NEEDS_DATA | Cap.NEEDS_GRAD

    # one SGD step of R (the only trainable tensor) on one batch
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_R") for n in trainable)
    grads = {}
    model_g = tiny_llama(seed=0)
    with torch.no_grad():
        for p, w in effective.items():
            model_g.get_submodule(p).weight.copy_(w)
    for p in effective:
        model_g.get_submodule(p).weight.requires_grad_(True)
    model_g(IDS, labels=IDS).loss.backward()
    grads = {p: model_g.get_submodule(p).weight.grad for p in effective}
    before = {p: f.delta_weight().detach().clone() for p, f in forms.items()}
    eta = 0.5
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=eta)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    for path, form in forms.items():
        step = form.delta_weight().detach() - before[path]
        a, b, s = form.lora_A.detach(), form.lora_B.detach(), form.scaling
        eye_out, eye_in = torch.eye(b.shape[0]), torch.eye(a.shape[1])
        assert step.abs().max() > 0
        scale = step.abs().max()
        torch.testing.assert_close((eye_out - b @ b.T) @ step, torch.zeros_like(step), rtol=0, atol=1e-4 * scale)
        torch.testing.assert_close(step @ (eye_in - a.T @ a), torch.zeros_like(step), rtol=0, atol=1e-4 * scale)
        expected = -eta * s**2 * b @ b.T @ grads[path] @ a.T @ a
        torch.testing.assert_close(step, expected, rtol=1e-3, atol=1e-3 * scale)


def test_grad_update_and_lowrank_svd_options():
    spec = lorakit.AdapterSpec(form="lora_xs", form_args={"r": R}, init="lora_sb",
                               init_args={"lr": 0.1, "update": "grad"}, targets=["q_proj"])
    model = lorakit.attach(tiny_llama(seed=0), spec, batches=BATCHES)
    form = adapter_modules(model, "default")["model.layers.0.self_attn.q_proj"]
    mean = _grad_sums([p for p in adapter_modules(model, "default")])["model.layers.0.self_attn.q_proj"] / 3
    torch.testing.assert_close(form.delta_weight(), _best_rank(-0.1 * mean, R), rtol=1e-4, atol=1e-7)
    # the official randomized SVD (q = r, niter = 10, seed 42) is close to the exact truncation
    spec = lorakit.AdapterSpec(form="lora_xs", form_args={"r": R}, init="lora_sb", init_args={"svd": "lowrank"},
                               targets=["q_proj"])
    lowrank = adapter_modules(lorakit.attach(tiny_llama(seed=0), spec, batches=BATCHES), "default")
    delta1 = -1e-4 * torch.sign(_grad_sums(lowrank)["model.layers.0.self_attn.q_proj"])
    got = lowrank["model.layers.0.self_attn.q_proj"].delta_weight()
    assert (got - _best_rank(delta1, R)).norm() < 0.2 * _best_rank(delta1, R).norm()


def test_residual_variant_keeps_output_and_exports_for_original_base(tmp_path):
    spec = lorakit.AdapterSpec(form="lora_xs", form_args={"r": R}, init="lora_sb",
                               init_args={"lr": 1e-2, "residual": True}, targets=TARGETS)
    assert Cap.REWRITES_BASE in LoRASBInit(residual=True).needs
    base = _logits(tiny_llama(seed=0))
    model = lorakit.attach(tiny_llama(seed=0), spec, batches=BATCHES)
    torch.testing.assert_close(_logits(model), base, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_logits(lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(
        form="lora_xs", form_args={"r": R}, init="lora_sb", init_args={"lr": 1e-2}, targets=TARGETS),
        batches=BATCHES)), base, atol=1e-5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    trained = _logits(model)
    lorakit.save(model, tmp_path)
    again = lorakit.load(tiny_llama(seed=0), tmp_path)
    torch.testing.assert_close(_logits(again), trained, rtol=1e-4, atol=1e-5)


def test_non_frozen_factors_warn():
    spec = lorakit.AdapterSpec(form="slora", form_args={"r": R, "alpha": R}, init="lora_sb", targets=["q_proj"])
    with pytest.warns(UserWarning, match="only the middle matrix trains"):
        lorakit.attach(tiny_llama(seed=0), spec, batches=BATCHES)
