"""AdapterState save/load: exact round trips, the files written, atomic and interrupted saves."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import AdapterSpec
from lorakit.core import state as state_mod
from lorakit.io import peft as peft_io
from lorakit.models import tiny_gpt2, tiny_llama

try:  # tests/ may or may not be a package
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter

FILES = ["adapter_config.json", "adapter_model.safetensors", "lorakit.json"]


def llama():
    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


def gpt2():
    return tiny_gpt2(hidden=32, layers=2, heads=4, vocab=128, seed=0)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def adapted(make, spec, seed=1, name="default"):
    model = make()
    lorakit.attach(model, spec, name=name, seed=0)
    randomize_adapter(model, name, seed=seed)
    return model


CASES = [
    (llama, AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 4, "alpha": 8})),
    (llama, AdapterSpec(targets="all-linear", exclude=["o_proj"],
                        form_args={"r": 3, "alpha": 5, "rslora": True, "bias": True},
                        module_args={"q_proj": {"r": 2},
                                     r"layers\.1\.mlp\.down_proj": {"r": 6, "alpha": 1.5}})),
    (gpt2, AdapterSpec(targets=["c_attn", "c_proj"], form_args={"r": 4, "alpha": 8, "bias": True})),
    (gpt2, AdapterSpec(targets=r"transformer\.h\.1\..*", form_args={"r": 2})),
]


@pytest.mark.parametrize("make,spec", CASES)
def test_exact_round_trip(tmp_path, input_ids, make, spec):
    model = adapted(make, spec)
    state = lorakit.extract_state(model)
    out = lorakit.save(model, tmp_path / "ad")
    assert sorted(p.name for p in out.iterdir()) == FILES
    # the tensor file holds exactly the model's adapter tensors, under PEFT's keys
    raw = load_file(str(out / "adapter_model.safetensors"))
    params = {n: p for n, p in model.named_parameters() if ".adapters.default." in n}
    assert len(raw) == len(params) == len(state.tensors)
    for n, p in params.items():
        path, _, tname = n.partition(".adapters.default.")
        key = "base_model.model." + path + {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight",
                                            "lora_bias": ".lora_B.bias"}[tname]
        assert torch.equal(raw[key], p.detach()), key
    back = lorakit.load_state(out)
    assert back.spec == spec
    assert back.tensors.keys() == state.tensors.keys()
    assert all(torch.equal(back.tensors[k], state.tensors[k]) for k in state.tensors)
    assert back.base == json.loads(json.dumps(state.base))
    info = json.loads((out / "lorakit.json").read_text())
    assert info["format_version"] == 1 and info["spec"] == spec.to_dict()
    # onto a fresh base: identical adapter tensors and identical logits
    fresh = make()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*weights differ")  # same base: no such warning
        lorakit.load(fresh, out)
    assert lorakit.specs(fresh)["default"] == spec
    again = lorakit.extract_state(fresh)
    assert all(torch.equal(again.tensors[k], state.tensors[k]) for k in state.tensors)
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))


def test_load_under_another_name_and_inactive(tmp_path, input_ids):
    model = adapted(llama, CASES[0][1])
    lorakit.save(model, tmp_path)
    fresh = llama()
    base = logits(fresh, input_ids)
    lorakit.load(fresh, tmp_path, name="mine", activate=False)
    assert list(lorakit.specs(fresh)) == ["mine"] and lorakit.active_adapters(fresh) == ()
    assert torch.equal(logits(fresh, input_ids), base)
    # an inference load: nothing new requires grad
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".adapters." in n)
    lorakit.set_active(fresh, "mine")
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))
    other = llama()
    lorakit.load(other, tmp_path, trainable=True)
    trainable = [n for n, p in other.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in trainable)


def test_save_of_a_merged_model_keeps_the_base_fingerprint(tmp_path, input_ids):
    model = adapted(llama, CASES[1][1])
    ref = logits(model, input_ids)
    lorakit.save(model, tmp_path / "unmerged")
    lorakit.merge(model)
    lorakit.save(model, tmp_path / "merged")
    a = json.loads((tmp_path / "unmerged" / "lorakit.json").read_text())
    b = json.loads((tmp_path / "merged" / "lorakit.json").read_text())
    assert a["base"] == b["base"] and a["tensors_sha256"] == b["tensors_sha256"]
    fresh = llama()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*weights differ")
        lorakit.load(fresh, tmp_path / "merged")
    torch.testing.assert_close(logits(fresh, input_ids), ref, rtol=0, atol=1e-5)


def test_save_overwrites_and_leaves_no_temp_files(tmp_path, input_ids):
    first = adapted(llama, CASES[0][1], seed=1)
    second = adapted(llama, CASES[0][1], seed=2)
    lorakit.save(first, tmp_path)
    lorakit.save(second, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES  # no .tmp leftovers
    fresh = llama()
    lorakit.load(fresh, tmp_path)
    assert torch.equal(logits(fresh, input_ids), logits(second, input_ids))


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _partial_then_fail(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\x00" * 64)  # half a file
    raise OSError("disk full")


def _fail(*args, **kwargs):
    raise OSError("boom")


@pytest.mark.parametrize("failure", ["save_file", "peft_config", "checksum"])
def test_failed_save_leaves_the_previous_adapter_intact(tmp_path, input_ids, monkeypatch, failure):
    first = adapted(llama, CASES[0][1], seed=1)
    lorakit.save(first, tmp_path)
    before = snapshot(tmp_path)
    second = adapted(llama, CASES[0][1], seed=2)
    if failure == "save_file":  # the tensor file is half written, then the disk is full
        monkeypatch.setattr(state_mod, "save_file", _partial_then_fail)
    elif failure == "peft_config":  # building adapter_config.json fails
        monkeypatch.setattr(peft_io, "peft_config", _fail)
    else:  # hashing the new tensor file for lorakit.json fails
        monkeypatch.setattr(state_mod, "_sha256", _fail)
    with pytest.raises(OSError, match="boom|disk full"):
        lorakit.save(second, tmp_path)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # same files, same bytes, no temp files
    fresh = llama()
    lorakit.load(fresh, tmp_path)
    assert torch.equal(logits(fresh, input_ids), logits(first, input_ids))


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(state_mod, "save_file", _partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save(adapted(llama, CASES[0][1]), tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []


def test_adapter_state_helpers():
    model = adapted(llama, CASES[1][1])
    state = lorakit.extract_state(model)
    assert state.modules == sorted(lorakit.find_targets(llama(), CASES[1][1]))
    assert state.num_params() == sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n)
    by_module = state.by_module()
    q = by_module["model.layers.0.self_attn.q_proj"]
    assert set(q) == {"lora_A", "lora_B", "lora_bias"} and tuple(q["lora_A"].shape) == (2, 32)
    assert tuple(by_module["model.layers.1.mlp.down_proj"]["lora_B"].shape) == (32, 6)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.tensors.values())
