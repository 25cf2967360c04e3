"""Strategies see a TrainingContext, not the Trainer: read-only run state plus the few changes they make."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.models import tiny_llama
from lorakit.strategies import Strategy
from lorakit.train import TrainConfig, Trainer
from lorakit.train.context import TrainingContext

G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (8,), generator=G) for _ in range(16)]


def make(strategy, out=None, steps=4):
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 2, "alpha": 4}), seed=0)
    extra = torch.nn.Parameter(torch.zeros(3))
    model.register_parameter("extra", extra)  # not trainable at first; the strategy adds it as a new group
    extra.requires_grad_(False)
    config = TrainConfig(steps=steps, batch_size=2, lr=1e-2, schedule="constant", warmup_steps=0, progress=False,
                         out_dir=str(out) if out else None)
    trainer = Trainer(model, DATA, lambda items: torch.stack(items),
                      lambda m, b: m(input_ids=b, labels=b).loss + (m.extra ** 2).sum(), config,
                      strategies=[strategy])
    return model, trainer


class AddsAGroup(Strategy):
    """At the end of step 1, train ``model.extra`` in its own group at half the lr, then free its state."""

    name = "adds_a_group"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[type, int, int]] = []
        self.lrs: list[float] = []

    def on_step_end(self, ctx, step, logs):
        self.seen.append((type(ctx), ctx.step, ctx.total_steps))
        if step == 1:
            extra = ctx.model.extra
            extra.requires_grad_(True)
            with torch.no_grad():
                extra.fill_(1.0)
            self.index = ctx.add_param_group({"params": [extra], "weight_decay": 0.0}, lr_lambda=lambda s: 0.5)
            ctx.log({"added_group": self.index})
        if step >= 2:
            self.lrs.append(ctx.lr(self.index))
        if step == 3:
            ctx.drop_optimizer_state([ctx.model.extra])
            assert ctx.model.extra not in ctx.optimizer.state


def test_hooks_get_a_context_and_added_groups_follow_their_multiplier(tmp_path):
    strategy = AddsAGroup()
    model, trainer = make(strategy, out=tmp_path)
    trainer.train(resume=False)
    assert {t for t, _, _ in strategy.seen} == {TrainingContext}
    assert [s for _, s, _ in strategy.seen] == [1, 2, 3, 4] and {n for _, _, n in strategy.seen} == {4}
    assert strategy.index == 1 and len(trainer.optimizer.param_groups) == 2
    assert strategy.lrs == pytest.approx([5e-3, 5e-3, 5e-3])  # config.lr · 0.5, kept by the scheduler's steps
    assert trainer.scheduler.get_last_lr() == pytest.approx([1e-2, 5e-3])
    assert float(model.extra.detach().abs().max()) < 1.0  # the new group trained
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"step": 1, "added_group": 1} in records
