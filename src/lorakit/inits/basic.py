"""Data-free initializations from the LoRA paper (Hu et al., 2021, arXiv 2106.09685, Sec. 4.1).

The paper starts A random and B = 0 so ΔW = B·A = 0 at step 0. The reference code and PEFT draw A
from Kaiming-uniform (a = √5, i.e. U(-1/√in, 1/√in)); the ``gaussian`` variant draws A ~ N(0, 1/r²)
as PEFT's ``init_lora_weights="gaussian"``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from lorakit.core.caps import Cap
from lorakit.forms.base import Form
from lorakit.inits.base import Init


class DefaultInit(Init):
    """The form's own paper initialization (``Form.reset_parameters``)."""

    name = "default"
    caps = Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)

    def apply(self, form: Form, base_layer: nn.Module, stats: Any) -> None:
        form.reset_parameters()


class KaimingInit(Init):
    """A ~ Kaiming-uniform(a=√5), B = 0."""

    name = "kaiming"
    caps = Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    requires = Cap.FACTORED_AB

    def apply(self, form: Form, base_layer: nn.Module, stats: Any) -> None:
        nn.init.kaiming_uniform_(form.lora_A, a=math.sqrt(5))
        nn.init.zeros_(form.lora_B)


class GaussianInit(Init):
    """A ~ N(0, 1/r²) (std 1/r), B = 0."""

    name = "gaussian"
    caps = Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    requires = Cap.FACTORED_AB

    def apply(self, form: Form, base_layer: nn.Module, stats: Any) -> None:
        nn.init.normal_(form.lora_A, std=1.0 / form.lora_A.shape[0])
        nn.init.zeros_(form.lora_B)
