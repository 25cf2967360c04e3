"""Decode steps with unchanged row slots reuse the RowPlan and its gathered adapter weights; an
upload/evict in between (the bank layer's version changes) forces a fresh gather, so a slot that now
holds another adapter never serves the old pages. Checked against the uncached kernel (exact), on the
BGMV and SGMV paths, and with a zero byte allowance (no cache)."""

from __future__ import annotations

import copy

import pytest
import torch
from serving_helpers import tiny_base, write_peft_adapters

from lorakit.serving import AdapterBank, RowPlan, batched_lora
from lorakit.serving.engine import ServingContext


@pytest.fixture(scope="module")
def bank_and_dirs(tmp_path_factory):
    base = tiny_base()
    dirs = write_peft_adapters(base, tmp_path_factory.mktemp("cache"))
    return base, dirs


def uncached(x, layer, slots, path):
    out = torch.zeros(x.shape[0], x.shape[1], layer.out_features)
    return batched_lora(x, out, layer, RowPlan.build(slots, tokens_per_row=1, path=path))


@pytest.mark.parametrize("path", ["bgmv", "sgmv"])
def test_plan_reuse_and_invalidation(bank_and_dirs, path):
    base, dirs = bank_and_dirs
    model = copy.deepcopy(base)
    probe = AdapterBank.for_model(model, budget_bytes=1 << 20, page_rows=4)
    page_bytes = sum(layer.page_bytes for layer in probe.layers.values())
    bank = AdapterBank.for_model(model, budget_bytes=4 * page_bytes, page_rows=4)  # 4 pages per module
    for name, d in dirs.items():
        bank.add(name, d)
    ctx = ServingContext(path=path)
    layer = bank.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 1, layer.in_features, generator=torch.Generator().manual_seed(0))
    slots = bank.slots(["a", "a", None])  # "a": rank 4 on q,k,v,o (1 page per module)
    ctx.set_rows(slots, 1)
    plan = ctx.plan
    first = batched_lora(x, torch.zeros(3, 1, layer.out_features), layer, plan)
    assert torch.equal(first, uncached(x, layer, slots, path)) and first[0].abs().sum() > 0
    assert id(layer) in plan.gathered
    ctx.set_rows(slots.clone(), 1)
    assert ctx.plan is plan  # same slots: reused, weights not gathered again
    assert torch.equal(batched_lora(x, torch.zeros(3, 1, layer.out_features), layer, ctx.plan), first)

    # free "a"'s slot and pages, then "b" (rank 16 on q,v: all 4 pages) takes them: the same slot
    # number now means another adapter; the cached entry's version is stale and must not be used
    bank.release("a")
    bank.release("a")
    slot_a = int(slots[0])
    slot_b = bank.acquire("b")
    assert bank.adapters["a"].slot < 0 and slot_b == slot_a
    ctx.set_rows(slots.clone(), 1)
    assert ctx.plan is plan
    now = batched_lora(x, torch.zeros(3, 1, layer.out_features), layer, ctx.plan)
    assert torch.equal(now, uncached(x, layer, slots, path)) and not torch.allclose(now, first)

    # a different batch builds a new plan; a zero allowance keeps nothing
    ctx.gather_cache_bytes = 0
    ctx.set_rows(slots[:2].clone(), 1)
    assert ctx.plan is not plan
    batched_lora(x[:2], torch.zeros(2, 1, layer.out_features), layer, ctx.plan)
    assert not ctx.plan.gathered and ctx.plan.gather_bytes == 0
    # prefill plans (several tokens per row) are never reused
    ctx.set_rows(slots[:2].clone(), 4)
    prefill = ctx.plan
    ctx.set_rows(slots[:2].clone(), 4)
    assert ctx.plan is not prefill
