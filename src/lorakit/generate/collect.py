"""Collect the late-training checkpoints of one adapter: the raw material of a :class:`~.bank.CheckpointBank`.

ICM-LoRA's bank keeps a checkpoint every epoch of the second half of a long run (notes §2.1) and
SG-LoRA's expert prototype is the mean of the last M checkpoints (§3.1); both are "the adapter's
state after each of the last M optimizer steps (or every ``every`` steps)". :class:`KeepLastStates`
is a trainer strategy that records exactly that from the one trainer, so any form, init or strategy
stack can fill a bank.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

from lorakit.core.extract import extract_state
from lorakit.core.state import AdapterState
from lorakit.strategies.base import Strategy


class KeepLastStates(Strategy):
    """Record ``extract_state(model, adapter)`` after every ``every``-th step of the last ``last`` steps."""

    name: ClassVar[str] = "keep_last_states"

    def __init__(self, total_steps: int, last: int, adapter: str = "default", every: int = 1) -> None:
        super().__init__()
        if not 1 <= last * every <= total_steps:
            raise ValueError(f"cannot keep {last} checkpoint(s) every {every} step(s) of a {total_steps}-step run")
        self.total_steps, self.last, self.every, self.adapter = total_steps, last, every, adapter
        self.states: deque[AdapterState] = deque(maxlen=last)

    def on_step_end(self, ctx: Any, step: int, logs: dict[str, Any]) -> None:
        remaining = self.total_steps - step  # step counts from 1 after the optimizer step
        if remaining < self.last * self.every and remaining % self.every == 0:
            self.states.append(extract_state(ctx.model, self.adapter))
