"""The narrow view of a training run that strategies see (instead of the whole Trainer).

A strategy may read the model, the optimizer and its parameter groups, the step, the total steps, the
trainer config, the run dir and whether this is the main process; it changes the run only through
``add_param_group`` (a new group with its own learning-rate multiplier, e.g. IncreLoRA's grown ranks),
``drop_optimizer_state`` (e.g. LISA freeing the Adam moments of frozen blocks) and ``log``, and may run
the trainer's ``evaluate``. The trainer owns its scheduler: its private state is touched here, in one
place, never by a strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lorakit.train.trainer import TrainConfig, Trainer


class TrainingContext:
    """What the strategy hooks receive. ``config`` is the run's TrainConfig (read it, do not change it)."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer

    # -- read-only state -------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._trainer.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._trainer.optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._trainer.optimizer.param_groups

    @property
    def config(self) -> TrainConfig:
        return self._trainer.config

    @property
    def step(self) -> int:
        """Optimizer steps completed (the step a hook's ``step`` argument names while it runs)."""
        return self._trainer.step

    @property
    def total_steps(self) -> int:
        return self._trainer.config.steps

    @property
    def out_dir(self) -> Path | None:
        return self._trainer.out_dir

    @property
    def is_main(self) -> bool:
        return self._trainer.is_main

    def lr(self, group: int = 0) -> float:
        """The learning rate the optimizer uses for ``group`` now (scheduler included)."""
        return float(self._trainer.optimizer.param_groups[group]["lr"])

    # -- the few changes a strategy may make -----------------------------------------------
    def add_param_group(self, group: dict[str, Any], lr_lambda: Callable[[int], float]) -> int:
        """Add an optimizer group whose lr is ``config.lr · lr_lambda(step)`` from now on (the trainer's
        LambdaLR drives it like the others, and checkpoints save and restore it); returns its index.
        The group's initial ``lr`` is set from the multiplier at the current step."""
        t = self._trainer
        base_lr = float(t.config.lr)
        group = {**group, "lr": base_lr * lr_lambda(t.step)}
        t.optimizer.add_param_group(group)
        # LambdaLR keeps one multiplier and one base lr per group; it has no public API to add one
        t.scheduler.lr_lambdas.append(lr_lambda)
        t.scheduler.base_lrs.append(base_lr)
        t.scheduler._last_lr = [g["lr"] for g in t.optimizer.param_groups]
        return len(t.optimizer.param_groups) - 1

    def drop_optimizer_state(self, params: Iterable[nn.Parameter]) -> None:
        """Free the optimizer's per-parameter state (e.g. Adam moments) of ``params``; they restart at 0."""
        state = self._trainer.optimizer.state
        for p in params:
            state.pop(p, None)

    def evaluate(self) -> dict[str, float]:
        """Run the trainer's evaluation now (eval mode, no grad; the model's training mode is restored)."""
        return self._trainer.evaluate()

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with the current step) to the run's ``log.jsonl`` (main process only)."""
        self._trainer._log({"step": self._trainer.step, **record})
