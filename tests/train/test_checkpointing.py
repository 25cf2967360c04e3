"""Gradient checkpointing: same loss and adapter gradients as without; refusals (non-HF model, adapter context)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.context import current_context, mixing
from lorakit.models import tiny_llama
from lorakit.train import TrainConfig, Trainer

G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (10,), generator=G) for _ in range(8)]


def collate(items):
    return {"input_ids": torch.stack(items)}


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def loss_and_grads(checkpointing):
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8, "dropout": 0.0}), seed=0)
    for n, p in model.named_parameters():  # B = 0 at init gives zero A grads; make every grad informative
        if p.requires_grad:
            with torch.no_grad():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(n) % 2**31))
    Trainer(model, DATA, collate, lm_loss, TrainConfig(steps=1, progress=False, gradient_checkpointing=checkpointing))
    model.train()
    loss = lm_loss(model, collate(DATA[:4]))
    loss.backward()
    assert model.is_gradient_checkpointing == checkpointing
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointing_same_loss_and_adapter_grads():
    loss_off, grads_off = loss_and_grads(False)
    loss_on, grads_on = loss_and_grads(True)
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert grads_on.keys() == grads_off.keys() and grads_on
    for n, g in grads_off.items():
        assert g.abs().sum() > 0, n
        assert torch.allclose(grads_on[n], g, rtol=1e-6, atol=1e-6 * g.abs().max().item()), n


def test_checkpointing_trains_and_cli_flag_is_in_the_spec():
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}), seed=0)
    t = Trainer(model, DATA, collate, lm_loss, TrainConfig(steps=2, batch_size=4, progress=False,
                                                           gradient_checkpointing=True, precision="bf16"))
    assert all(torch.isfinite(torch.tensor(t.train().losses)))
    assert t.train_spec.to_dict()["trainer"]["gradient_checkpointing"] is True


def test_contextvar_is_not_seen_by_the_recomputed_forward():
    """Why checkpointing + an adapter context is refused: backward's recomputation runs outside ``with``."""
    seen = []

    def fn(x):
        seen.append(current_context())
        return x.sin()

    x = torch.randn(3, requires_grad=True)
    with mixing(["a"], [[1.0]]):
        y = torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)
    y.sum().backward()
    assert seen[0] is not None and seen[1] is None


def test_checkpointing_refuses_a_forward_under_an_adapter_context():
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}), seed=0)

    def mixed_loss(m, batch):
        with mixing(["default"], [[1.0]] * batch["input_ids"].shape[0]):
            return lm_loss(m, batch)

    t = Trainer(model, DATA, collate, mixed_loss, TrainConfig(steps=1, progress=False, gradient_checkpointing=True,
                                                              eval_at_start=False))
    with pytest.raises(ValueError, match="cannot be combined with a per-forward adapter context"):
        t.train()


def test_checkpointing_refused_for_a_model_without_hf_support():
    model = nn.Sequential(nn.Linear(4, 4))
    lorakit.attach(model, lorakit.AdapterSpec(targets=["0"], form_args={"r": 2}), seed=0)
    with pytest.raises(ValueError, match="gradient_checkpointing needs a Hugging Face model"):
        Trainer(model, DATA, collate, lm_loss, TrainConfig(steps=1, progress=False, gradient_checkpointing=True))
