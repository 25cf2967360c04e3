"""LDU init: P·L·D·U reconstructs W (dense); s·B0·A0 is the truncated LDU and the base holds the residual
(output unchanged at init); a trained adapter loads in real peft on the ORIGINAL base; the capability
check refuses incompatible form/init pairs with a clear message."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.core.spec import validate_spec
from lorakit.forms.loldu import ldu
from lorakit.models import tiny_gpt2, tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _dense_ldu(w):
    """P, L, D, U as dense matrices, from torch.linalg.lu (independent of lorakit's pivot handling)."""
    p, lower, upper = torch.linalg.lu(w)
    d = torch.diagonal(upper)
    return p, lower, d, upper / d[:, None]


@pytest.mark.parametrize("shape", [(32, 32), (16, 32), (48, 24)])
def test_ldu_reconstructs_w_and_matches_dense_lu(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    pi, lower, d, upper = ldu(w)
    perm = torch.eye(shape[0])[pi]  # P with P·X = X[π]
    torch.testing.assert_close(perm @ lower @ torch.diag(d) @ upper, w, rtol=1e-4, atol=1e-5)
    p, lo, dd, up = _dense_ldu(w)
    torch.testing.assert_close(perm, p)
    torch.testing.assert_close(d, dd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fold_scale", [True, False])
def test_truncated_ldu_in_adapter_and_output_unchanged(fold_scale):
    r, alpha = 4, 8.0
    spec = lorakit.AdapterSpec(form_args={"r": r, "alpha": alpha}, init="ldu",
                               init_args={"fold_scale": fold_scale}, targets=TARGETS)
    model = tiny_llama(seed=0)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = _logits(model)
    lorakit.attach(model, spec)
    torch.testing.assert_close(_logits(model), base, rtol=1e-4, atol=1e-5)
    for path, form in adapter_modules(model, "default").items():
        w = original[path + ".weight"]
        p, lower, d, upper = _dense_ldu(w)
        part = p @ lower[:, :r] @ torch.diag(d[:r]) @ upper[:r]
        expected = part if fold_scale else (alpha / r) * part
        torch.testing.assert_close(form.delta_weight(), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.get_submodule(path).base_layer.weight, w - expected, rtol=1e-5, atol=1e-5)
        # B0 = P L_r |D_r|^{1/2}/√s, A0 = sign(D_r)|D_r|^{1/2} U_r/√s (fold_scale)
        if fold_scale:
            root = d[:r].abs().sqrt() / (alpha / r) ** 0.5
            torch.testing.assert_close(form.lora_B, p @ lower[:, :r] * root, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make,targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn"])])
def test_trained_adapter_loads_on_the_original_base(tmp_path, make, targets):
    peft = pytest.importorskip("peft")
    spec = lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, init="ldu", targets=targets)
    model = lorakit.attach(make(seed=0), spec)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = _logits(model)
    lorakit.save(model, tmp_path)
    torch.testing.assert_close(_logits(lorakit.load(make(seed=0), tmp_path)), trained, rtol=1e-4, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(make(seed=0), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form,init,message", [
    ("lora", "lora_sb", "capabilities \\[factored_bma\\].*forms that have them: 'lora_xs'"),
    ("lora_xs", "lora_ga", "capabilities \\[factored_ab\\].*forms that have them: 'lora'"),
    ("lora_xs", "ldu", "capabilities \\[factored_ab\\].*forms that have them: 'lora'"),
    ("loldu", "ldu", "use form 'loldu'"),
    ("dora", "lora_sb", "forms that have them: 'lora_xs'"),
])
def test_incompatible_pairs_are_refused(form, init, message):
    spec = lorakit.AdapterSpec(form=form, form_args={"r": 4}, init=init, targets=["q_proj"])
    with pytest.raises(ValueError, match=message):
        validate_spec(spec)
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match=message):
        lorakit.attach(model, spec, batches=[IDS])
    assert not [n for n, _ in model.named_modules() if n.endswith("base_layer")]  # nothing was installed
