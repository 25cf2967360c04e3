"""Loading an adapter builds its forms without running their init (``lorakit.forms.base.skip_init``):
no form's ``reset_parameters`` runs on load, LoRA-XS runs no SVD, LoLDU with saved factors no LU, a
weight-magnitude ShiRA mask no top-k; and the loaded model is exactly the saved one for every form of the
catalog, even when every tensor the skipped init left unset starts as NaN (so each one is overwritten)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lorakit
from lorakit.api import apply_state
from lorakit.core import registry
from lorakit.forms.base import Form, _skipped_under_load, init_skipped, skip_init
from lorakit.io.peft import load_state
from lorakit.models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
CASES = [pytest.param(e.name, i, id=f"{e.name}-{i}") for e in registry.entries("form")
         for i in range(len(registry.get("form", e.name).examples()))]


def _spec(name, index, **override):
    args = {**dataclasses.asdict(registry.get("form", name).examples()[index]), **override}
    return lorakit.AdapterSpec(form=name, form_args=args, targets=TARGETS)


def _saved(tmp_path, spec):
    model = tiny_llama(seed=0)
    lorakit.attach(model, spec, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the init, so a load that kept the init would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    lorakit.save(model, tmp_path)
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def _count_inits(monkeypatch) -> list[str]:
    """Record every call of a form's own (unwrapped) reset_parameters."""
    calls: list[str] = []
    seen = set()
    for e in registry.entries("form"):
        for klass in registry.get("form", e.name).__mro__:
            fn = klass.__dict__.get("reset_parameters")
            if klass in seen or klass is Form or fn is None:
                continue
            seen.add(klass)
            raw = fn.__wrapped__

            def counting(self, *a, _raw=raw, _name=klass.__name__, **kw):
                calls.append(_name)
                return _raw(self, *a, **kw)

            monkeypatch.setattr(klass, "reset_parameters", _skipped_under_load(counting))
    return calls


def _poison_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors while forms are built for a load."""
    real = torch.empty

    def empty(*a, **kw):
        t = real(*a, **kw)
        return t.fill_(float("nan")) if init_skipped() and t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("name,index", CASES)
def test_load_runs_no_init_and_restores_the_adapter_exactly(name, index, tmp_path, monkeypatch):
    calls = _count_inits(monkeypatch)
    expected = _saved(tmp_path, _spec(name, index))
    attach_calls = len(calls)
    state = load_state(tmp_path)
    _poison_empty(monkeypatch)
    fresh = apply_state(tiny_llama(seed=0), state)
    assert calls[attach_calls:] == []  # no reset_parameters on load
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, expected)


def test_instrumentation_sees_the_inits(tmp_path, monkeypatch):
    calls = _count_inits(monkeypatch)
    _saved(tmp_path, _spec("lora_xs", 0))
    assert calls.count("LoRAXS") == 2 * len(TARGETS)  # 2 layers × 3 targets at attach
    with skip_init():  # inside the context every form's init is a no-op (it would fail on a non-form)
        assert registry.get("form", "lora_xs").reset_parameters(object()) is None


def _counting(monkeypatch, owner, attr):
    calls = []
    real = getattr(owner, attr)

    def wrapped(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(owner, attr, wrapped)
    return calls


def test_lora_xs_load_runs_no_svd(tmp_path, monkeypatch):
    svd = _counting(monkeypatch, torch.linalg, "svd")
    expected = _saved(tmp_path, _spec("lora_xs", 0))
    assert len(svd) == 2 * len(TARGETS)  # one SVD per layer at attach
    svd.clear()
    fresh = lorakit.load(tiny_llama(seed=0), tmp_path)
    assert svd == []
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, expected)


@pytest.mark.parametrize("save_factors", [True, False])
def test_loldu_factors_the_base_on_load_only_when_the_file_lacks_the_factors(tmp_path, monkeypatch, save_factors):
    lu = _counting(monkeypatch, torch.linalg, "lu_factor")
    expected = _saved(tmp_path, _spec("loldu", 0, save_factors=save_factors))
    lu.clear()
    fresh = lorakit.load(tiny_llama(seed=0), tmp_path)
    assert len(lu) == (0 if save_factors else 2 * len(TARGETS))  # π, L, U not saved: needed
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, expected)


def test_shira_weight_mask_is_not_recomputed_on_load(tmp_path, monkeypatch):
    topk = _counting(monkeypatch, torch, "topk")
    expected = _saved(tmp_path, lorakit.AdapterSpec(form="shira", form_args={"r": 1, "mask": "wm"},
                                                    targets=TARGETS))
    assert topk
    topk.clear()
    fresh = lorakit.load(tiny_llama(seed=0), tmp_path)
    assert topk == []
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, expected)


def test_skip_init_is_scoped_to_the_load():
    assert not init_skipped()
    with skip_init():
        assert init_skipped()
    assert not init_skipped()
    model = tiny_llama(seed=0)  # attach outside the context still initializes (LoRA-XS: A, B from the SVD)
    lorakit.attach(model, _spec("lora_xs", 0), seed=0)
    form = lorakit.core.inject.adapter_modules(model, "default")["model.layers.0.self_attn.q_proj"]
    assert torch.isfinite(form.lora_A).all() and form.lora_A.abs().sum() > 0
