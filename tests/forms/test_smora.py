"""SMoRA: top-k rank gating per token equals a dense gated recomputation; balancing; not mergeable."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.forms.smora import SMoRA, SMoRAArgs
from lorakit.models import tiny_llama


def _form(args: SMoRAArgs, n: int = 32, m: int = 24, seed: int = 0) -> SMoRA:
    torch.manual_seed(seed)
    form = SMoRA(nn.Linear(n, m), args)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        form.lora_B.copy_(torch.randn(form.lora_B.shape, generator=g))
        form.expert_bias.copy_(torch.randn(args.r, generator=g) * 0.05)
    return form


def _reference_gate(form: SMoRA, xt: torch.Tensor) -> torch.Tensor:
    """The gate of one token written out from the formulas in the module docstring."""
    k = form.args.k
    z = form.lora_router.detach().double() @ xt
    sig = [1.0 / (1.0 + math.exp(-float(v))) + float(b) for v, b in zip(z, form.expert_bias, strict=True)]
    chosen = sorted(range(form.args.r), key=lambda i: -sig[i])[:k]
    gate = torch.zeros(form.args.r, dtype=torch.float64)
    for i in chosen:
        if form.args.gate == "sigmoid":
            gate[i] = k * sig[i] / sum(sig[j] for j in chosen)
        elif form.args.gate == "softmax":
            gate[i] = k * math.exp(float(z[i])) / sum(math.exp(float(z[j])) for j in chosen)
        else:
            gate[i] = 1.0
    return gate


@pytest.mark.parametrize("gate", ["sigmoid", "softmax", "binary"])
def test_k_ranks_per_token_and_output_equals_dense_gated_update(gate):
    form = _form(SMoRAArgs(r=8, k=3, alpha=6.0, gate=gate)).eval()
    g = torch.Generator().manual_seed(7)
    x, base_out = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 24, generator=g)
    out = form.apply(x, base_out)
    a, b = form.lora_A.double(), form.lora_B.double()
    expected = []
    for xt, ot in zip(x.reshape(-1, 32).double(), base_out.reshape(-1, 24).double(), strict=True):
        gate_t = _reference_gate(form, xt)
        assert (gate_t != 0).sum() == 3  # exactly k ranks on this token
        delta_t = (6.0 / 3) * b @ torch.diag(gate_t) @ a  # ΔW_t = (α/k)·B·G(x)·A
        expected.append(ot + delta_t @ xt)
    torch.testing.assert_close(out.double(), torch.stack(expected).reshape(out.shape), rtol=1e-5, atol=1e-6)
    gates, selected = form.gates(x)
    assert ((gates != 0).sum(-1) == 3).all() and selected.shape == (2, 6, 3)


def test_router_trains_through_the_gate_values_but_not_with_binary_gates():
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    for gate, router_grad in [("sigmoid", True), ("softmax", True), ("binary", False)]:
        form = _form(SMoRAArgs(r=8, k=2, gate=gate)).eval()
        form.apply(x, torch.zeros(10, 24)).pow(2).sum().backward()
        assert form.lora_B.grad.abs().sum() > 0 and form.lora_A.grad.abs().sum() > 0
        got = form.lora_router.grad is not None and form.lora_router.grad.abs().sum() > 0
        assert got == router_grad, gate


def test_load_balancing_bias_evens_out_rank_usage():
    r, k, u = 8, 2, 0.01
    torch.manual_seed(0)
    form = SMoRA(nn.Linear(16, 4), SMoRAArgs(r=r, k=k, alpha=2.0, bias_u=u)).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a router that prefers ranks 0 and 1 for every token
        form.lora_router.mul_(0.1)
        form.lora_router[:2] += 0.3
    x = torch.randn(256, 16, generator=g) + 0.5

    def counts() -> torch.Tensor:
        return torch.bincount(form.gates(x)[1].reshape(-1), minlength=r).float()

    first = counts()
    assert first[:2].sum() > 0.9 * first.sum()  # skewed: ranks 0 and 1 take almost every token
    b0 = form.expert_bias.clone()
    form.apply(x, torch.zeros(256, 4))
    torch.testing.assert_close(form.expert_bias, b0 + u * torch.sign(first.mean() - first))
    usage = torch.zeros(r)
    for step in range(300):
        if step >= 200:
            usage += counts()
        form.apply(x, torch.zeros(256, 4))
    cv_first = (first.std() / first.mean()).item()
    cv_last = (usage.std() / usage.mean()).item()
    assert cv_first > 1.5 and cv_last < 0.25, (cv_first, cv_last)  # measured: 1.76 -> 0.13
    assert (usage > 0).all()
    form.eval()  # default bias_update="train": evaluation leaves the bias alone
    before = form.expert_bias.clone()
    form.apply(x, torch.zeros(256, 4))
    assert torch.equal(form.expert_bias, before)


def test_merge_refused_count_and_exact_reload(tmp_path):
    model = tiny_llama(seed=0)
    spec = lorakit.AdapterSpec(form="smora", form_args={"r": 8, "k": 2, "alpha": 4.0, "bias_u": 0.01})
    lorakit.attach(model, spec, seed=0)
    forms = adapter_modules(model, "default")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        8 * (2 * f.in_features + f.out_features) for f in forms.values())
    model.train()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert all(f.expert_bias.abs().sum() > 0 for f in forms.values())
    with pytest.raises(ValueError, match="cannot be merged"):
        lorakit.merge(model)
    with pytest.raises(ValueError, match="no fixed ΔW"):
        next(iter(forms.values())).delta_weight()
    lorakit.save(model, tmp_path)
    fresh = lorakit.load(tiny_llama(seed=0), tmp_path)
    for path, form in adapter_modules(fresh, "default").items():
        assert torch.equal(form.expert_bias, forms[path].expert_bias)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
