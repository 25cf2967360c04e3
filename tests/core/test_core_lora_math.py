"""LoRA's output and merged weight against a dense recomputation: y = x (W + s·B·A)^T + b (+ s·b_lora)."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdapterSpec

try:  # tests/ may or may not be a package
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter


def toy(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(12, 20, bias=bias), act=nn.Tanh(),
                                     fc2=nn.Linear(20, 6, bias=bias)))


def x_input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


def dense(x, W, b, form, s, with_lora_bias=False):
    """Reference: x (W + s B A)^T + b + s b_lora, in float64."""
    A, B = form.lora_A.double(), form.lora_B.double()
    y = x.double() @ (W.double() + s * (B @ A)).T
    if b is not None:
        y = y + b.double()
    if with_lora_bias:
        y = y + s * form.lora_bias.double()
    return y


@pytest.mark.parametrize("r,alpha,rslora,expected_s", [
    (4, 8, False, 2.0),
    (9, 6, False, 6 / 9),
    (9, 6, True, 6 / 3),
    (4, 8, True, 4.0),
])
@pytest.mark.parametrize("base_bias", [False, True])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_linear_output_equals_dense(r, alpha, rslora, expected_s, base_bias, lora_bias):
    model = toy(bias=base_bias)
    W = model.fc1.weight.detach().clone()
    b = None if model.fc1.bias is None else model.fc1.bias.detach().clone()
    lorakit.attach(model, AdapterSpec(targets=["fc1"], form_args={"r": r, "alpha": alpha, "rslora": rslora,
                                                                   "bias": lora_bias}), seed=0)
    randomize_adapter(model, seed=2, std=0.3)
    form = model.fc1.adapters["default"]
    assert math.isclose(form.scaling, expected_s, rel_tol=1e-12)
    assert math.isclose(form.scaling, alpha / (math.sqrt(r) if rslora else r), rel_tol=1e-12)
    x = x_input(5, 7, 12)
    with torch.no_grad():
        got = model.fc1(x)
    ref = dense(x, W, b, form, expected_s, with_lora_bias=lora_bias)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert (ref - dense(x, W, b, form, 0.0)).abs().max() > 0.1  # the update is not negligible
    # ΔW, merged weight and unmerge
    ref_dw = expected_s * (form.lora_B.double() @ form.lora_A.double())
    torch.testing.assert_close(form.delta_weight().double(), ref_dw, rtol=1e-6, atol=1e-6)
    lorakit.merge(model)
    torch.testing.assert_close(model.fc1.base_layer.weight.double(), W.double() + ref_dw, rtol=0, atol=1e-6)
    if lora_bias:
        b0 = b.double() if b is not None else torch.zeros(20, dtype=torch.float64)
        want = b0 + expected_s * form.lora_bias.double()
        torch.testing.assert_close(model.fc1.base_layer.bias.double(), want, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.fc1(x).double(), ref, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    torch.testing.assert_close(model.fc1.base_layer.weight, W, rtol=0, atol=1e-6)
    if b is None:
        assert model.fc1.base_layer.bias is None  # no leftover bias from merging the lora bias
    else:
        torch.testing.assert_close(model.fc1.base_layer.bias, b, rtol=0, atol=1e-6)


def test_llama_projection_equals_dense(tiny_llama):
    layer = tiny_llama.model.layers[1].self_attn.v_proj  # 32 -> 16 (GQA)
    W = layer.weight.detach().clone()
    lorakit.attach(tiny_llama, AdapterSpec(targets=["v_proj"], form_args={"r": 3, "alpha": 5}), seed=0)
    randomize_adapter(tiny_llama, seed=4)
    adapted = tiny_llama.model.layers[1].self_attn.v_proj
    x = x_input(2, 5, 32)
    with torch.no_grad():
        got = adapted(x)
    torch.testing.assert_close(got.double(), dense(x, W, None, adapted.adapters["default"], 5 / 3),
                               rtol=1e-5, atol=1e-5)


def test_conv1d_equals_dense(tiny_gpt2):
    """HF Conv1D stores W as (in, out): ΔW is still (out, in) and the merge writes its transpose."""
    layer = tiny_gpt2.transformer.h[0].attn.c_attn  # 32 -> 96
    W_out_in = layer.weight.detach().T.clone()
    b = layer.bias.detach().clone()
    lorakit.attach(tiny_gpt2, AdapterSpec(targets=["c_attn"], form_args={"r": 4, "alpha": 8, "bias": True}),
                   seed=0)
    randomize_adapter(tiny_gpt2, seed=5)
    adapted = tiny_gpt2.transformer.h[0].attn.c_attn
    form = adapted.adapters["default"]
    assert tuple(form.lora_A.shape) == (4, 32) and tuple(form.lora_B.shape) == (96, 4)
    x = x_input(2, 5, 32)
    ref = dense(x, W_out_in, b, form, 2.0, with_lora_bias=True)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x).double(), ref, rtol=1e-5, atol=1e-5)
    lorakit.merge(tiny_gpt2)
    ref_w = (W_out_in.double() + 2.0 * form.lora_B.double() @ form.lora_A.double()).T
    torch.testing.assert_close(adapted.base_layer.weight.double(), ref_w, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x).double(), ref, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(tiny_gpt2)
    torch.testing.assert_close(adapted.base_layer.weight, W_out_in.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(adapted.base_layer.bias, b, rtol=0, atol=1e-6)


def test_two_active_adapters_add_up():
    model = toy()
    W, b = model.fc1.weight.detach().clone(), model.fc1.bias.detach().clone()
    lorakit.attach(model, AdapterSpec(targets=["fc1"], form_args={"r": 2, "alpha": 4}), name="a", seed=0)
    lorakit.attach(model, AdapterSpec(targets=["fc1"], form_args={"r": 5, "alpha": 3, "rslora": True}),
                   name="b", seed=0)
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    fa, fb = model.fc1.adapters["a"], model.fc1.adapters["b"]
    x = x_input(4, 12)
    lorakit.set_active(model, ["a", "b"])
    dw = (2.0 * fa.lora_B.double() @ fa.lora_A.double()
          + (3 / math.sqrt(5)) * fb.lora_B.double() @ fb.lora_A.double())
    ref = x.double() @ (W.double() + dw).T + b.double()
    with torch.no_grad():
        torch.testing.assert_close(model.fc1(x).double(), ref, rtol=1e-5, atol=1e-5)
    lorakit.merge(model)
    assert model.fc1.merged == ["a", "b"]
    torch.testing.assert_close(model.fc1.base_layer.weight.double(), W.double() + dw, rtol=0, atol=1e-6)
    lorakit.unmerge(model)
    torch.testing.assert_close(model.fc1.base_layer.weight, W, rtol=0, atol=1e-6)


def test_dropout_acts_on_the_input_only_in_training():
    model = toy()
    lorakit.attach(model, AdapterSpec(targets=["fc1"], form_args={"r": 2, "alpha": 2, "dropout": 0.5}),
                   seed=0)
    randomize_adapter(model, seed=1)
    x = x_input(64, 12)
    model.eval()
    with torch.no_grad():
        a = model.fc1(x)
        b = model.fc1(x)
    assert torch.equal(a, b)
    W, bias = model.fc1.base_layer.weight, model.fc1.base_layer.bias
    torch.testing.assert_close(a.double(), dense(x, W, bias, model.fc1.adapters["default"], 1.0), rtol=1e-5,
                               atol=1e-5)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        c = model.fc1(x)
    assert not torch.allclose(c, a)
