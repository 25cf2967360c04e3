"""Op fused_lora: the split forward/backward equals plain autograd of the dense formula, equals lorakit's
LoRA form (base on X, LoRA on the dropped X), and registers a CUDA-only Triton backend."""

from __future__ import annotations

import pytest
import torch

from lorakit.core.batched import BackendUnavailableError, backends, choose_backend
from lorakit.core.fused_lora import dropout_mask, fused_lora


def tensors(dtype, seed=0, p=0.3, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 12, generator=g, dtype=dtype)
    W = torch.randn(10, 12, generator=g, dtype=dtype)
    b = torch.randn(10, generator=g, dtype=dtype) if bias else None
    A = torch.randn(4, 12, generator=g, dtype=dtype)
    B = torch.randn(10, 4, generator=g, dtype=dtype)
    mask = dropout_mask(x.shape, p, generator=g)
    return x, W, b, A, B, mask


def dense(x, W, b, A, B, s, mask, p):
    xm = x if mask is None else x * mask.to(x.dtype) / (1 - p)
    y = x @ W.T + s * (xm @ A.T) @ B.T
    return y if b is None else y + b


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("train_w", [False, True])
def test_split_backward_equals_autograd(dtype, tol, p, train_w):
    x, W, b, A, B, mask = tensors(dtype, p=p)
    s = 0.75
    leaves = [t.clone().requires_grad_(True) for t in (x, W, b, A, B)]
    ref = [t.clone().requires_grad_(True) for t in (x, W, b, A, B)]
    if not train_w:
        leaves[1].requires_grad_(False)
        ref[1].requires_grad_(False)
    y = fused_lora(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], s, mask=mask, p=p)
    y_ref = dense(*ref, s, mask, p)
    assert (y - y_ref).norm() <= tol * y_ref.norm()
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want in zip(leaves, ref, strict=True):
        if want.grad is None:
            assert got.grad is None
            continue
        assert (got.grad - want.grad).norm() <= tol * want.grad.norm()


def test_equals_lora_form_with_its_dropout_mask():
    import lorakit
    from lorakit.core.inject import adapter_modules
    from lorakit.models import tiny_llama

    m = tiny_llama(hidden=32, layers=1, heads=4, kv_heads=2, vocab=64, seed=0)
    lorakit.attach(m, lorakit.AdapterSpec(form_args={"r": 4, "alpha": 6}), "a", seed=0)
    path, form = next(iter(adapter_modules(m, "a").items()))
    with torch.no_grad():
        form.lora_B.normal_()
    layer = m.get_submodule(path)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        want = layer(x)
        got = fused_lora(x, layer.base_layer.weight, layer.base_layer.bias, form.lora_A, form.lora_B, form.scaling)
    assert torch.allclose(got, want, atol=1e-6)


def test_registry_cuda_only_triton_and_errors():
    assert {"torch", "triton"} <= set(backends("fused_lora"))
    x, W, b, A, B, _ = tensors(torch.float32, p=0.0)
    assert choose_backend("fused_lora", "auto", x, W, b, A, B, 1.0).name == "torch"
    with pytest.raises(BackendUnavailableError):
        fused_lora(x, W, b, A, B, 1.0, backend="triton")
    with pytest.raises(ValueError, match="shapes"):
        fused_lora(x, W, b, A[:, :5], B, 1.0)
    with pytest.raises(ValueError, match="needs the dropout mask"):
        fused_lora(x, W, b, A, B, 1.0, p=0.2)
    assert dropout_mask((2, 2), 0.0) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton backend is GPU-only)")
def test_triton_matches_reference_on_gpu():
    from lorakit.core import fused_lora_triton

    if not fused_lora_triton.available():
        pytest.skip("triton not installed")
    x, W, b, A, B, mask = (t.cuda() if t is not None else None for t in tensors(torch.float32, p=0.1))
    leaves = [t.clone().requires_grad_(True) for t in (x, b, A, B)]
    ref = [t.clone().requires_grad_(True) for t in (x, b, A, B)]
    y = fused_lora(leaves[0], W, leaves[1], leaves[2], leaves[3], 0.5, mask=mask, p=0.1, backend="triton")
    y_ref = fused_lora(ref[0], W, ref[1], ref[2], ref[3], 0.5, mask=mask, p=0.1, backend="torch")
    assert torch.allclose(y, y_ref, rtol=2e-2, atol=2e-2)  # TF32 tl.dot
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want in zip(leaves, ref, strict=True):
        assert torch.allclose(got.grad, want.grad, rtol=2e-2, atol=2e-2)
