"""SVD export of any mergeable adapter to plain PEFT LoRA: exact at full rank, Eckart–Young error below."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import randomize_adapter
from lorakit.core.caps import Cap
from lorakit.core.inject import adapter_modules
from lorakit.forms.lora import LoRA
from lorakit.io.export import export_lora
from lorakit.models import tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _adapted(r=6):
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": r, "alpha": 12}), seed=0)
    randomize_adapter(model)
    return model


def test_full_rank_export_is_exact_and_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = _adapted()
    state, report = export_lora(model, rank=6)
    assert report.relative_error < 1e-5
    lorakit.save_state(state, tmp_path)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path)).eval()(IDS).logits
        ours = model(IDS).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_truncated_export_error_matches_discarded_singular_values():
    model = _adapted()
    _, report = export_lora(model, rank=2)
    num = den = 0.0
    for path, form in adapter_modules(model, "default").items():
        s = torch.linalg.svdvals(form.delta_weight().detach())
        expected = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
        assert report.per_module[path] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        num, den = num + float(s[2:].square().sum()), den + float(s.square().sum())
    assert report.relative_error == pytest.approx((num / den) ** 0.5, rel=1e-4)


def test_input_dependent_forms_are_refused(monkeypatch):
    model = _adapted()
    monkeypatch.setattr(LoRA, "caps", Cap.FACTORED_AB)
    with pytest.raises(ValueError, match="depends on the input"):
        export_lora(model, rank=2)
