"""Calibration passes shared by data-driven inits: layer inputs (forward hooks) and gradients of the
frozen base weights of the target layers (one backward per batch, no gradients kept for the rest of the
model). Both run the base model alone (every adapter disabled), in eval mode, with a progress bar.

Batches are dicts of model inputs (``input_ids``, ``attention_mask``, optional ``labels``; without labels
the loss is next-token prediction on ``input_ids`` with padding ignored) or tensors of token ids; a
custom ``loss_fn(model, batch)`` (e.g. ``Objective.loss``) may replace the LM loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.forms.base import is_conv1d, weight_out_in

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def calibration_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Causal-LM loss of ``model`` on one calibration batch (dict of inputs or a tensor of ids)."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError("calibration batches must be dicts with 'input_ids' or tensors of token ids, "
                        f"got {type(batch).__name__}")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
              if k in ("input_ids", "attention_mask", "labels")}
    if "labels" not in inputs:
        labels = inputs["input_ids"]
        if "attention_mask" in inputs:
            labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
        inputs["labels"] = labels
    loss = model(**inputs).loss
    if loss is None:
        raise ValueError("the model returned no loss for a calibration batch")
    return loss


def _batches(batches: Iterable[Any] | None, max_batches: int | None, desc: str, progress: bool):
    if batches is None:
        raise ValueError(f"{desc}: calibration batches are required")
    items = list(batches) if max_batches is None else [b for _, b in zip(range(max_batches), batches)]
    if not items:
        raise ValueError(f"{desc}: the calibration batches were empty")
    return tqdm(items, desc=desc, unit="batch", leave=False, disable=not progress)


def weight_gradients(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any] | None, *,
                     reduce: str = "mean", loss_fn: LossFn | None = None, max_batches: int | None = None,
                     progress: bool = True, desc: str = "calibration gradients") -> dict[str, torch.Tensor]:
    """Per target layer, the gradient of the loss w.r.t. its base weight, in (out, in) layout, fp32.

    ``reduce``: "mean" (average over batches), "sum", or "abs" (Σ_b |∂L_b/∂W|).
    Only the target weights get ``requires_grad`` during the pass (restored afterwards).
    """
    from lorakit.core.inject import disabled

    if reduce not in ("mean", "sum", "abs"):
        raise ValueError(f"reduce must be 'mean', 'sum' or 'abs', got {reduce!r}")
    loss_fn = loss_fn or calibration_loss
    weights = {path: layer.weight for path, layer in layers.items()}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    saved_grads = {path: w.grad for path, w in weights.items()}
    acc = {path: torch.zeros(weight_out_in(layer).shape, dtype=torch.float32, device=layer.weight.device)
           for path, layer in layers.items()}
    was_training = model.training
    seen = 0
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        with disabled(model), torch.enable_grad():
            for batch in _batches(batches, max_batches, desc, progress):
                loss_fn(model, batch).backward()
                seen += 1
                for path, layer in layers.items():
                    grad = weights[path].grad
                    if grad is not None:
                        g = (grad.T if is_conv1d(layer) else grad).float()
                        acc[path] += g.abs() if reduce == "abs" else g
                        weights[path].grad = None
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        for path, w in weights.items():
            w.grad = saved_grads[path]
        model.train(was_training)
    if reduce == "mean":
        for g in acc.values():
            g /= seen
    return acc


def layer_inputs(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any] | None,
                 consume: Callable[[str, torch.Tensor, Any], None], *, max_batches: int | None = None,
                 progress: bool = True, desc: str = "calibration inputs",
                 stop: Callable[[], bool] | None = None) -> int:
    """Forward the base model over ``batches`` and hand each target layer's input to
    ``consume(path, x, batch)`` (x: [..., in_features], detached). Returns the number of batches run;
    ``stop()`` may end the pass early (e.g. once every layer has converged)."""
    from lorakit.core.inject import disabled

    def hook_for(path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            consume(path, args[0].detach(), current["batch"])
        return hook

    current: dict[str, Any] = {}
    seen = 0
    was_training = model.training
    device = next(model.parameters()).device
    with ExitStack() as stack:
        for path, layer in layers.items():
            stack.callback(layer.register_forward_pre_hook(hook_for(path)).remove)
        stack.enter_context(disabled(model))
        stack.enter_context(torch.no_grad())
        model.eval()
        try:
            for batch in _batches(batches, max_batches, desc, progress):
                current["batch"] = batch
                inputs = {"input_ids": batch} if isinstance(batch, torch.Tensor) else batch
                model(**{k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")})
                seen += 1
                if stop is not None and stop():
                    break
        finally:
            model.train(was_training)
    return seen
