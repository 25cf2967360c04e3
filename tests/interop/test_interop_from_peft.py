"""PEFT -> lorakit: folders written by the real ``peft`` load in lorakit with the same logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lorakit
from lorakit import AdapterFileError
from lorakit.core import registry
from lorakit.core.inject import adapter_modules
from lorakit.core.layer import AdaptedLayer
from lorakit.io.peft import load_adapter_dirs
from lorakit.models import tiny_gpt2, tiny_llama


def llama():
    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


def gpt2():
    return tiny_gpt2(hidden=32, layers=2, heads=4, vocab=128, seed=0)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def peft_model(make, seed=0, **config):
    """A PEFT LoRA with random non-zero B (init_lora_weights=False), seeded."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(make(), LoraConfig(init_lora_weights=False, **config))
    return model.eval()


def save_peft(model, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT mistakes 1-D lora_B.bias for an unsharded FSDP tensor
        model.save_pretrained(str(folder))


CASES = {
    "default": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "rslora": (llama, dict(r=9, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj"],
                           use_rslora=True)),
    "patterns": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                             alpha_pattern={"q_proj": 3, r"^model\.layers\.0\.self_attn\.v_proj": 5})),
    # PEFT takes the first matching pattern: layer 0's v_proj gets alpha 32, the other v_proj 2
    "overlapping-patterns": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         rank_pattern={r"layers\.1\.self_attn\.v_proj": 6, "v_proj": 2},
                                         alpha_pattern={r"layers\.0\.self_attn\.v_proj": 32, "v_proj": 2})),
    "regex-targets": (llama, dict(r=4, lora_alpha=8, target_modules=r".*\.(self_attn\.q_proj|mlp\.up_proj)")),
    "all-linear": (llama, dict(r=2, lora_alpha=4, target_modules="all-linear")),
    "lora-bias": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True)),
    "layers-to-transform": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        layers_to_transform=[1])),
    "gpt2-c_attn": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)),
    "gpt2-conv1d-all": (gpt2, dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                   fan_in_fan_out=True, use_rslora=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_loads_peft_adapter(tmp_path, input_ids, case):
    make, config = CASES[case]
    oracle = peft_model(make, **config)
    theirs = logits(oracle, input_ids)
    assert (theirs - logits(make(), input_ids)).abs().max() > 0.05  # the adapter matters
    save_peft(oracle, tmp_path)
    assert not (tmp_path / "lorakit.json").exists()
    model = make()
    lorakit.load(model, tmp_path)
    torch.testing.assert_close(logits(model, input_ids), theirs, rtol=0, atol=1e-5)
    # the same modules with the same ranks and scales as PEFT built
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in oracle.named_modules()
                   if hasattr(m, "lora_A") and "default" in m.lora_A}
    ours = adapter_modules(model, "default")
    assert set(ours) == set(peft_layers)
    for path, form in ours.items():
        assert form.lora_A.shape[0] == peft_layers[path].r["default"], path
        assert form.scaling == pytest.approx(peft_layers[path].scaling["default"], rel=1e-12), path
    # and lorakit writes it back out so that lorakit and PEFT both still agree
    lorakit.save(model, tmp_path / "again")
    model2 = make()
    lorakit.load(model2, tmp_path / "again")
    torch.testing.assert_close(logits(model2, input_ids), theirs, rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(make(), str(tmp_path / "again")).eval()
    torch.testing.assert_close(logits(reloaded, input_ids), theirs, rtol=0, atol=1e-5)


def test_several_adapters_in_subfolders(tmp_path, input_ids):
    oracle = peft_model(llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"],
                                                use_rslora=True, init_lora_weights=False))
    save_peft(oracle, tmp_path)
    assert (tmp_path / "second" / "adapter_config.json").exists()
    want = {}
    for name in ("default", "second"):
        oracle.set_adapter(name)
        want[name] = logits(oracle, input_ids)
    assert (want["default"] - want["second"]).abs().max() > 0.05

    states = load_adapter_dirs(tmp_path)
    assert sorted(states) == ["default", "second"]
    model = llama()
    for name, state in states.items():
        lorakit.apply_state(model, state, name)
    assert set(lorakit.specs(model)) == {"default", "second"}
    for name in ("default", "second"):
        lorakit.set_active(model, name)
        torch.testing.assert_close(logits(model, input_ids), want[name], rtol=0, atol=1e-5)
    # the second adapter alone, straight from its subfolder
    alone = llama()
    lorakit.load(alone, tmp_path / "second", name="second")
    torch.testing.assert_close(logits(alone, input_ids), want["second"], rtol=0, atol=1e-5)


def test_dora_adapter_is_not_read_as_plain_lora(tmp_path, input_ids):
    oracle = peft_model(llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    theirs = logits(oracle, input_ids)
    save_peft(oracle, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    model = llama()
    base = logits(model, input_ids)
    try:
        lorakit.load(model, tmp_path)
    except AdapterFileError as e:  # refused: say why, and name the file
        msg = str(e)
        assert "DoRA" in msg and "use_dora" in msg
        assert str(tmp_path / "adapter_config.json") in msg
        assert lorakit.specs(model) == {}
        assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
        assert torch.equal(logits(model, input_ids), base)
    else:  # a DoRA form read it: then it must be exactly PEFT's DoRA, never plain LoRA
        torch.testing.assert_close(logits(model, input_ids), theirs, rtol=0, atol=1e-5)


def test_dora_adapter_is_refused_when_no_form_reads_it(tmp_path, input_ids, monkeypatch):
    """Without a form that accepts ``use_dora`` (as before DoRA existed), the load is refused, naming
    DoRA; it must never fall back to reading the file as plain LoRA (the magnitudes would be dropped)."""
    oracle = peft_model(llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    save_peft(oracle, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    kept = [e for e in registry.entries() if e.axis != "form"
            or not registry.get("form", e.name).peft_accepts(config)]
    monkeypatch.setattr(registry, "entries", lambda axis=None: [e for e in kept if axis in (None, e.axis)])
    assert "lora" in [e.name for e in registry.entries("form")]
    model = llama()
    base = logits(model, input_ids)
    with pytest.raises(AdapterFileError) as e:
        lorakit.load(model, tmp_path)
    msg = str(e.value)
    assert "DoRA" in msg and "use_dora" in msg and str(tmp_path / "adapter_config.json") in msg
    assert lorakit.specs(model) == {}
    assert torch.equal(logits(model, input_ids), base)


def test_peft_trainable_base_bias_is_refused(tmp_path, input_ids):
    oracle = peft_model(llama, r=4, lora_alpha=8, target_modules=["q_proj"])
    save_peft(oracle, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["bias"] = "all"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="bias='all'"):
        lorakit.load(llama(), tmp_path)
