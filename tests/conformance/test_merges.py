"""Conformance suite for every merge method in the catalog (like the forms suite: checks chosen by
declared capabilities only, never by name).

Every merge: a frozen ``Args`` dataclass with defaults; unknown args named; output a plain ``lora``
AdapterState over the inputs' modules that saves and loads; deterministic for fixed inputs; the
report says what ran; bad inputs (other targets, a non-factored form, wrong weights) are refused with
a named error. Merges that read data (``Cap.NEEDS_DATA``) are built but not run here (their own tests
search with data).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lorakit
from lorakit.compose.merge import MergeInputError
from lorakit.core import registry
from lorakit.core.caps import Cap

try:
    from tests.compose.merge_testutil import base_model, make_state
except ModuleNotFoundError:  # tests/ may not be a package
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compose"))
    from merge_testutil import base_model, make_state

MERGES = [e.name for e in registry.entries("merge")]
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def inputs():
    return [make_state(r=4, seed=0), make_state(r=2, seed=1), make_state(r=3, seed=2, bias=True)]


def _runs(name: str) -> bool:
    return Cap.NEEDS_DATA not in registry.get("merge", name).caps


@pytest.mark.parametrize("name", MERGES)
def test_args_are_a_frozen_dataclass_with_defaults(name):
    cls = registry.get("merge", name)
    assert dataclasses.is_dataclass(cls.Args)
    args = cls().args
    assert isinstance(args, cls.Args)
    fields = dataclasses.fields(cls.Args)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(args, fields[0].name, getattr(args, fields[0].name))
    with pytest.raises((TypeError, ValueError), match="no_such_arg"):
        cls(no_such_arg=1)


@pytest.mark.parametrize("name", [n for n in MERGES if _runs(n)])
def test_output_is_a_plain_lora_that_loads_and_is_deterministic(name, inputs, tmp_path):
    cls = registry.get("merge", name)
    merged = cls().merge(inputs, [0.5, 0.3, 0.2])
    again = cls().merge(inputs, [0.5, 0.3, 0.2])
    assert merged.spec.form == "lora"
    assert merged.modules == inputs[0].modules
    assert merged.meta["merge"]["method"] == name
    assert set(merged.tensors) == set(again.tensors)
    for key, t in merged.tensors.items():
        assert torch.isfinite(t).all(), key
        torch.testing.assert_close(t, again.tensors[key], rtol=0, atol=0)
    lorakit.save_state(merged, tmp_path / name)
    model = lorakit.load(base_model(), tmp_path / name)
    with torch.no_grad():
        out = model(IDS).logits
        with lorakit.disabled(model):
            plain = model(IDS).logits
    assert torch.isfinite(out).all()
    assert (out - plain).abs().max() > 0  # the merged adapter does something


@pytest.mark.parametrize("name", [n for n in MERGES if _runs(n)])
def test_bad_inputs_are_refused_with_named_errors(name, inputs):
    cls = registry.get("merge", name)
    other_targets = make_state(r=2, seed=5, targets=["q_proj"])
    with pytest.raises(MergeInputError, match="adapts other modules"):
        cls().merge([inputs[0], other_targets], [0.5, 0.5])
    with pytest.raises(MergeInputError, match="weight"):
        cls().merge(inputs[:2], [1.0])
    with pytest.raises(MergeInputError, match="not LoRA-like"):
        cls().merge([inputs[0], make_state(r=2, seed=6, form="dora")], [0.5, 0.5])
    with pytest.raises(MergeInputError, match="at least one"):
        cls().merge([], [])
