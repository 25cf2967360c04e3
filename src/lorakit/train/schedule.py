"""Learning-rate schedules as multipliers of the base LR."""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("cosine", "linear", "constant")


def lr_multiplier(schedule: str, warmup: int, total: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then cosine/linear decay to ``min_ratio`` at ``total``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")

    def mult(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return mult
