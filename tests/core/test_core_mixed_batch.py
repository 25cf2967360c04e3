"""Mixed batches: each row runs with its own adapter (or the base) in one forward."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import AdapterSpec
from lorakit.models import tiny_gpt2, tiny_llama

try:  # tests/ may or may not be a package
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def build(make, specs):
    """``make()`` with the adapters of ``specs``; each adapter's values depend only on its name."""
    model = make()
    for name, spec in specs.items():
        lorakit.attach(model, spec, name=name, seed=0)
        randomize_adapter(model, name, seed=sum(map(ord, name)))
    return model


LLAMA = {
    "a": AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 4, "alpha": 8}),
    # "b" targets other modules than "a"
    "b": AdapterSpec(targets=["o_proj", "down_proj"], form_args={"r": 2, "alpha": 4, "bias": True}),
    "c": AdapterSpec(targets="all-linear", form_args={"r": 3, "rslora": True}),
}


def make_llama():
    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


def make_gpt2():
    return tiny_gpt2(hidden=32, layers=2, heads=4, vocab=128, seed=0)


@pytest.mark.parametrize("rows", [["a", None, "b"], ["c", "a", "c"], [None, None, "b"], ["b", "c", None]])
def test_each_row_equals_running_it_alone(input_ids, rows):
    model = build(make_llama, LLAMA)
    lorakit.set_active(model, "a")  # the active set must not leak into a mixed batch
    with lorakit.mixed_batch(model, rows):
        mixed = logits(model, input_ids)
    for i, name in enumerate(rows):
        # reference: a fresh base with only that adapter (or none), run on that row alone
        ref_model = build(make_llama, {} if name is None else {name: LLAMA[name]})
        ref = logits(ref_model, input_ids[i:i + 1])
        close(mixed[i:i + 1], ref)
    # afterwards the model runs normally again
    close(logits(model, input_ids), logits(build(make_llama, {"a": LLAMA["a"]}), input_ids))


def test_mixed_batch_gpt2_conv1d(input_ids):
    specs = {"x": AdapterSpec(targets=["c_attn"], form_args={"r": 4, "alpha": 8}),
             "y": AdapterSpec(targets=["c_fc", "c_proj"], form_args={"r": 2})}
    model = build(make_gpt2, specs)
    rows = ["y", None, "x"]
    with lorakit.mixed_batch(model, rows):
        mixed = logits(model, input_ids)
    lorakit.set_active(model, [])
    close(mixed[1], logits(model, input_ids)[1])
    for name, row in (("x", 2), ("y", 0)):
        lorakit.set_active(model, name)
        close(mixed[row], logits(model, input_ids)[row])


def test_mixed_batch_while_merged_raises(input_ids):
    model = build(make_llama, {"a": LLAMA["a"], "b": LLAMA["b"]})
    lorakit.set_active(model, "a")
    lorakit.merge(model)
    with pytest.raises(RuntimeError, match="merged"), lorakit.mixed_batch(model, ["a", None, "b"]):
        logits(model, input_ids)


def test_mixed_batch_unknown_adapter(input_ids):
    model = build(make_llama, {"a": LLAMA["a"]})
    with pytest.raises(KeyError, match="'zz'"), lorakit.mixed_batch(model, ["a", "zz", None]):
        pass
