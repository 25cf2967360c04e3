"""Adapters whose init rewrote the base (PiSSA, LoRA-GA, LDU) and data-driven EVA are served exactly.

The serving bank reads adapters through the one factor model (``core.factors``): relative to the
ORIGINAL base, an adapter trained on W_res = W − s·B0·A0 is [s·B, −s·B0]·[A; A0]. Served logits must
equal those of ``lorakit.load`` of the same folder on the same original base (regression: the bank
once ignored the initial tensors and was off by up to 0.37 in max logit).
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.models import tiny_llama
from lorakit.serving import AdapterBank
from lorakit.serving.engine import serve_model, unserve_model

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
IDS = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(0))
CALIBRATION = [torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(3)]


def _trained_adapter(tmp_path, init: str):
    base = tiny_llama(seed=0)
    model = lorakit.attach(copy.deepcopy(base), lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, init=init,
                                                                    targets=QKVO), batches=CALIBRATION, seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    for _ in range(3):  # move B (and A) away from their initial values
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lorakit.save(model, tmp_path / init)
    return base, model, tmp_path / init


@pytest.mark.parametrize("init", ["pissa", "lora_ga", "ldu", "eva"])
def test_served_equals_loaded(tmp_path, init):
    base, trained, folder = _trained_adapter(tmp_path, init)
    loaded = lorakit.load(copy.deepcopy(base), folder)
    with torch.no_grad():
        want = loaded(IDS).logits
        torch.testing.assert_close(want, trained(IDS).logits, rtol=0, atol=1e-4)  # load is exact
        served = copy.deepcopy(base)
        bank = AdapterBank.for_model(served, budget_bytes=1 << 22)
        bank.add(init, folder)
        ctx = serve_model(served, bank)
        slot = bank.acquire(init)
        ctx.set_rows(torch.full((IDS.shape[0],), slot), tokens_per_row=IDS.shape[1])
        got = served(IDS).logits
        base_rows = copy.deepcopy(base)(IDS).logits
    assert (want - base_rows).abs().max() > 1e-2  # the adapter changes the output: the check has teeth
    assert (got - want).abs().max() <= 1e-5
    unserve_model(served)


def test_mixed_batch_of_rewriting_and_plain_rows(tmp_path):
    base, _, pissa = _trained_adapter(tmp_path, "pissa")
    loaded = lorakit.load(copy.deepcopy(base), pissa)
    served = copy.deepcopy(base)
    bank = AdapterBank.for_model(served, budget_bytes=1 << 22)
    bank.add("pissa", pissa)
    ctx = serve_model(served, bank)
    slots = torch.tensor([bank.acquire("pissa"), -1, bank.acquire("pissa")])
    ctx.set_rows(slots, tokens_per_row=IDS.shape[1])
    with torch.no_grad():
        got = served(IDS).logits
        want = loaded(IDS).logits
        plain = copy.deepcopy(base)(IDS).logits
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], plain[1], rtol=0, atol=1e-5)
