"""Adapters PEFT's config cannot describe are saved for lorakit only, with a warning, never wrongly."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import randomize_adapter
from lorakit.models import tiny_llama


def test_per_module_rslora_is_not_written_as_a_wrong_peft_config(tmp_path):
    spec = lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, module_args={"v_proj": {"rslora": True}})
    model = lorakit.attach(tiny_llama(seed=0), spec)
    randomize_adapter(model)
    with pytest.warns(UserWarning, match="rslora"):
        lorakit.save(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    ids = torch.randint(3, 128, (2, 7))
    again = lorakit.load(tiny_llama(seed=0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
