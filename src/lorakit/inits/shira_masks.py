"""Data-driven SHiRA masks: SHiRA-Grad and SHiRA-SNIP (Bhardwaj et al., NeurIPS 2024, arXiv 2406.13175).

SHiRA trains k = r·(m+n) entries of each weight on a fixed mask. The data-free masks (random,
weight magnitude) are options of the form (``lorakit.forms.shira``); these two need gradients of the
frozen base weights on calibration data, so they are inits (the axis that "may read calibration data
or gradients"), not form options:

- ``shira_grad``: mask = top-k of |G|, G = Σ_b ∂L_b/∂W (the gradient of the summed calibration loss,
  i.e. of one big batch); ``accumulate="abs"`` uses Σ_b |∂L_b/∂W| instead.
- ``shira_snip``: mask = top-k of |W ⊙ G| (SNIP connection sensitivity, Lee et al., ICLR 2019).

Design: ``collect`` runs forward+backward over the batches with every adapter disabled (the base
model's gradient at the pretrained point) and gradients enabled on the target layers' base weights
only (restored afterwards), in eval mode (no dropout: the mask is deterministic). ``apply`` hands the
(out, in) score to the form's ``select_top``, which installs the top-k mask and zeroes the values. A
form option taking precomputed gradients was the alternative; it would put non-serializable tensors
into the form's args and leave the gradient pass to every caller.

Batches: dicts of model inputs (``input_ids``, ``attention_mask``, optional ``labels``; without
labels the loss is next-token prediction on ``input_ids`` with padding ignored), or plain tensors of
token ids. Usage::

    lorakit.attach(model, AdapterSpec(form="shira", form_args={"r": 32}, targets="all-linear"))
    initialize(model, "default", registry.get("init", "shira_grad")(), batches)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.forms.base import Form, is_conv1d, weight_out_in
from lorakit.inits.base import Init

ACCUMULATE = ("sum", "abs")


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


class _GradientMask(Init):
    """Top-k of a per-entry score computed from W and the accumulated gradient G of the base weight."""

    needs = Cap.NEEDS_DATA | Cap.NEEDS_GRAD
    weighted: ClassVar[bool] = False  # score |W ⊙ G| (SNIP) instead of |G|

    def __init__(self, accumulate: str = "sum", max_batches: int | None = None) -> None:
        if accumulate not in ACCUMULATE:
            raise ValueError(f"init {self.name!r}: accumulate must be one of {list(ACCUMULATE)}, "
                             f"got {accumulate!r}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"init {self.name!r}: max_batches must be >= 1, got {max_batches}")
        self.accumulate = accumulate
        self.max_batches = max_batches

    @classmethod
    def check_form(cls, form_cls: type[Form]) -> None:
        if not callable(getattr(form_cls, "select_top", None)):
            raise ValueError(f"init {cls.name!r} sets a sparse mask from scores; form {form_cls.name!r} "
                             "has no select_top(scores) (use form 'shira')")

    def collect(self, model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any] | None) -> Any:
        from lorakit.core.inject import disabled

        weights = {path: layer.weight for path, layer in layers.items()}
        saved = {path: (w.requires_grad, w.grad) for path, w in weights.items()}
        acc = {path: torch.zeros(weight_out_in(layer).shape, dtype=torch.float32, device=layer.weight.device)
               for path, layer in layers.items()}
        was_training = model.training
        seen = 0
        try:
            model.eval()
            for w in weights.values():
                w.requires_grad_(True)
                w.grad = None
            with disabled(model), torch.enable_grad():
                for batch in batches or ():
                    if self.max_batches is not None and seen >= self.max_batches:
                        break
                    calibration_loss(model, batch).backward()
                    seen += 1
                    for path, layer in layers.items():
                        grad = weights[path].grad
                        if grad is None:
                            continue
                        g = (grad.T if is_conv1d(layer) else grad).float()
                        acc[path] += g.abs() if self.accumulate == "abs" else g
                        weights[path].grad = None
                if seen == 0:
                    raise ValueError(f"init {self.name!r}: the calibration batches were empty")
                scores = {}
                for path, layer in layers.items():
                    score = acc[path].abs()
                    if self.weighted:
                        score = score * weight_out_in(layer).detach().float().abs()
                    scores[path] = score
        finally:
            for path, w in weights.items():
                w.requires_grad_(saved[path][0])
                w.grad = saved[path][1]
            model.train(was_training)
        return scores

    def apply(self, form: Form, base_layer: nn.Module, stats: Any) -> None:
        if stats is None:
            raise ValueError(f"init {self.name!r}: no gradient statistics for a layer (collect() not run?)")
        form.select_top(stats)


class ShiraGradMask(_GradientMask):
    """SHiRA-Grad: train the k entries with the largest accumulated |∂L/∂W|."""

    name = "shira_grad"


class ShiraSnipMask(_GradientMask):
    """SHiRA-SNIP: train the k entries with the largest |W ⊙ ∂L/∂W|."""

    name = "shira_snip"
    weighted = True
