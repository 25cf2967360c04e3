"""Bone's unmerge solves (W' − Bn)(I + Bn)^{-1} per block, which amplifies the rounding of the stored W'
by cond(I + Bn). A merge records the pre-merge rows of the blocks whose solve would not restore them, so
merge→unmerge stays exact even for a nearly singular I + Bn (on Linear and GPT-2 Conv1D layers)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.models import tiny_gpt2, tiny_llama


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_ill_conditioned_block_unmerges_exactly(kind):
    model = tiny_llama(seed=0) if kind == "llama" else tiny_gpt2(seed=0)
    target = "q_proj" if kind == "llama" else "c_attn"
    lorakit.attach(model, lorakit.AdapterSpec(form="bone", form_args={"r": 8}, targets=[target]), seed=0)
    g = torch.Generator().manual_seed(0)
    layers = [layer for _, layer in adapted_layers(model)]
    for layer in layers:
        form = layer.adapters["default"]
        with torch.no_grad():
            form.miss_block.copy_(torch.randn(form.miss_block.shape, generator=g) * 0.1)
            # block 1: I + Bn nearly singular (cond ~1e6)
            u = torch.randn(8, generator=g)
            form.miss_block[1] = -torch.eye(8) + 1e-6 * torch.eye(8) + torch.outer(u, u) * 0.5
    before = [layer.base_layer.weight.detach().clone() for layer in layers]
    lorakit.merge(model)
    for layer in layers:
        record = layer.adapters["default"]._merge_record
        assert record is not None and set(record[0].tolist()) >= set(range(8, 16))  # block 1 recorded
        assert record[0].numel() < layer.adapters["default"].out_features  # not the whole weight
    # without the record, the solve alone is far off on block 1
    form = layers[0].adapters["default"]
    solved = form._solve(layers[0]._weight_out_in().detach().clone())
    assert (solved - (before[0].T if kind == "gpt2" else before[0])).abs().max() > 1e-4
    lorakit.unmerge(model)
    for layer, b in zip(layers, before, strict=True):
        w = layer.base_layer.weight
        rows = layer.adapters["default"]._merge_record[0]
        out_in, b_out_in = (w.T, b.T) if kind == "gpt2" else (w, b)
        assert torch.equal(out_in[rows], b_out_in[rows])
        torch.testing.assert_close(w, b, rtol=0, atol=1e-6)
