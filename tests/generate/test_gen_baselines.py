"""Bank baselines against their closed forms: soups, the softmax-weighted top-K (μ*), matched random."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core.extract import extract_state
from lorakit.core.spec import AdapterSpec
from lorakit.generate import BankLayout, BankTask, CheckpointBank
from lorakit.generate.baselines import adapter_soup, matched_random, model_soup, topk_weighted
from lorakit.generate.conditions import ConditionError
from lorakit.models import tiny_llama


def _layout():
    model = tiny_llama(seed=0)
    lorakit.attach(model, AdapterSpec(form_args={"r": 2, "alpha": 4}, targets=["q_proj", "v_proj"]))
    return BankLayout.of(extract_state(model, "default"))


def _bank(n=5, m=3, seed=0):
    layout = _layout()
    g = torch.Generator().manual_seed(seed)
    tasks = [BankTask(f"t{i}", f"task {i}", torch.randn(m, layout.dim, generator=g) * 0.1 + i) for i in range(n)]
    return CheckpointBank(layout, tasks), torch.randn(n, 8, generator=g)


def test_model_soup_is_the_mean_of_all_prototypes():
    bank, _ = _bank()
    x = bank.layout.flatten(model_soup(bank))
    ref = sum(t.vectors.sum(0) for t in bank.tasks) / 15  # equal M: mean of prototypes = mean of checkpoints
    assert torch.allclose(x, ref, atol=1e-5)


def test_adapter_soup_and_topk_weighted_closed_form():
    bank, embs = _bank()
    q = embs[1] + 0.1 * embs[3]
    cos = torch.nn.functional.cosine_similarity(embs, q.unsqueeze(0))
    top = cos.argsort(descending=True)[:2]
    protos = bank.prototypes()
    s = adapter_soup(bank, q, embs, k=2)
    assert torch.allclose(bank.layout.flatten(s), protos[top].mean(0), atol=1e-6)
    assert s.meta["tasks"] == [bank.task_ids[i] for i in top.tolist()]
    w = torch.softmax(cos[top] / 0.5, 0)
    t = topk_weighted(bank, q, embs, k=2, tau=0.5)
    assert torch.allclose(bank.layout.flatten(t), w[0] * protos[top[0]] + w[1] * protos[top[1]], atol=1e-6)
    assert sum(t.meta["weights"].values()) == pytest.approx(1.0)
    # τ → ∞ makes the weighted top-K the uniform top-K; K = N with τ → ∞ the model soup
    assert torch.allclose(bank.layout.flatten(topk_weighted(bank, q, embs, k=2, tau=1e6)),
                          bank.layout.flatten(s), atol=1e-5)
    assert torch.allclose(bank.layout.flatten(topk_weighted(bank, q, embs, k=5, tau=1e6)),
                          bank.layout.flatten(model_soup(bank)), atol=1e-5)
    with pytest.raises(ConditionError, match="one embedding per bank task"):
        adapter_soup(bank, q, embs[:3], k=2)


def test_matched_random_has_each_tensors_bank_statistics():
    layout = _layout()
    g = torch.Generator().manual_seed(0)
    big = [BankTask(f"t{i}", "", torch.randn(4, layout.dim, generator=g) * (i + 1) + 0.5) for i in range(3)]
    bank = CheckpointBank(layout, big)
    a, b = matched_random(bank, seed=1), matched_random(bank, seed=1)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)  # seeded
    assert not torch.equal(bank.layout.flatten(matched_random(bank, seed=2)), bank.layout.flatten(a))
    x, _ = bank.all_vectors()
    mean, std = layout.tensor_stats(x)
    # the generated vector is exactly N(0, 1) noise mapped through each tensor's (mean, std)
    noise = torch.randn(layout.dim, generator=torch.Generator().manual_seed(1))
    for i, slot in enumerate(layout.slots):
        ref = noise[slot.offset:slot.offset + slot.numel] * std[i] + mean[i]
        assert torch.allclose(a.tensors[slot.key].flatten(), ref, atol=1e-6)
