"""Several named adapters on one model: switching, adding up, delete, disable, merge, unload."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import AdapterSpec
from lorakit.core.layer import AdaptedLayer
from lorakit.models import tiny_gpt2, tiny_llama

try:  # tests/ may or may not be a package
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter


def llama():
    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


def gpt2():
    return tiny_gpt2(hidden=32, layers=2, heads=4, vocab=128, seed=0)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


def single(spec: AdapterSpec, ids, seed: int):
    """Reference: a fresh base with only this adapter (randomized with ``seed``)."""
    model = llama()
    lorakit.attach(model, spec, seed=0)
    randomize_adapter(model, seed=seed)
    return logits(model, ids)


SPEC_A = AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 4, "alpha": 8, "bias": True})
SPEC_B = AdapterSpec(targets=["o_proj", "up_proj"], form_args={"r": 2, "alpha": 3, "rslora": True})


@pytest.fixture
def two(tiny_llama):
    lorakit.attach(tiny_llama, SPEC_A, name="a", seed=0)
    randomize_adapter(tiny_llama, "a", seed=1)
    lorakit.attach(tiny_llama, SPEC_B, name="b", seed=0)
    randomize_adapter(tiny_llama, "b", seed=2)
    return tiny_llama


def test_set_active_switches_outputs(two, input_ids):
    base = logits(llama(), input_ids)
    ref_a, ref_b = single(SPEC_A, input_ids, 1), single(SPEC_B, input_ids, 2)
    assert (ref_a - base).abs().max() > 0.1 and (ref_b - base).abs().max() > 0.1
    assert lorakit.active_adapters(two) == ("b",)
    close(logits(two, input_ids), ref_b)
    lorakit.set_active(two, "a")
    close(logits(two, input_ids), ref_a)
    lorakit.set_active(two, [])
    close(logits(two, input_ids), base)
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        lorakit.set_active(two, ["a", "c"])
    close(logits(two, input_ids), base)


def test_two_active_adapters_add_up(two, input_ids):
    # reference: one fresh model with both adapters active, built independently
    ref = llama()
    lorakit.attach(ref, SPEC_B, name="b", seed=0)
    randomize_adapter(ref, "b", seed=2)
    lorakit.attach(ref, SPEC_A, name="a", seed=0)
    randomize_adapter(ref, "a", seed=1)
    lorakit.set_active(ref, ["b", "a"])
    lorakit.set_active(two, ["a", "b"])
    out = logits(two, input_ids)
    close(out, logits(ref, input_ids))
    assert (out - single(SPEC_A, input_ids, 1)).abs().max() > 0.1
    # layer-level: the updates of adapters on the same layer add up exactly
    layer = two.model.layers[0].self_attn.q_proj
    lorakit.attach(two, AdapterSpec(targets=["q_proj"], form_args={"r": 3}), name="c", seed=0)
    randomize_adapter(two, "c", seed=3)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = layer.base_layer(x)
        deltas = []
        for names in (["a"], ["c"], ["a", "c"]):
            lorakit.set_active(two, names)
            deltas.append(layer(x) - base)
    close(deltas[2], deltas[0] + deltas[1])


def test_delete_restores_the_base(two, input_ids):
    base = logits(llama(), input_ids)
    base_keys = set(llama().state_dict())
    lorakit.set_active(two, ["a", "b"])
    lorakit.merge(two)
    lorakit.delete(two, "a")  # merged: unmerged first
    assert set(lorakit.specs(two)) == {"b"} and lorakit.active_adapters(two) == ("b",)
    close(logits(two, input_ids), single(SPEC_B, input_ids, 2))
    assert isinstance(two.model.layers[0].self_attn.q_proj, nn.Linear)  # only "a" lived there
    assert isinstance(two.model.layers[0].self_attn.o_proj, AdaptedLayer)
    lorakit.delete(two, "b")
    assert lorakit.specs(two) == {} and lorakit.active_adapters(two) == ()
    assert not any(isinstance(m, AdaptedLayer) for m in two.modules())
    for name in ("q_proj", "v_proj", "o_proj"):
        assert type(getattr(two.model.layers[1].self_attn, name)) is nn.Linear
    assert type(two.model.layers[1].mlp.up_proj) is nn.Linear
    assert set(two.state_dict()) == base_keys  # no lora bias left behind in the base layers
    close(logits(two, input_ids), base, tol=1e-6)
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        lorakit.delete(two, "a")


def test_delete_conv1d_restores_conv1d(tiny_gpt2, input_ids):
    base = logits(tiny_gpt2, input_ids)
    lorakit.attach(tiny_gpt2, AdapterSpec(targets="all-linear"), seed=0)
    randomize_adapter(tiny_gpt2)
    assert (logits(tiny_gpt2, input_ids) - base).abs().max() > 0.1
    lorakit.delete(tiny_gpt2, "default")
    assert type(tiny_gpt2.transformer.h[0].attn.c_attn) is Conv1D
    assert not any(isinstance(m, AdaptedLayer) for m in tiny_gpt2.modules())
    assert torch.equal(logits(tiny_gpt2, input_ids), base)


@pytest.mark.parametrize("make", [llama, gpt2])
def test_merge_equals_unmerged_and_unmerge_restores_weights(make, input_ids):
    model = make()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = AdapterSpec(targets="all-linear", form_args={"r": 4, "alpha": 8, "bias": True})
    lorakit.attach(model, spec, seed=0)
    randomize_adapter(model)
    unmerged = logits(model, input_ids)
    lorakit.merge(model)
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    assert layers and all(m.merged == ["default"] for m in layers)
    close(logits(model, input_ids), unmerged)
    lorakit.unmerge(model)
    assert all(m.merged == [] for m in layers)
    after = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if ".adapters." not in n}
    assert after.keys() == weights.keys()
    for n, w in weights.items():
        torch.testing.assert_close(after[n], w, rtol=0, atol=1e-6)
    close(logits(model, input_ids), unmerged)


def test_disabled_gives_base_logits_even_when_merged(two, input_ids):
    base = logits(llama(), input_ids)
    lorakit.set_active(two, "a")
    adapted = logits(two, input_ids)
    with lorakit.disabled(two):
        close(logits(two, input_ids), base)
    lorakit.merge(two)
    q = two.model.layers[0].self_attn.q_proj
    assert q.merged == ["a"]
    with lorakit.disabled(two):
        assert q.merged == []
        close(logits(two, input_ids), base)
    assert q.merged == ["a"]  # merged again afterwards
    close(logits(two, input_ids), adapted)
    with pytest.raises(RuntimeError, match="boom"), lorakit.disabled(two):
        raise RuntimeError("boom")
    assert q.merged == ["a"]
    close(logits(two, input_ids), adapted)


def test_unload_merged_gives_a_plain_adapted_model(two, input_ids):
    lorakit.set_active(two, ["a", "b"])
    adapted = logits(two, input_ids)
    plain = lorakit.unload(two)
    assert plain is two
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert lorakit.specs(plain) == {} and lorakit.active_adapters(plain) == ()
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any(".adapters." in n or "base_layer" in n for n, _ in plain.named_parameters())
    close(logits(plain, input_ids), adapted)
    # the merged weight is W + s·B·A (closed form, computed on a fresh copy)
    ref = llama()
    lorakit.attach(ref, SPEC_A, seed=0)
    randomize_adapter(ref, seed=1)
    form = ref.model.layers[0].self_attn.q_proj.adapters["default"]
    want = ref.model.layers[0].self_attn.q_proj.base_layer.weight + 2.0 * form.lora_B @ form.lora_A
    torch.testing.assert_close(plain.model.layers[0].self_attn.q_proj.weight, want, rtol=0, atol=1e-6)


def test_unload_without_merge_gives_the_base(two, input_ids):
    base_model = llama()
    base = logits(base_model, input_ids)
    lorakit.set_active(two, ["a", "b"])
    lorakit.merge(two)
    plain = lorakit.unload(two, merge_active=False)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(base_model.state_dict())
    close(logits(plain, input_ids), base, tol=1e-6)
