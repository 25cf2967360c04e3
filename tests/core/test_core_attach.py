"""attach: freezing, parameter counts, identity at init, seeding, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import AdapterSpec
from lorakit.core.layer import AdaptedLayer


def dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out) read straight from the base layer's weight."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("model_name,targets", [
    ("tiny_llama", ["q_proj", "v_proj"]),
    ("tiny_llama", "all-linear"),
    ("tiny_gpt2", ["c_attn", "c_fc"]),
])
@pytest.mark.parametrize("bias", [False, True])
def test_only_adapter_params_train_and_count_matches_formula(request, model_name, targets, bias):
    model = request.getfixturevalue(model_name)
    r = 3
    paths = lorakit.find_targets(model, AdapterSpec(targets=targets))
    expected = 0
    for p in paths:
        fan_in, fan_out = dims(model.get_submodule(p))
        expected += r * (fan_in + fan_out) + (fan_out if bias else 0)
    n_before = sum(p.numel() for p in model.parameters())
    lorakit.attach(model, AdapterSpec(targets=targets, form_args={"r": r, "alpha": 6, "bias": bias}))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert sum(p.numel() for p in model.parameters()) == n_before + expected
    frozen_base = [n for n, p in model.named_parameters() if ".adapters." not in n]
    assert all(not model.get_parameter(n).requires_grad for n in frozen_base)


def test_backward_reaches_only_the_adapter(tiny_llama, input_ids):
    lorakit.attach(tiny_llama, AdapterSpec(form_args={"r": 2}), seed=0)
    tiny_llama(input_ids).logits.square().mean().backward()
    for n, p in tiny_llama.named_parameters():
        if ".adapters." in n:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    # B = 0 at init, so only B gets a non-zero gradient on the first step (A's grad goes through B)
    layer = tiny_llama.model.layers[0].self_attn.q_proj.adapters["default"]
    assert layer.lora_B.grad.abs().sum() > 0
    assert torch.count_nonzero(layer.lora_A.grad) == 0


@pytest.mark.parametrize("init", ["default", "kaiming", "gaussian"])
def test_output_equals_base_at_init(tiny_llama, input_ids, init):
    base = logits(tiny_llama, input_ids)
    lorakit.attach(tiny_llama, AdapterSpec(targets="all-linear", init=init, form_args={"r": 4, "bias": True}),
                   seed=0)
    assert torch.equal(logits(tiny_llama, input_ids), base)
    form = tiny_llama.model.layers[0].self_attn.q_proj.adapters["default"]
    assert form.lora_A.abs().sum() > 0  # A is random, B (and the lora bias) zero
    assert torch.count_nonzero(form.lora_B) == 0


def test_output_equals_base_at_init_gpt2(tiny_gpt2, input_ids):
    base = logits(tiny_gpt2, input_ids)
    lorakit.attach(tiny_gpt2, AdapterSpec(targets="all-linear"), seed=0)
    assert torch.equal(logits(tiny_gpt2, input_ids), base)


def adapter_tensors(model, name="default"):
    return {k: v.clone() for k, v in model.state_dict().items() if f".adapters.{name}." in k}


def test_seeded_attach_is_reproducible_and_leaves_global_rng_alone():
    from lorakit.models import tiny_llama

    a, b, c = (tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0) for _ in range(3))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    lorakit.attach(a, AdapterSpec(targets="all-linear"), seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)  # a different global state must not matter
    lorakit.attach(b, AdapterSpec(targets="all-linear"), seed=7)
    lorakit.attach(c, AdapterSpec(targets="all-linear"), seed=8)
    ta, tb, tc = adapter_tensors(a), adapter_tensors(b), adapter_tensors(c)
    assert len(ta) == 2 * 7 * 2
    assert ta.keys() == tb.keys() == tc.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not any(torch.equal(ta[k], tc[k]) for k in ta if k.endswith("lora_A"))


@pytest.mark.parametrize("axis,field", [("form", "form"), ("init", "init")])
def test_unknown_method_names_list_the_known_ones(tiny_llama, input_ids, axis, field):
    base = logits(tiny_llama, input_ids)
    with pytest.raises(lorakit.UnknownMethodError) as e:
        lorakit.attach(tiny_llama, AdapterSpec(**{field: "no-such-method"}))
    msg = str(e.value)
    assert "no-such-method" in msg
    known = [entry.name for entry in lorakit.methods(axis)]
    assert known and all(name in msg for name in known)
    assert isinstance(e.value, KeyError)  # UnknownMethodError is a KeyError
    assert lorakit.specs(tiny_llama) == {}
    assert not any(isinstance(m, AdaptedLayer) for m in tiny_llama.modules())
    assert torch.equal(logits(tiny_llama, input_ids), base)


def test_unknown_form_argument_is_named(tiny_llama):
    with pytest.raises(ValueError, match=r"rank") as e:
        lorakit.attach(tiny_llama, AdapterSpec(form_args={"rank": 4}))
    assert "'r'" in str(e.value)  # the known arguments are listed
    assert not any(isinstance(m, AdaptedLayer) for m in tiny_llama.modules())


def test_invalid_form_argument_value(tiny_llama):
    with pytest.raises(ValueError, match="r must be >= 1"):
        lorakit.attach(tiny_llama, AdapterSpec(form_args={"r": 0}))
    assert not any(isinstance(m, AdaptedLayer) for m in tiny_llama.modules())


def test_duplicate_adapter_name_is_refused(tiny_llama, input_ids):
    lorakit.attach(tiny_llama, AdapterSpec(form_args={"r": 2}), name="a", seed=0)
    before = adapter_tensors(tiny_llama, "a")
    with pytest.raises(ValueError, match="'a' already exists"):
        lorakit.attach(tiny_llama, AdapterSpec(targets=["o_proj"]), name="a")
    assert list(lorakit.specs(tiny_llama)) == ["a"]
    after = adapter_tensors(tiny_llama, "a")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not isinstance(tiny_llama.model.layers[0].self_attn.o_proj, AdaptedLayer)


def test_bad_adapter_name_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="letters, digits"):
        lorakit.attach(tiny_llama, AdapterSpec(), name="a.b")
    assert lorakit.specs(tiny_llama) == {}
    assert not any(isinstance(m, AdaptedLayer) for m in tiny_llama.modules())


def test_attach_activates_the_new_adapter(tiny_llama):
    lorakit.attach(tiny_llama, AdapterSpec(), name="a")
    assert lorakit.active_adapters(tiny_llama) == ("a",)
    lorakit.attach(tiny_llama, AdapterSpec(), name="b", activate=False)
    assert lorakit.active_adapters(tiny_llama) == ("a",)
    assert set(lorakit.specs(tiny_llama)) == {"a", "b"}
