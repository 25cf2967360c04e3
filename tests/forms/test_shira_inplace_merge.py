"""SHiRA merges in place through the generic ``Form.merge_into`` hook: an indexed write of its k values
into the base weight's own storage (Linear and GPT-2 Conv1D), no dense (out, in) tensor allocated,
the same weight as the dense path W + ΔW, and a bit-exact unmerge."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.forms.shira import Shira
from lorakit.models import tiny_gpt2, tiny_llama

IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


class _LargestNewTensor(TorchDispatchMode):
    """Records the largest tensor an op returns that does not share storage with ``allowed``."""

    def __init__(self, allowed: list[torch.Tensor]) -> None:
        super().__init__()
        self.allowed = {t.untyped_storage().data_ptr() for t in allowed}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.allowed:
                self.largest = max(self.largest, t.numel())
        return out


def _model(kind: str, dtype: torch.dtype = torch.float32):
    model = tiny_llama(seed=0) if kind == "llama" else tiny_gpt2(seed=0)
    targets = ["q_proj", "down_proj"] if kind == "llama" else ["c_attn", "c_fc"]
    model.to(dtype)
    lorakit.attach(model, lorakit.AdapterSpec(form="shira", form_args={"r": 2}, targets=targets), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _dense_forbidden(monkeypatch) -> None:
    def boom(self, *args, **kwargs):
        raise AssertionError("the dense path ran during merge/unmerge")

    for name in ("delta_weight", "merged_weight", "unmerged_weight"):
        monkeypatch.setattr(Shira, name, boom)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_inplace_merge_allocates_nothing_dense_and_equals_the_dense_path(kind, monkeypatch):
    model = _model(kind)
    layers = [layer for _, layer in adapted_layers(model)]
    weights = [layer.base_layer.weight for layer in layers]
    before = [w.detach().clone() for w in weights]
    ptrs = [w.data_ptr() for w in weights]
    # the dense path's result, computed up front: W + ΔW in the (out, in) layout
    dense = [(layer._weight_out_in() + layer.adapters["default"].delta_weight()).detach().clone()
             for layer in layers]
    with torch.no_grad():
        unmerged = model(IDS).logits
    smallest_weight = min(w.numel() for w in weights)

    _dense_forbidden(monkeypatch)
    with torch.no_grad(), _LargestNewTensor(weights) as spy:
        lorakit.merge(model)
    assert spy.largest < smallest_weight  # only k-sized index/value tensors
    for layer, w, ptr, expect in zip(layers, weights, ptrs, dense, strict=True):
        assert w.data_ptr() == ptr  # written in the base weight's own storage
        assert torch.equal(layer._weight_out_in(), expect)  # bit for bit what W + ΔW gives
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-4, atol=1e-5)

    _dense_forbidden(monkeypatch)
    with torch.no_grad(), _LargestNewTensor(weights) as spy:
        lorakit.unmerge(model)
    assert spy.largest < smallest_weight
    assert all(torch.equal(w, b) for w, b in zip(weights, before, strict=True))  # exact unmerge
    assert all(w.data_ptr() == p for w, p in zip(weights, ptrs, strict=True))


def test_bf16_base_gets_the_dense_paths_rounding_and_exact_unmerge():
    """The sum is formed in the form's fp32 and rounded once to bf16, as bf16(W.float() + ΔW)."""
    model = _model("llama", torch.bfloat16)
    for _, layer in adapted_layers(model):  # keep the adapter in fp32 (lorakit's default), base bf16
        layer.adapters.float()
    layers = [layer for _, layer in adapted_layers(model)]
    before = [layer.base_layer.weight.detach().clone() for layer in layers]
    dense = [(layer.base_layer.weight.float() + layer.adapters["default"].delta_weight()).to(torch.bfloat16)
             for layer in layers]
    lorakit.merge(model)
    for layer, expect in zip(layers, dense, strict=True):
        assert torch.equal(layer.base_layer.weight, expect)
    lorakit.unmerge(model)
    assert all(torch.equal(la.base_layer.weight, b) for la, b in zip(layers, before, strict=True))


def test_two_merged_adapters_unmerge_exactly_in_any_order():
    model = _model("llama")
    lorakit.attach(model, lorakit.AdapterSpec(form="shira", form_args={"r": 3}, targets=["q_proj"]),
                   name="b", seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    lorakit.set_active(model, ["default", "b"])
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = model(IDS).logits
    lorakit.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-4, atol=1e-5)
    lorakit.unmerge(model, ["default"])  # not the last merged: its entries may overlap b's
    lorakit.unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
