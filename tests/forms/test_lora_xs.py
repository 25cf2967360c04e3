"""LoRA-XS: A, B span W's top-r singular subspace (Σ in A), only the r×r R trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.models import tiny_gpt2, tiny_llama


@pytest.mark.parametrize("kind", ["linear", "gpt2"])
def test_frozen_factors_are_the_truncated_svd_of_w(kind):
    r = 5
    if kind == "linear":
        torch.manual_seed(0)
        model, targets = nn.Sequential(nn.Linear(24, 40)), ["0"]
    else:
        model, targets = tiny_gpt2(seed=0), ["c_attn"]
    lorakit.attach(model, lorakit.AdapterSpec(form="lora_xs", form_args={"r": r}, targets=targets), seed=0)
    for path, form in adapter_modules(model, "default").items():
        base = model.get_submodule(path).base_layer
        w = base.weight.detach() if kind == "linear" else base.weight.detach().T  # (out, in)
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        a, b = form.lora_A.detach().double(), form.lora_B.detach().double()
        # B·A is the best rank-r approximation U_r Σ_r V_rᵀ (invariant to singular-vector signs)
        torch.testing.assert_close(b @ a, (u[:, :r] * s[:r]) @ vh[:r], rtol=0, atol=1e-5)
        # B = U_r: orthonormal columns spanning the top-r left singular subspace
        torch.testing.assert_close(b.T @ b, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-5)
        torch.testing.assert_close(b @ b.T, u[:, :r] @ u[:, :r].T, rtol=0, atol=1e-5)
        # A = Σ_r V_rᵀ: rows orthogonal with norms σ_1..σ_r (Σ sits in A, as the official code)
        torch.testing.assert_close(a @ a.T, torch.diag(s[:r] ** 2), rtol=0, atol=1e-5)
        torch.testing.assert_close(a.T @ torch.linalg.pinv(a.T), vh[:r].T @ vh[:r], rtol=0, atol=1e-5)


def test_only_r_trains_and_count_is_r_squared():
    r = 4
    model = tiny_llama(seed=0)
    spec = lorakit.AdapterSpec(form="lora_xs", form_args={"r": r}, targets="all-linear")
    lorakit.attach(model, spec, seed=0)
    forms = adapter_modules(model, "default")
    frozen = {p: (f.lora_A.detach().clone(), f.lora_B.detach().clone(), f.lora_R.detach().clone())
              for p, f in forms.items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".lora_R") for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == r * r * len(forms)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for path, form in forms.items():
        a0, b0, r0 = frozen[path]
        assert torch.equal(form.lora_A, a0) and torch.equal(form.lora_B, b0)
        assert not torch.equal(form.lora_R, r0)


def test_init_is_near_identity_by_default_and_exact_with_zero_r():
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    model = tiny_llama(seed=0)
    model.eval()
    with torch.no_grad():
        base = model(ids).logits
    spec = lorakit.AdapterSpec(form="lora_xs", form_args={"r": 8}, targets="all-linear")
    lorakit.attach(model, spec, seed=0)
    rs = torch.cat([f.lora_R.detach().flatten() for f in adapter_modules(model, "default").values()])
    assert 0.7e-5 < rs.std().item() < 1.3e-5  # R ~ N(0, 1e-5²), official sigma
    with torch.no_grad():
        near = model(ids).logits
    assert not torch.equal(near, base)
    torch.testing.assert_close(near, base, rtol=0, atol=1e-4)

    exact = tiny_llama(seed=0)
    exact.eval()
    lorakit.attach(exact, lorakit.AdapterSpec(form="lora_xs", form_args={"r": 8, "init_std": 0.0},
                                              targets="all-linear"), seed=0)
    out = exact(ids, labels=ids)
    torch.testing.assert_close(out.logits.detach(), base, rtol=0, atol=1e-6)
    out.loss.backward()  # R = 0 still gets a gradient: s·Bᵀ·G·Aᵀ with A, B non-zero
    assert all(f.lora_R.grad.abs().sum() > 0 for f in adapter_modules(exact, "default").values())


def test_rank_above_layer_size_is_refused():
    with pytest.raises(ValueError, match="exceeds min"):
        lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(form="lora_xs", form_args={"r": 20},
                                                               targets=["v_proj"]))
