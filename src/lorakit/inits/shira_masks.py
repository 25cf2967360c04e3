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
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_fields
from lorakit.forms.base import Form, weight_out_in
from lorakit.inits.base import Init
from lorakit.inits.calibration import weight_gradients

ACCUMULATE = ("sum", "abs")


@dataclass(frozen=True)
class GradientMaskArgs:
    accumulate: str = "sum"  # G = Σ_b ∂L_b/∂W ("sum") or Σ_b |∂L_b/∂W| ("abs")
    max_batches: int | None = None  # None: every calibration batch

    def __post_init__(self) -> None:
        check_fields("shira mask init", self, choices={"accumulate": tuple(ACCUMULATE)}, at_least={"max_batches": 1})


class _GradientMask(Init):
    """Top-k of a per-entry score computed from W and the accumulated gradient G of the base weight."""

    Args = GradientMaskArgs
    needs = Cap.NEEDS_DATA | Cap.NEEDS_GRAD
    requires = Cap.SPARSE_MASK
    purpose = "sets a sparse mask from scores through the form's select_top(scores)"
    weighted: ClassVar[bool] = False  # score |W ⊙ G| (SNIP) instead of |G|

    def collect(self, model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any] | None) -> Any:
        grads = weight_gradients(model, layers, batches, reduce=self.args.accumulate, max_batches=self.args.max_batches,
                                 desc=f"{self.name} gradients")
        scores = {}
        for path, layer in layers.items():
            score = grads[path].abs()
            if self.weighted:
                score = score * weight_out_in(layer).detach().float().abs()
            scores[path] = score
        return scores

    def apply(self, form: Form, base_layer: nn.Module, stats: Any) -> None:
        if stats is None:
            raise ValueError(f"init {self.name!r}: no gradient statistics for a layer (collect() not run?)")
        form.select_top(stats)


class ShiraGradMask(_GradientMask):
    """SHiRA-Grad: train the k entries with the largest accumulated |∂L/∂W|."""

    name = "shira_grad"
    caps = Cap.LOW_PRECISION_OK  # hardware: bf16/fp16; rewrites W or needs its gradient: no quantized base


class ShiraSnipMask(_GradientMask):
    """SHiRA-SNIP: train the k entries with the largest |W ⊙ ∂L/∂W|."""

    name = "shira_snip"
    caps = Cap.LOW_PRECISION_OK  # hardware: bf16/fp16; rewrites W or needs its gradient: no quantized base
    weighted = True
