"""Training a routed model with the generic :class:`~lorakit.train.trainer.Trainer`.

``train_router(routed, data, collate, loss_fn, config)`` freezes the base model, leaves trainable what
the router's regime trains (its gates; also the experts for LoRA-Mixer ``regime="joint"``, RecLoRA
``train_experts=True`` or MeteoRA ``train_experts=True``), makes the batch's side inputs (``task_ids``,
``user``) reach the router even when ``loss_fn`` calls the model with fixed keyword arguments (a task
objective), and runs the Trainer. The router's own auxiliary loss (LoRA-Mixer's RSL, MeteoRA's gate
cross-entropy) is added by the Trainer, which adds ``model.aux_loss()`` for any model that has it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.compose.route.base import RoutedModel


def with_side_inputs(routed: RoutedModel, loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor]
                     ) -> Callable[[nn.Module, dict[str, Any]], torch.Tensor]:
    """``loss_fn`` whose model calls see the batch's side inputs (``task_ids``, ``user``)."""

    def fn(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        with routed.side_inputs_from(batch):
            return loss_fn(model, batch)

    return fn


def train_router(routed: RoutedModel, train_data: Sequence[Any], collate: Callable[[list[Any]], Any],
                 loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor], config: Any = None, *,
                 eval_fn: Callable[[nn.Module], dict[str, float]] | None = None, resume: bool = False) -> Any:
    """Train ``routed`` (gates, and experts where its regime says) on ``loss_fn`` + its ``aux_loss``;
    returns the Trainer's ``TrainResult`` (losses per step include the auxiliary loss)."""
    from lorakit.train.trainer import TrainConfig, Trainer

    routed.mark_trainable()
    trainer = Trainer(routed, train_data, collate, with_side_inputs(routed, loss_fn), config or TrainConfig(),
                      eval_fn=eval_fn)
    result = trainer.train(resume=resume)
    routed.eval()
    return result


__all__ = ["train_router", "with_side_inputs"]
