"""Conformance suite for every init in the catalog (checks chosen by declared capabilities only).

Each init: a frozen ``Args`` dataclass with defaults and named refusal of unknown args; runs on a form
that has the capabilities it ``requires`` (the first such form of the catalog, ``lora`` when it
qualifies) and refuses one that lacks them, naming the capability; data/gradient inits refuse to run
without batches; seeded runs are reproducible; inits that rewrite the base keep the output unchanged;
the initialized adapter trains (gradients reach it) and saves/loads exactly on the original base.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import lorakit
from lorakit.api import extract_state
from lorakit.core import registry
from lorakit.core.caps import Cap
from lorakit.models import tiny_llama

INITS = [e.name for e in registry.entries("init")]
TARGETS = ["q_proj", "v_proj"]
BATCHES = [torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(2)]
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(9))


def _form_for(init_cls) -> str | None:
    forms = [e.name for e in registry.entries("form")]
    ok = [f for f in forms if init_cls.requires in registry.get("form", f).caps]
    return "lora" if "lora" in ok else (ok[0] if ok else None)


def _form_args(form: str) -> dict:
    fields = {f.name for f in dataclasses.fields(registry.get("form", form).Args)}
    return {k: v for k, v in {"r": 4, "alpha": 8.0}.items() if k in fields}


def _attach(name: str, base=None, seed: int = 0):
    cls = registry.get("init", name)
    form = _form_for(cls)
    spec = lorakit.AdapterSpec(form=form, form_args=_form_args(form), init=name, targets=TARGETS)
    return lorakit.attach(copy.deepcopy(base) if base is not None else tiny_llama(seed=0), spec, seed=seed,
                          batches=BATCHES)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("name", INITS)
def test_args_are_a_frozen_dataclass_and_unknown_args_are_named(name):
    cls = registry.get("init", name)
    assert dataclasses.is_dataclass(cls.Args)
    init = cls()
    assert isinstance(init.args, cls.Args)
    fields = dataclasses.fields(cls.Args)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(init.args, fields[0].name, getattr(init.args, fields[0].name))
    with pytest.raises((TypeError, ValueError), match="no_such_arg"):
        cls(no_such_arg=1)


@pytest.mark.parametrize("name", INITS)
def test_refuses_forms_without_the_required_capabilities(name):
    cls = registry.get("init", name)
    if cls.requires == Cap.NONE:
        pytest.skip(f"init {name!r} requires no form capability")
    lacking = [e.name for e in registry.entries("form") if cls.requires not in registry.get("form", e.name).caps]
    if not lacking:
        pytest.skip("every form of the catalog has the capabilities")
    with pytest.raises(ValueError, match="capabilit"):
        cls.check_form(registry.get("form", lacking[0]))


DATA_INITS = [n for n in INITS if registry.get("init", n).needs & (Cap.NEEDS_DATA | Cap.NEEDS_GRAD)]


@pytest.mark.parametrize("name", DATA_INITS)
def test_data_driven_inits_need_batches(name):
    cls = registry.get("init", name)
    form = _form_for(cls)
    spec = lorakit.AdapterSpec(form=form, form_args=_form_args(form), init=name, targets=TARGETS)
    model = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="batches"):
        lorakit.attach(model, spec)
    assert not lorakit.specs(model)  # a failed init leaves the model as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", INITS)
def test_reproducible_trains_and_round_trips_on_the_original_base(name, tmp_path):
    base = tiny_llama(seed=0)
    one, two = _attach(name, base), _attach(name, base)
    s1, s2 = extract_state(one), extract_state(two)
    assert set(s1.tensors) == set(s2.tensors)
    for k in s1.tensors:
        torch.testing.assert_close(s1.tensors[k], s2.tensors[k], rtol=0, atol=0)
    if Cap.REWRITES_BASE in registry.get("init", name).needs:
        torch.testing.assert_close(_logits(one), _logits(base), rtol=1e-4, atol=1e-4)  # W_res + ΔW0 = W
    loss = one(IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in one.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():  # move away from the init so the save must carry the trained tensors
        for p in one.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    lorakit.save(one, tmp_path / name)
    loaded = lorakit.load(copy.deepcopy(base), tmp_path / name)
    torch.testing.assert_close(_logits(loaded), _logits(one), rtol=0, atol=1e-4)
