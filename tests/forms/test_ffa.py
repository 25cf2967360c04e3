"""FFA-LoRA: A stays at its seeded init, only B trains, and averaging B across clients is exact."""

from __future__ import annotations

import torch

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.models import tiny_llama


def _train_client(seed_data: int):
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form="ffa", form_args={"r": 4, "alpha": 8}), seed=123)
    a_before = {p: f.lora_A.detach().clone() for p, f in adapter_modules(model, "default").items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(seed_data))
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, a_before


def test_only_b_trains_and_a_is_shared_by_seed():
    m1, a1 = _train_client(1)
    m2, a2 = _train_client(2)
    forms1, forms2 = adapter_modules(m1, "default"), adapter_modules(m2, "default")
    for path, form in forms1.items():
        assert not form.lora_A.requires_grad and form.lora_B.requires_grad
        assert torch.equal(form.lora_A, a1[path]) and torch.equal(form.lora_A, a2[path])  # same seed, untouched
        assert form.lora_B.abs().sum() > 0
        # FedAvg of B is exact for FFA: mean(B_k)·A == mean(B_k·A)
        b_mean = (form.lora_B + forms2[path].lora_B) / 2
        exact = (form.delta_weight() + forms2[path].delta_weight()) / 2
        torch.testing.assert_close(b_mean @ form.lora_A * form.scaling, exact, rtol=1e-5, atol=1e-7)
    trainable = sum(p.numel() for p in m1.parameters() if p.requires_grad)
    assert trainable == sum(f.out_features * 4 for f in forms1.values())  # m·r per layer
