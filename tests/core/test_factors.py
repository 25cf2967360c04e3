"""The one factor model (core/factors.py): exact scale-folded factors relative to the ORIGINAL base,
the SVD fallback with its reported error, the plain-LoRA writer, and named refusals. References are
dense recomputations from the installed model."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.api import extract_state
from lorakit.core.factors import FactorError, form_factors, lora_state, state_factors, svd_factors
from lorakit.core.inject import adapter_modules
from lorakit.models import tiny_llama

try:
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("form_args", [{"r": 4, "alpha": 8}, {"r": 3, "alpha": 5, "rslora": True, "bias": True}])
def test_factored_forms_are_read_exactly_from_state_and_model(form_args):
    model = lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(form_args=form_args, targets=TARGETS), seed=0)
    randomize_adapter(model, seed=3, std=0.3)
    from_state = state_factors(extract_state(model))
    for path, form in adapter_modules(model, "default").items():
        live = form_factors(form)
        assert live.error == 0.0
        torch.testing.assert_close(live.delta(), form.delta_weight().detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(from_state[path].delta(), form.delta_weight().detach(), rtol=1e-5, atol=1e-6)
        if form.delta_bias() is not None:
            torch.testing.assert_close(from_state[path].bias, form.delta_bias().detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "ldu"])
def test_base_rewriting_inits_are_read_relative_to_the_original_base(init):
    base = tiny_llama(seed=0)
    original = _weights(base)
    model = lorakit.attach(copy.deepcopy(base), lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, init=init,
                                                                    targets=TARGETS), seed=0)
    randomize_adapter(model, seed=4, std=0.3)
    state = extract_state(model)
    lorakit.merge(model)  # the effective weight W_res + ΔW; relative to the original W it is ΔW − ΔW0
    merged = _weights(model)
    for path, f in state_factors(state).items():
        key = [k for k in merged if k.startswith(path + ".") and k.endswith("weight")][0]
        want = merged[key] - original[path + ".weight"]
        assert f.rank == 8  # [s·B, −s·B0]·[A; A0]
        torch.testing.assert_close(f.delta(), want, rtol=1e-4, atol=1e-5)


def test_non_factored_forms_need_the_base_and_report_the_svd_error():
    base = tiny_llama(seed=0)
    model = lorakit.attach(copy.deepcopy(base), lorakit.AdapterSpec(form="dora", form_args={"r": 4, "alpha": 8},
                                                                    targets=TARGETS), seed=0)
    randomize_adapter(model, seed=5, std=0.3)
    state = extract_state(model)
    with pytest.raises(FactorError, match="base layers"):
        state_factors(state)
    layers = {p: base.get_submodule(p) for p in state.modules}
    full = state_factors(state, layers, rank=64)  # full rank: exact
    low = state_factors(state, layers, rank=1)
    for path, form in adapter_modules(model, "default").items():
        dense = form.delta_weight().detach()
        torch.testing.assert_close(full[path].delta(), dense, rtol=1e-4, atol=1e-5)
        assert full[path].error < 1e-5
        err = float((dense - low[path].delta()).norm() / dense.norm())
        assert low[path].error == pytest.approx(err, rel=1e-4) and err > 1e-3


def test_svd_factors_are_eckart_young_optimal():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 9, generator=g)
    f = svd_factors(delta, 3)
    s = torch.linalg.svdvals(delta)
    assert f.error == pytest.approx(float(s[3:].square().sum().sqrt() / s.square().sum().sqrt()), rel=1e-5)
    assert svd_factors(delta, 20).rank == 20 and svd_factors(delta, 20).error < 1e-5  # zero-padded, exact


def test_lora_state_writes_a_plain_lora_that_loads_with_the_same_update(tmp_path):
    model = lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, targets=TARGETS,
                                                                   module_args={"down_proj": {"r": 2, "alpha": 3}}),
                           seed=0)
    randomize_adapter(model, seed=6, std=0.3)
    factors = state_factors(extract_state(model))
    out = lora_state(factors)
    assert out.spec.form == "lora" and out.spec.form_args["r"] == 4  # most common rank; down_proj per module
    lorakit.save_state(out, tmp_path / "plain")
    loaded = lorakit.load(tiny_llama(seed=0), tmp_path / "plain")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_input_dependent_and_embedding_adapters_are_refused_by_name():
    routed = lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(form="flylora", form_args={"r": 4, "k": 2},
                                                                    targets=["q_proj"]), seed=0)
    with pytest.raises(FactorError, match="depends on the input"):
        state_factors(extract_state(routed))
    emb = lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(form_args={"r": 2, "alpha": 4},
                                                                 targets=["embed_tokens"]), seed=0)
    with pytest.raises(FactorError, match="embedding layer"):
        state_factors(extract_state(emb))
    with pytest.raises(FactorError, match="embedding layer"):
        form_factors(next(iter(adapter_modules(emb, "default").values())))
