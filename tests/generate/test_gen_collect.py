"""KeepLastStates records the adapter after each of the last M optimizer steps (the bank's checkpoints)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core.extract import extract_state
from lorakit.core.spec import AdapterSpec
from lorakit.generate import CheckpointBank
from lorakit.generate.collect import KeepLastStates
from lorakit.models import tiny_llama
from lorakit.train import TrainConfig, Trainer


def _batch(items):
    ids = torch.stack(items)
    return {"input_ids": ids, "labels": ids}


def _loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss




def test_keeps_exactly_the_last_states_in_order():
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(3, 128, (8,), generator=g) for _ in range(32)]
    states = {}
    for steps in (5, 7):  # the 7-step run's states after steps 5..7 vs a fresh run stopped at each step
        model = tiny_llama(seed=0)
        lorakit.attach(model, AdapterSpec(form_args={"r": 2, "alpha": 4}, targets=["q_proj", "v_proj"]), seed=0)
        keep = KeepLastStates(steps, 3)
        Trainer(model, data, _batch, _loss, TrainConfig(steps=steps, batch_size=4, lr=1e-2, progress=False,
                                                        eval_at_start=False), strategies=[keep]).train(resume=False)
        states[steps] = list(keep.states)
        assert len(keep.states) == 3
        last = extract_state(model, "default")
        assert all(torch.equal(last.tensors[k], keep.states[-1].tensors[k]) for k in last.tensors)
    # consecutive recorded states differ (one optimizer step apart)
    s = states[7]
    bank = CheckpointBank.from_states([("t", "d", s)])
    v = bank.tasks[0].vectors
    assert v.shape[0] == 3 and (v[1] - v[0]).abs().max() > 0 and (v[2] - v[1]).abs().max() > 0


def test_every_and_bounds(monkeypatch):
    with pytest.raises(ValueError, match="cannot keep"):
        KeepLastStates(5, 3, every=2)
    import lorakit.generate.collect as collect

    step_now = {"step": 0}
    monkeypatch.setattr(collect, "extract_state", lambda model, name: step_now["step"])
    k = KeepLastStates(10, 3, every=2)

    class Ctx:
        model = None

    for step in range(1, 11):
        step_now["step"] = step
        k.on_step_end(Ctx(), step, {})
    assert list(k.states) == [6, 8, 10]
