"""SLoRA / NLoRA / IntTune: ΔW = s·B·N·A; the Nyström init; IntTune trains only N."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.models import tiny_gpt2, tiny_llama


def _linear(out_f: int, in_f: int, weight: torch.Tensor | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f))
    if weight is not None:
        with torch.no_grad():
            model[0].weight.copy_(weight)
    return model


def _form(model, form: str, init: str = "default", init_args=None, **args):
    lorakit.attach(model, lorakit.AdapterSpec(form=form, form_args=args, targets=["0"], init=init,
                                              init_args=init_args or {}), seed=0)
    return adapter_modules(model, "default")["0"]


def test_slora_is_b_n_a_and_starts_at_the_base():
    model = _linear(20, 12)
    x = torch.randn(6, 12)
    base = model(x).detach()
    form = _form(model, "slora", r=3, alpha=6)
    assert torch.count_nonzero(form.lora_B) == 0 and torch.count_nonzero(form.lora_A) == 3 * 12
    bound = 1 / math.sqrt(3)  # Kaiming-uniform(a=√5) on (r, r): U(-1/√r, 1/√r)
    assert form.lora_N.abs().max() <= bound and torch.count_nonzero(form.lora_N) == 9
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (form.lora_A, form.lora_N, form.lora_B):
            p.copy_(torch.randn(p.shape, generator=g))
    dense = 2.0 * form.lora_B.detach() @ form.lora_N.detach() @ form.lora_A.detach()  # s = 6/3
    torch.testing.assert_close(form.delta_weight().detach(), dense)
    torch.testing.assert_close(model(x), base + x @ dense.T, rtol=1e-5, atol=1e-5)
    assert {n for n, p in form.named_parameters() if p.requires_grad} == {"lora_A", "lora_N", "lora_B"}


def test_nystrom_pinv_mode_is_the_nystrom_approximation():
    r, out_f, in_f = 4, 20, 14
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(3))
    form = _form(_linear(out_f, in_f, w), "nlora", r=r, alpha=r, nystrom_mode="pinv")  # s = 1
    c, rows, core = w[:, :r], w[:r, :], w[:r, :r]
    nystrom = c @ torch.linalg.lstsq(core, rows).solution  # C·W_II⁻¹·R, W_II invertible here
    torch.testing.assert_close(form.delta_weight().detach(), nystrom, rtol=1e-4, atol=1e-5)
    # exact on a rank-r weight whose landmark block is invertible: C·W_II⁺·R = W
    low = (torch.randn(out_f, r, generator=torch.Generator().manual_seed(4))
           @ torch.randn(r, in_f, generator=torch.Generator().manual_seed(5)))
    form = _form(_linear(out_f, in_f, low), "nlora", r=r, alpha=r, nystrom_mode="pinv")
    torch.testing.assert_close(form.delta_weight().detach(), low, rtol=1e-4, atol=1e-4)


def test_nystrom_weight_mode_is_the_official_init_and_same_via_init_on_slora():
    r, out_f, in_f = 3, 16, 10
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(6))
    nl = _form(_linear(out_f, in_f, w), "nlora", r=r, alpha=6)
    assert torch.equal(nl.lora_A, w[:r, :]) and torch.equal(nl.lora_B, w[:, :r])
    assert torch.equal(nl.lora_N, w[:r, :r])
    torch.testing.assert_close(nl.delta_weight().detach(), 2.0 * w[:, :r] @ w[:r, :r] @ w[:r, :])
    via_init = _form(_linear(out_f, in_f, w), "slora", init="nystrom", r=r, alpha=6)
    for name in ("lora_A", "lora_N", "lora_B"):
        assert torch.equal(getattr(via_init, name), getattr(nl, name))
    pinv = _form(_linear(out_f, in_f, w), "slora", init="nystrom", init_args={"mode": "pinv"}, r=r, alpha=6)
    torch.testing.assert_close(pinv.lora_N @ w[:r, :r], torch.eye(r), rtol=0, atol=1e-4)


def test_nystrom_reads_conv1d_weights_in_out_in_layout():
    model = tiny_gpt2(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form="nlora", form_args={"r": 4}, targets=["c_fc"]), seed=0)
    for path, form in adapter_modules(model, "default").items():
        w = model.get_submodule(path).base_layer.weight.T  # Conv1D stores (in, out)
        assert torch.equal(form.lora_A, w[:4, :]) and torch.equal(form.lora_B, w[:, :4])


def test_inttune_trains_only_n():
    r = 4
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form="inttune", form_args={"r": r, "alpha": 64},
                                              targets="all-linear"), seed=0)
    forms = adapter_modules(model, "default")
    start = {p: {n: t.detach().clone() for n, t in f.named_parameters()} for p, f in forms.items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".lora_N") for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == r * r * len(forms)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for path, form in forms.items():
        assert torch.equal(form.lora_A, start[path]["lora_A"])
        assert torch.equal(form.lora_B, start[path]["lora_B"])
        assert not torch.equal(form.lora_N, start[path]["lora_N"])


def test_nystrom_init_is_refused_on_a_form_without_a_middle_matrix():
    with pytest.raises(ValueError, match=r"nystrom.*middle matrix.*'lora'"):
        lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(form="lora", init="nystrom"))
    with pytest.raises(ValueError, match="mode must be one of"):
        lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(form="slora", init="nystrom",
                                                               init_args={"mode": "svd"}))
    with pytest.raises(ValueError, match="exceeds min"):
        lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(form="nlora", form_args={"r": 20},
                                                               targets=["v_proj"]))
