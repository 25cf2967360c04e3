"""QLoRA interop: an adapter trained by lorakit on a 4-bit (nf4) base saves in PEFT format, loads in the
real ``peft`` over the same quantized base with equal logits, and comes back into lorakit equal too.

The reference is PEFT's own ``peft.tuners.lora.bnb.Linear4bit`` over bitsandbytes' ``Linear4bit``: two
quantizations of the same fp32 weights give the same bytes, so both libraries see the same base.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.core.quant import is_quantized, keep_training_layout
from lorakit.models.loading import quantize_model, tiny_llama
from lorakit.train.trainer import TrainConfig, Trainer

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
# bitsandbytes' CPU 4-bit kernels need in_features >= the 64-value quantization block
BASE = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


def qbase(quant: str = "nf4"):
    return quantize_model(copy.deepcopy(BASE), quant)


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _collate(items):
    return torch.stack(items)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _trained(quant: str, spec: lorakit.AdapterSpec):
    model = lorakit.attach(qbase(quant), spec, seed=0)
    data = [torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(i)) for i in range(16)]
    Trainer(model, data, _collate, _loss, TrainConfig(steps=4, batch_size=4, lr=5e-2, warmup_steps=0,
                                                      progress=False, eval_at_start=False)).train(resume=False)
    return model


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_qlora_adapter_loads_in_peft_and_back_with_equal_logits(quant, tmp_path):
    spec = lorakit.AdapterSpec(targets="all-linear", form_args={"r": 4, "alpha": 8})
    model = _trained(quant, spec)
    assert all(is_quantized(layer.base_layer) for _, layer in adapted_layers(model))
    moved = max(layer.adapters["default"].lora_B.abs().max().item() for _, layer in adapted_layers(model))
    assert moved > 1e-3  # the adapter trained on the quantized base (B starts at zero)
    ours = logits(model)
    with torch.no_grad():
        assert not torch.allclose(ours, logits(qbase(quant)), atol=1e-4)
    lorakit.save(model, tmp_path / "a", base_model_name="tiny")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(qbase(quant), str(tmp_path / "a"))
    wrapped = [m for m in ref.modules() if type(m).__module__ == "peft.tuners.lora.bnb"]
    assert len(wrapped) == 14  # PEFT's bnb LoRA layers wrap the same quantized linears
    for m in ref.modules():
        keep_training_layout(m)
    theirs = logits(ref)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    back = lorakit.load(qbase(quant), tmp_path / "a")
    torch.testing.assert_close(logits(back), ours, rtol=1e-6, atol=1e-6)
    ref.save_pretrained(tmp_path / "peft")  # PEFT's own file of the QLoRA adapter reads back too
    again = lorakit.load(qbase(quant), tmp_path / "peft")
    torch.testing.assert_close(logits(again), ours, rtol=1e-5, atol=1e-5)


def test_peft_trained_qlora_adapter_loads_into_lorakit(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    ref = get_peft_model(qbase(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    for m in ref.modules():
        keep_training_layout(m)
    theirs = logits(ref)
    ref.save_pretrained(tmp_path / "p")
    ours = lorakit.load(qbase(), tmp_path / "p")
    torch.testing.assert_close(logits(ours), theirs, rtol=1e-5, atol=1e-5)
