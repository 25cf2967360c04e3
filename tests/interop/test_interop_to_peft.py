"""lorakit -> PEFT: folders written by ``lorakit.save`` load in the real ``peft`` with the same logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit import AdapterSpec
from lorakit.core.inject import adapter_modules
from lorakit.models import tiny_gpt2, tiny_llama

try:  # tests/ may or may not be a package
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter


def llama():
    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


def gpt2():
    return tiny_gpt2(hidden=32, layers=2, heads=4, vocab=128, seed=0)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def peft_logits(make, folder, ids):
    """The oracle: PEFT loads the folder onto a fresh base built with the same seed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "lora_bias on a layer without bias"
        model = PeftModel.from_pretrained(make(), str(folder))
    model.eval()
    return logits(model, ids), model


CASES = {
    "llama-qv": (llama, AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 4, "alpha": 8})),
    "llama-all-linear": (llama, AdapterSpec(targets="all-linear", form_args={"r": 3, "alpha": 6})),
    "llama-rslora": (llama, AdapterSpec(targets=["q_proj", "v_proj", "down_proj"],
                                        form_args={"r": 9, "alpha": 6, "rslora": True})),
    "llama-lora-bias": (llama, AdapterSpec(targets=["q_proj", "v_proj", "o_proj"],
                                           form_args={"r": 4, "alpha": 8, "bias": True})),
    "llama-module-args": (llama, AdapterSpec(
        targets=["q_proj", "v_proj", "o_proj", "up_proj"], form_args={"r": 4, "alpha": 8},
        module_args={"v_proj": {"r": 2, "alpha": 3}, r"layers\.1\.self_attn\.o_proj": {"r": 6},
                     "up_proj": {"alpha": 20}})),
    "llama-regex": (llama, AdapterSpec(targets=r"model\.layers\.0\.(self_attn\.(q|k)_proj|mlp\.gate_proj)",
                                       form_args={"r": 2, "alpha": 4})),
    "llama-exclude": (llama, AdapterSpec(targets="all-linear", exclude=["o_proj", "layers.1.mlp.up_proj"],
                                         form_args={"r": 2, "alpha": 2})),
    "gpt2-c_attn": (gpt2, AdapterSpec(targets=["c_attn"], form_args={"r": 4, "alpha": 8})),
    "gpt2-all-linear-bias": (gpt2, AdapterSpec(targets="all-linear",
                                               form_args={"r": 2, "alpha": 4, "bias": True, "rslora": True})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_lorakit_adapter(tmp_path, input_ids, case):
    make, spec = CASES[case]
    model = make()
    base = logits(model, input_ids)
    lorakit.attach(model, spec, seed=0)
    randomize_adapter(model, seed=3)
    ours = logits(model, input_ids)
    assert (ours - base).abs().max() > 0.05  # the adapter matters
    lorakit.save(model, tmp_path)
    theirs, peft_model = peft_logits(make, tmp_path, input_ids)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # PEFT adapted exactly the modules lorakit adapted, with the same ranks
    ours_modules = {p: f.lora_A.shape[0] for p, f in adapter_modules(model, "default").items()}
    theirs_modules = {n.removeprefix("base_model.model."): m.r["default"]
                      for n, m in peft_model.named_modules()
                      if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert theirs_modules == ours_modules


def test_module_args_become_rank_and_alpha_patterns(tmp_path):
    make, spec = CASES["llama-module-args"]
    model = make()
    lorakit.attach(model, spec, seed=0)
    lorakit.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {"v_proj": 2, r"layers\.1\.self_attn\.o_proj": 6}
    assert config["alpha_pattern"] == {"v_proj": 3, "up_proj": 20}
    assert sorted(config["target_modules"]) == ["o_proj", "q_proj", "up_proj", "v_proj"]


def test_overlapping_module_args_keep_lorakit_meaning_in_peft(tmp_path, input_ids):
    """lorakit applies every matching pattern in order (the last wins); PEFT takes the first match.
    The export must make PEFT build exactly what lorakit built."""
    spec = AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 4, "alpha": 8},
                       module_args={r"layers\.0\.self_attn\.v_proj": {"alpha": 32, "r": 6},
                                    "v_proj": {"alpha": 2}})
    model = llama()
    lorakit.attach(model, spec, seed=0)
    randomize_adapter(model, seed=3)
    forms = adapter_modules(model, "default")
    assert forms["model.layers.0.self_attn.v_proj"].args.alpha == 2  # the later pattern won
    assert forms["model.layers.0.self_attn.v_proj"].args.r == 6
    lorakit.save(model, tmp_path)
    theirs, _ = peft_logits(llama, tmp_path, input_ids)
    torch.testing.assert_close(theirs, logits(model, input_ids), rtol=0, atol=1e-5)


def test_gpt2_config_says_fan_in_fan_out(tmp_path):
    model = gpt2()
    lorakit.attach(model, AdapterSpec(targets=["c_attn"]), seed=0)
    lorakit.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn"]


def test_merged_model_exports_the_same_adapter(tmp_path, input_ids):
    make, spec = CASES["llama-lora-bias"]
    model = make()
    lorakit.attach(model, spec, seed=0)
    randomize_adapter(model, seed=3)
    ours = logits(model, input_ids)
    lorakit.merge(model)
    lorakit.save(model, tmp_path)
    theirs, _ = peft_logits(make, tmp_path, input_ids)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_second_adapter_exported_by_name(tmp_path, input_ids):
    model = llama()
    lorakit.attach(model, CASES["llama-qv"][1], name="first", seed=0)
    randomize_adapter(model, "first", seed=1)
    lorakit.attach(model, CASES["llama-rslora"][1], name="second", seed=0)
    randomize_adapter(model, "second", seed=2)
    lorakit.save(model, tmp_path / "second", name="second")
    ours = logits(model, input_ids)  # "second" is active
    theirs, _ = peft_logits(llama, tmp_path / "second", input_ids)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
