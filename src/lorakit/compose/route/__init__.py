"""Routing: gates over a bank of frozen LoRA adapters (MeteoRA, LoRA-Mixer, RecLoRA).

    from lorakit.compose.route import route, load_routed
    routed = route(model, ["runs/a", "runs/b"], "meteora", top_k=1)   # AdapterStates or adapter folders
    routed.train_gates(batches, steps=200)                            # batches carry task_ids
    train_router(routed, data, collate, loss_fn, TrainConfig(...))   # generic Trainer (+ router aux loss)
    routed.save("runs/routed")                                        # lorakit_router.json + safetensors
    routed = load_routed(fresh_model, "runs/routed")
    logits = routed(input_ids=ids).logits                             # batched inference

All routers share ``base.py``: the stacked bank (A: [E, r_max, in], B: [E, out, r_max]) and one layer
computing W0x + Σ_e g_e(x)·ΔW_e x; each method only says where g comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.compose.route.base import (
    ExpertStack,
    LoRABank,
    RoutedLinear,
    RoutedModel,
    RouterError,
    fresh_bank,
    load_routed,
)
from lorakit.compose.route.training import train_router, with_side_inputs
from lorakit.core.state import AdapterState


def route(model: nn.Module, adapters: Sequence[AdapterState | str | Path] | LoRABank, method: str,
          names: Sequence[str] | None = None, **args: Any) -> RoutedModel:
    """Install catalog router ``method`` over ``adapters`` on ``model`` (in place); returns the router."""
    from lorakit.core import registry

    bank = adapters if isinstance(adapters, LoRABank) else LoRABank.from_adapters(adapters, names)
    return registry.get("route", method)(model, bank, **args)


def methods() -> list[str]:
    from lorakit.core import registry

    return registry.names("route")


__all__ = ["ExpertStack", "LoRABank", "RoutedLinear", "RoutedModel", "RouterError", "fresh_bank", "load_routed",
           "methods", "route", "train_router", "with_side_inputs"]
