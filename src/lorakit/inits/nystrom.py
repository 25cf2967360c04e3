"""Nyström initialization of NLoRA (Guo, Chang, Wu; Findings of EMNLP 2025; arXiv 2502.14482).

For a three-factor form ΔW = s·B·N·A (capability FACTORED_BMA), with the base weight W (out, in)
and landmarks = the first r rows and columns:

    C = W[:, :r] (out, r),   R = W[:r, :] (r, in),   W_II = W[:r, :r] (r, r),
    B = C,   A = R,   N = W_II            (mode "weight", default)
    B = C,   A = R,   N = pinv(W_II)      (mode "pinv")

The paper motivates NLoRA with the Nyström approximation W ≈ C·W_II⁺·R; mode "pinv" sets the
factors so that B·N·A is exactly that approximation (exactly W when rank W = r and W_II is
invertible). The official code (TracyGuo2001/NLoRA peft/src/peft/tuners/lora/layer.py
``nlora_init``) copies N = W[:r, :r] itself, with the pseudo-inverse line commented out; the paper's
reported numbers come from that code, so it is the default here ("weight"). Mode "pinv" is offered
for the formula; note that pinv(W_II) is large when W_II is ill-conditioned.

Neither mode subtracts the initial ΔW from the base weight (the official code does not): the output
is NOT the base output at init. The first-r landmarks are the official choice (arbitrary w.r.t. the
data). The base weight is read in (out, in) layout, so Conv1D layers work too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_fields
from lorakit.forms.base import Form
from lorakit.inits.base import Init

MODES = ("weight", "pinv")


def nystrom_factors(weight: torch.Tensor, r: int, mode: str = "weight"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, N, B) = (W[:r, :], W[:r, :r] or its pseudo-inverse, W[:, :r]) of an (out, in) weight."""
    if mode not in MODES:
        raise ValueError(f"nystrom: mode must be one of {MODES}, got {mode!r}")
    out_f, in_f = weight.shape
    if r > min(out_f, in_f):
        raise ValueError(f"nystrom: rank r={r} exceeds min(in, out) = {min(out_f, in_f)} of a "
                         f"{out_f}x{in_f} weight (needs r landmark rows and columns)")
    w = weight.detach().float()
    core = w[:r, :r]
    middle = torch.linalg.pinv(core) if mode == "pinv" else core.clone()
    return w[:r, :].clone(), middle, w[:, :r].clone()


def set_nystrom(form: Form, mode: str = "weight") -> None:
    """Write the Nyström factors into a FACTORED_BMA form's ``lora_A``, middle and ``lora_B``."""
    middle = getattr(form, form.middle_name)
    a, n, b = nystrom_factors(form.base_weight, middle.shape[0], mode)
    with torch.no_grad():
        form.lora_A.copy_(a)
        middle.copy_(n)
        form.lora_B.copy_(b)


@dataclass(frozen=True)
class NystromArgs:
    mode: str = "weight"  # middle N = W[:r,:r] ("weight") or its pseudo-inverse ("pinv")

    def __post_init__(self) -> None:
        check_fields("init 'nystrom'", self, choices={"mode": MODES})


class NystromInit(Init):
    """NLoRA's Nyström init for any form with a middle matrix (FACTORED_BMA); see the module doc."""

    name = "nystrom"
    caps = Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    Args = NystromArgs
    requires = Cap.FACTORED_BMA
    purpose = "sets a middle matrix N in ΔW = s·B·N·A"

    def apply(self, form: Form, base_layer: nn.Module, stats: Any) -> None:
        set_nystrom(form, self.args.mode)
