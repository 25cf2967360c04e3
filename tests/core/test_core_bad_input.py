"""Bad adapter folders and foreign bases: clear errors naming the problem; the model is never touched."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterFileError, AdapterSpec, BaseMismatchError
from lorakit.core.layer import AdaptedLayer
from lorakit.io.peft import load_adapter_dirs
from lorakit.models import tiny_llama

try:  # tests/ may or may not be a package
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter

TENSORS = "adapter_model.safetensors"


def llama(**kw):
    args = dict(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)
    return tiny_llama(**{**args, **kw})


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def saved(tmp_path):
    """A valid adapter folder (lorakit.json + PEFT files) for the default tiny llama."""
    model = llama()
    lorakit.attach(model, AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 4, "alpha": 8}), seed=0)
    randomize_adapter(model)
    return lorakit.save(model, tmp_path / "adapter")


@pytest.fixture
def peft_only(saved):
    """The same folder as PEFT writes it (no lorakit.json)."""
    (saved / "lorakit.json").unlink()
    return saved


def assert_untouched(model, ids, before, names=()):
    assert set(lorakit.specs(model)) == set(names)
    if not names:
        assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert torch.equal(logits(model, ids), before)


def refuse(folder, ids, error, *, model=None, names=()):
    """Load ``folder`` expecting ``error``; check the model is unchanged; return the message."""
    model = model if model is not None else llama()
    before = logits(model, ids)
    keys = set(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error) as e:
            lorakit.load(model, folder, name="new")
    assert_untouched(model, ids, before, names)
    assert set(model.state_dict()) == keys
    return str(e.value)


@pytest.mark.parametrize("layout", ["lorakit", "peft"])
def test_truncated_tensor_file(saved, input_ids, layout):
    if layout == "peft":
        (saved / "lorakit.json").unlink()
    path = saved / TENSORS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = refuse(saved, input_ids, AdapterFileError)
    assert str(path) in msg
    if layout == "peft":
        assert "corrupt or truncated" in msg
    else:
        assert "checksum" in msg


@pytest.mark.parametrize("content", [
    bytes(range(256)) * 3,
    b"",
    b"\xff" * 16,
    b"\x40\x00\x00\x00\x00\x00\x00\x00" + b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
], ids=["bytes", "empty", "huge-header-size", "short-data"])
def test_garbage_tensor_file(peft_only, input_ids, content):
    (peft_only / TENSORS).write_bytes(content)
    msg = refuse(peft_only, input_ids, AdapterFileError)
    assert str(peft_only / TENSORS) in msg


def test_tensor_file_changed_after_save(saved, input_ids):
    tensors = load_file(str(saved / TENSORS))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 1.001  # still a perfectly valid safetensors file
    save_file(tensors, str(saved / TENSORS), metadata={"format": "pt"})
    msg = refuse(saved, input_ids, AdapterFileError)
    assert str(saved / TENSORS) in msg and "checksum" in msg and "lorakit.json" in msg


def test_lorakit_json_without_spec(saved, input_ids):
    info = json.loads((saved / "lorakit.json").read_text())
    del info["spec"]
    (saved / "lorakit.json").write_text(json.dumps(info))
    msg = refuse(saved, input_ids, AdapterFileError)
    assert str(saved / "lorakit.json") in msg and "'spec'" in msg


@pytest.mark.parametrize("field,value,words", [
    ("spec", {"form": "lora", "no_such_field": 1}, "no_such_field"),
    ("spec", "lora", "invalid spec"),
    ("format_version", 99, "newer"),
    ("format_version", "one", "format_version"),
])
def test_lorakit_json_bad_fields(saved, input_ids, field, value, words):
    info = json.loads((saved / "lorakit.json").read_text())
    info[field] = value
    (saved / "lorakit.json").write_text(json.dumps(info))
    msg = refuse(saved, input_ids, AdapterFileError)
    assert str(saved / "lorakit.json") in msg and words in msg


@pytest.mark.parametrize("name", ["lorakit.json", "adapter_config.json"])
@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe\x00garbage\x80"],
                         ids=["syntax", "not-an-object", "not-utf8"])
def test_invalid_json(saved, input_ids, name, content):
    if name == "adapter_config.json":
        (saved / "lorakit.json").unlink()
    (saved / name).write_bytes(content)
    msg = refuse(saved, input_ids, AdapterFileError)
    assert str(saved / name) in msg


def test_peft_config_without_required_fields(peft_only, input_ids):
    config = json.loads((peft_only / "adapter_config.json").read_text())
    for field in ("peft_type", "target_modules"):
        broken = {k: v for k, v in config.items() if k != field}
        (peft_only / "adapter_config.json").write_text(json.dumps(broken))
        msg = refuse(peft_only, input_ids, AdapterFileError)
        assert f"'{field}'" in msg and "adapter_config.json" in msg


def test_peft_type_not_supported(peft_only, input_ids):
    config = json.loads((peft_only / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (peft_only / "adapter_config.json").write_text(json.dumps(config))
    msg = refuse(peft_only, input_ids, AdapterFileError)
    assert "'IA3'" in msg and "LORA" in msg


def test_folder_without_adapter_files(tmp_path, input_ids):
    (tmp_path / "README.md").write_text("hello")
    msg = refuse(tmp_path, input_ids, AdapterFileError)
    assert str(tmp_path) in msg and "lorakit.json" in msg and "adapter_config.json" in msg
    msg = refuse(tmp_path / "missing", input_ids, AdapterFileError)
    assert "not found" in msg
    with pytest.raises(AdapterFileError, match="no adapter"):
        load_adapter_dirs(tmp_path)


def test_config_without_tensor_file(saved, input_ids):
    (saved / TENSORS).unlink()
    msg = refuse(saved, input_ids, AdapterFileError)
    assert TENSORS in msg and str(saved) in msg


def test_adapter_for_another_hidden_size(saved, input_ids):
    msg = refuse(saved, input_ids, BaseMismatchError, model=llama(hidden=48))
    assert "hidden_size" in msg and "32" in msg and "48" in msg and str(saved) in msg


def test_adapter_for_another_hidden_size_peft_layout(peft_only, input_ids):
    # without lorakit.json there is no fingerprint: the shapes are compared instead
    msg = refuse(peft_only, input_ids, BaseMismatchError, model=llama(hidden=48))
    assert "model.layers.0.self_attn.q_proj.lora_A" in msg and "(4, 32)" in msg and "(4, 48)" in msg


def test_missing_modules(saved, input_ids):
    msg = refuse(saved, input_ids, BaseMismatchError, model=llama(layers=1))
    assert "num_layers" in msg and "2" in msg and "1" in msg


def test_missing_modules_peft_layout(peft_only, input_ids):
    msg = refuse(peft_only, input_ids, BaseMismatchError, model=llama(layers=1))
    assert "not in the model" in msg and "model.layers.1.self_attn.q_proj" in msg


@pytest.mark.parametrize("layout", ["lorakit", "peft"])
def test_shape_mismatch_names_tensor_and_both_shapes(saved, input_ids, layout):
    if layout == "peft":
        (saved / "lorakit.json").unlink()
    # one KV head instead of two: v_proj is 32 -> 8 instead of 32 -> 16, everything else fits
    msg = refuse(saved, input_ids, BaseMismatchError, model=llama(kv_heads=1))
    assert "model.layers.0.self_attn.v_proj.lora_B" in msg
    assert "(16, 4)" in msg and "(8, 4)" in msg
    assert "q_proj" not in msg


def test_unexpected_and_missing_tensors(peft_only, input_ids):
    tensors = load_file(str(peft_only / TENSORS))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    del tensors[key]
    save_file(tensors, str(peft_only / TENSORS))
    msg = refuse(peft_only, input_ids, BaseMismatchError)
    assert "model.layers.0.self_attn.q_proj" in msg and "lora_B" in msg
    tensors["model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)  # no PEFT prefix
    save_file(tensors, str(peft_only / TENSORS))
    msg = refuse(peft_only, input_ids, AdapterFileError)
    assert "unexpected tensor key" in msg


def test_target_that_is_not_a_linear(peft_only, input_ids):
    tensors = load_file(str(peft_only / TENSORS))
    moved = "layers.0.self_attn.q_proj", "layers.0.input_layernorm"
    tensors = {k.replace(*moved): v for k, v in tensors.items()}
    save_file(tensors, str(peft_only / TENSORS))
    msg = refuse(peft_only, input_ids, BaseMismatchError)
    assert "model.layers.0.input_layernorm" in msg and "Linear" in msg


class _Payload:
    """Unpickling this runs code: it opens (creates) a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_legacy_bin_with_code_is_refused(peft_only, input_ids, tmp_path):
    tensors = load_file(str(peft_only / TENSORS))
    (peft_only / TENSORS).unlink()
    marker = tmp_path / "pwned"
    torch.save({**tensors, "evil": _Payload(marker)}, peft_only / "adapter_model.bin")
    msg = refuse(peft_only, input_ids, AdapterFileError)
    assert str(peft_only / "adapter_model.bin") in msg and "unsafe" in msg
    assert not marker.exists()  # the payload never ran


def test_legacy_bin_that_is_not_a_tensor_dict(peft_only, input_ids):
    (peft_only / TENSORS).unlink()
    torch.save([torch.zeros(2)], peft_only / "adapter_model.bin")
    msg = refuse(peft_only, input_ids, AdapterFileError)
    assert "adapter_model.bin" in msg and "mapping" in msg


@pytest.mark.parametrize("layout", ["lorakit", "peft"])
def test_legacy_tensor_dict_bin_loads(saved, input_ids, layout):
    ref = llama()
    lorakit.load(ref, saved)
    want = logits(ref, input_ids)
    tensors = load_file(str(saved / TENSORS))
    (saved / TENSORS).unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    if layout == "peft":
        (saved / "lorakit.json").unlink()
    model = llama()
    lorakit.load(model, saved)
    assert torch.equal(logits(model, input_ids), want)


def test_failed_load_next_to_an_existing_adapter(saved, input_ids):
    model = llama()
    lorakit.attach(model, AdapterSpec(targets=["o_proj", "q_proj"], form_args={"r": 2}), name="keep", seed=0)
    randomize_adapter(model, "keep", seed=7)
    (saved / "lorakit.json").unlink()
    tensors = load_file(str(saved / TENSORS))
    k = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[k] = torch.zeros(17, 4)  # the last module fails validation
    save_file(tensors, str(saved / TENSORS))
    msg = refuse(saved, input_ids, BaseMismatchError, model=model, names=("keep",))
    assert "(17, 4)" in msg
    assert lorakit.active_adapters(model) == ("keep",)
    assert list(model.model.layers[1].self_attn.q_proj.adapters) == ["keep"]
    assert not isinstance(model.model.layers[1].self_attn.v_proj, AdaptedLayer)


def test_load_under_an_existing_name_is_refused(saved, input_ids):
    model = llama()
    lorakit.attach(model, AdapterSpec(targets=["q_proj"], form_args={"r": 2}), name="new", seed=0)
    randomize_adapter(model, "new", seed=7)
    msg = refuse(saved, input_ids, ValueError, model=model, names=("new",))
    assert "'new' already exists" in msg
    assert not isinstance(model.model.layers[0].self_attn.v_proj, AdaptedLayer)
