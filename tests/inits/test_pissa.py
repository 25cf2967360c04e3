"""PiSSA: principal components in the adapter, residual base, output unchanged; matches real peft PiSSA;
saved adapters load on the ORIGINAL base (lorakit and real peft) and reproduce the trained model."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.models import tiny_gpt2, tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
SPEC = lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, init="pissa", targets=["q_proj", "v_proj", "down_proj"])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _train(model, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_principal_part_in_adapter_and_output_unchanged():
    model = tiny_llama(seed=0)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = _logits(model)
    lorakit.attach(model, SPEC)
    torch.testing.assert_close(_logits(model), base, rtol=1e-4, atol=1e-5)
    for path, form in adapter_modules(model, "default").items():
        w = original[path + ".weight"]
        u, s, vh = torch.linalg.svd(w)
        torch.testing.assert_close(form.delta_weight(), (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5)
        residual = model.get_submodule(path).base_layer.weight
        torch.testing.assert_close(residual, w - form.delta_weight(), rtol=1e-5, atol=1e-6)


def test_matches_real_peft_pissa():
    peft = pytest.importorskip("peft")
    ours = lorakit.attach(tiny_llama(seed=0), SPEC)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights="pissa")
    theirs = peft.get_peft_model(tiny_llama(seed=0), config)
    for path, form in adapter_modules(ours, "default").items():
        layer = theirs.base_model.model.get_submodule(path)
        # singular vectors are defined up to sign: compare the products
        torch.testing.assert_close(form.delta_weight(), layer.get_delta_weight("default"), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.get_submodule(path).base_layer.weight, layer.base_layer.weight,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make,targets", [(tiny_llama, ["q_proj", "v_proj", "down_proj"]), (tiny_gpt2, ["c_attn"])])
def test_trained_adapter_loads_on_the_original_base(tmp_path, make, targets):
    peft = pytest.importorskip("peft")
    spec = lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, init="pissa", targets=targets)
    model = lorakit.attach(make(seed=0), spec)
    _train(model)
    trained = _logits(model)
    lorakit.save(model, tmp_path)
    # lorakit: load onto a fresh ORIGINAL base; the rewrite is redone, the adapter continues exactly
    again = lorakit.load(make(seed=0), tmp_path, trainable=True)
    torch.testing.assert_close(_logits(again), trained, rtol=1e-4, atol=1e-5)
    # real peft: the PEFT files are the rank-2r conversion for the original base
    theirs = peft.PeftModel.from_pretrained(make(seed=0), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), trained, rtol=1e-4, atol=1e-5)
    state = lorakit.load_state(tmp_path)
    assert state.initial and state.spec.init == "pissa"
