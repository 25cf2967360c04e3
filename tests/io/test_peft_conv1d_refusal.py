"""Forms whose PEFT tuner wraps only nn.Linear (``peft_conv1d = False``: MiSS/Bone, SHiRA in PEFT 0.21.2)
run on GPT-2 Conv1D layers in lorakit, but their PEFT export is refused with PeftIncompatibleError (and
real PEFT indeed refuses such targets); lorakit's own files still round-trip."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.api import extract_state
from lorakit.core import registry
from lorakit.io.peft import PeftIncompatibleError, peft_config
from lorakit.models import tiny_gpt2

CASES = [("bone", {"r": 8}), ("miss", {"r": 8}), ("shira", {"r": 2})]


@pytest.mark.parametrize("form,args", CASES)
def test_peft_export_on_conv1d_is_refused_and_lorakit_files_load(form, args, tmp_path):
    assert not registry.get("form", form).peft_conv1d
    model = tiny_gpt2(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form=form, form_args=args, targets=["c_attn"]), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    with pytest.raises(PeftIncompatibleError, match="wraps only torch.nn.Linear"):
        peft_config(extract_state(model))
    with pytest.warns(UserWarning, match="only lorakit can load"):
        lorakit.save(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lorakit.load(tiny_gpt2(seed=0), tmp_path)(ids).logits, model(ids).logits)


@pytest.mark.parametrize("config", ["MissConfig", "ShiraConfig"])
def test_real_peft_refuses_conv1d_targets(config):
    peft = pytest.importorskip("peft")
    cfg = getattr(peft, config)(r=2, target_modules=["c_attn"])
    with pytest.raises((TypeError, ValueError), match="torch.nn.Linear"):
        peft.get_peft_model(tiny_gpt2(seed=0), cfg)


def test_linear_targets_still_export():
    from lorakit.models import tiny_llama

    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form="shira", form_args={"r": 2}, targets=["q_proj"]), seed=0)
    assert peft_config(extract_state(model))["peft_type"] == "SHIRA"
