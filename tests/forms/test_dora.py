"""DoRA: matches real PEFT DoRA (files both ways, logits and gradients); merged rows have norm m."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.models import tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _randomize(named_params, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(named_params, key=lambda kv: kv[0]):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_peft_dora_file_loads_as_dora_and_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS, lora_dropout=0.0))
    _randomize([(n, p) for n, p in theirs.named_parameters() if "lora_" in n])
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == 6  # PEFT's key, no ".weight"

    ours = lorakit.load(tiny_llama(seed=0), tmp_path)
    assert lorakit.extract_state(ours).spec.form == "dora"
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=1e-5)
    # and lorakit writes back PEFT's exact key set
    lorakit.save(ours, tmp_path / "back")
    assert set(load_file(str(tmp_path / "back" / "adapter_model.safetensors"))) == set(keys)


def test_lorakit_dora_file_matches_peft_and_plain_lora_stays_lora(tmp_path):
    peft = pytest.importorskip("peft")
    ours = tiny_llama(seed=0)
    lorakit.attach(ours, lorakit.AdapterSpec(form="dora", form_args={"r": 4, "alpha": 8, "dropout": 0.0},
                                             targets=TARGETS), seed=0)
    _randomize([(n, p) for n, p in ours.named_parameters() if p.requires_grad])
    lorakit.save(ours, tmp_path / "dora")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path / "dora")).eval()
    assert theirs.peft_config["default"].use_dora
    torch.testing.assert_close(_logits(theirs), _logits(ours), rtol=0, atol=1e-5)

    plain = tiny_llama(seed=0)
    lorakit.attach(plain, lorakit.AdapterSpec(form="lora", form_args={"r": 4}, targets=TARGETS), seed=0)
    lorakit.save(plain, tmp_path / "lora")
    peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path / "lora")).save_pretrained(tmp_path / "p")
    assert lorakit.extract_state(lorakit.load(tiny_llama(seed=0), tmp_path / "p")).spec.form == "lora"


def test_gradients_match_peft_with_detached_norm(tmp_path):
    peft = pytest.importorskip("peft")
    ours = tiny_llama(seed=0)
    lorakit.attach(ours, lorakit.AdapterSpec(form="dora", form_args={"r": 4, "alpha": 8, "dropout": 0.0},
                                             targets=TARGETS), seed=0)
    _randomize([(n, p) for n, p in ours.named_parameters() if p.requires_grad])
    lorakit.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path), is_trainable=True)
    for model in (ours, theirs):
        model.eval()
        model(IDS, labels=IDS).loss.backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for path, form in adapter_modules(ours, "default").items():
        prefix = f"base_model.model.{path}"
        for ours_name, peft_name in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight"),
                                     ("lora_magnitude_vector", "lora_magnitude_vector.default.weight")):
            torch.testing.assert_close(getattr(form, ours_name).grad, theirs_grads[f"{prefix}.{peft_name}"],
                                       rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("detach", [True, False])
def test_apply_matches_dense_definition_values_and_gradients(detach):
    """y = m ⊙ V/‖V‖_c · x with V = W + s·B·A, the norm detached (Sec. 4.3) or not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    lorakit.attach(model, lorakit.AdapterSpec(form="dora", targets=["0"], form_args={
        "r": 3, "alpha": 6, "dropout": 0.0, "detach_norm": detach}), seed=0)
    form = adapter_modules(model, "default")["0"]
    _randomize([(n, p) for n, p in form.named_parameters()])
    x = torch.randn(5, 12)
    model(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in form.named_parameters()}

    w, b0 = model[0].base_layer.weight.detach(), model[0].base_layer.bias.detach()
    a, b, m = (form.lora_A.detach().clone().requires_grad_(), form.lora_B.detach().clone().requires_grad_(),
               form.lora_magnitude_vector.detach().clone().requires_grad_())
    v = w + (b @ a) * 2.0
    norm = v.norm(dim=1).detach() if detach else v.norm(dim=1)
    y = x @ ((m / norm)[:, None] * v).T + b0
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    for name, ref in (("lora_A", a), ("lora_B", b), ("lora_magnitude_vector", m)):
        torch.testing.assert_close(got[name], ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_weight_row_norms_equal_magnitude_and_unmerge_restores(kind):
    model = tiny_llama(seed=0) if kind == "llama" else tiny_gpt2(seed=0)
    targets = TARGETS if kind == "llama" else ["c_attn", "c_fc"]
    lorakit.attach(model, lorakit.AdapterSpec(form="dora", form_args={"r": 4, "alpha": 8, "dropout": 0.0},
                                              targets=targets), seed=0)
    _randomize([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    forms = adapter_modules(model, "default")
    with torch.no_grad():
        for form in forms.values():
            form.lora_magnitude_vector.abs_()  # a row norm is |m|: keep m a magnitude
    before = {p: f.base_weight.detach().clone() for p, f in forms.items()}
    lorakit.merge(model)
    for path, form in forms.items():
        merged = form.base_weight  # (out, in) layout, also for Conv1D
        assert not torch.allclose(merged, before[path])
        m = form.lora_magnitude_vector.detach()
        torch.testing.assert_close(merged.norm(dim=1), m, rtol=1e-5, atol=1e-6)
    lorakit.unmerge(model)
    for path, form in forms.items():
        torch.testing.assert_close(form.base_weight, before[path], rtol=0, atol=1e-6)


def test_magnitude_starts_at_weight_norm_and_output_is_base():
    model = tiny_llama(seed=0)
    base = _logits(model)
    lorakit.attach(model, lorakit.AdapterSpec(form="dora", targets=TARGETS), seed=0)  # paper defaults
    for form in adapter_modules(model, "default").values():
        w_norm = form.base_weight.norm(dim=1)
        torch.testing.assert_close(form.lora_magnitude_vector, w_norm, rtol=1e-6, atol=0)
        assert torch.count_nonzero(form.lora_B) == 0
    model.eval()
    torch.testing.assert_close(_logits(model), base, rtol=0, atol=1e-6)
