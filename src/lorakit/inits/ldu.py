"""LDU init of a LoRA (ΔW = s·B·A) from LoLDU's decomposition, with the residual written back.

Shi, Wei, Wu, Ran, Sun, He, Yang. "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning", arXiv 2410.13618 (2024), Sec. 3 (W = P·L·D·U, truncation to the first
r pivots, residual W_res = W − P·L_r·D_r·U_r). Official code: SKDDJ/LoLDU ``minloldu/loldu.py``.

LU with partial pivoting of the pretrained weight (fp32), D = diag(U), U ← D⁻¹U (``lorakit.forms.loldu.ldu``,
tiny pivots handled there): W = P·L·diag(D)·U. Keep the first r pivots, L_r = L[:, :r], D_r, U_r = U[:r]:

    B0 = P·L_r·|D_r|^{1/2} / √s,      A0 = sign(D_r)·|D_r|^{1/2}·U_r / √s,      s·B0·A0 = P·L_r·diag(D_r)·U_r,

(the diagonal split symmetrically between the factors, signs on A; any split B0 = P L_r E, A0 = E⁻¹D_r U_r
gives the same product), and the base becomes W_res = W − P·L_r·diag(D_r)·U_r (``Cap.REWRITES_BASE``): the
output is unchanged at init, both factors then train as a plain LoRA, and ``lorakit.save`` exports the
rank-2r PEFT adapter for the ORIGINAL base. This is PiSSA's recipe with the truncated LDU in place of the
truncated SVD (not an importance order: LU pivots are chosen for stability, not energy).

Scale: the official LoLDU writes W_res = W − σ·P·L_r·diag(D_r)·U_r with σ = α/r (it never divides the
factors by σ), so for σ ≠ 1 the part moved into the adapter is σ times the truncated LDU. ``fold_scale=True``
(default, the paper's W_res = W − P L_r D_r U_r) divides by √s as above; ``fold_scale=False`` keeps the raw
factors, so ΔW0 = s·P·L_r·diag(D_r)·U_r as the official code's σ-scaled residual.

How it relates to the ``loldu`` form (``lorakit.forms.loldu``): that form is LoLDU itself, the same
decomposition with P, L_r, U_r FROZEN and only the r-vector z (the diagonal, z₀ = D_r) trained, written
additively (ΔW = σ·P·L_r·diag(z − D_r)·U_r) so it never rewrites the base. This init instead hands the
whole truncated LDU (L_r and U_r, D folded in) to a LoRA whose B and A both train: r·(in + out)
parameters instead of r. It is what the official code's residual construction gives when L and U are
unfrozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.forms.base import Form, weight_out_in
from lorakit.forms.loldu import ldu
from lorakit.inits.base import Init


def ldu_factors(weight: torch.Tensor, r: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) with scale·B0·A0 = P·L_r·diag(D_r)·U_r for an (out, in) weight."""
    m, n = weight.shape
    if r > min(m, n):
        raise ValueError(f"ldu: rank r={r} exceeds min(out, in) = {min(m, n)} of a {m}x{n} weight")
    pi, lower, d, upper = ldu(weight)
    root = d[:r].abs().sqrt() / scale ** 0.5
    b0 = (lower[:, :r] * root).index_select(0, pi)  # P·X == X[π]
    a0 = (torch.sign(d[:r]) * root)[:, None] * upper[:r]
    return a0, b0


@dataclass(frozen=True)
class LDUArgs:
    fold_scale: bool = True  # divide the factors by s so that s·B·A is the truncated LDU (output unchanged)


class LDUInit(Init):
    """Truncated LDU of W in a LoRA's factors, residual base; see the module docstring."""

    name = "ldu"
    caps = Cap.LOW_PRECISION_OK  # hardware: bf16/fp16; rewrites W or needs its gradient: no quantized base
    Args = LDUArgs
    needs = Cap.REWRITES_BASE
    requires = Cap.FACTORED_AB
    purpose = ("puts the truncated LDU of W into the two factors of ΔW = s·B·A; for LoLDU's diagonal-only "
               "training use form 'loldu'")

    def apply(self, form: Form, base_layer: nn.Module, stats: Any) -> None:
        r = form.lora_A.shape[0]
        scale = float(form.scaling) if self.args.fold_scale else 1.0
        a0, b0 = ldu_factors(weight_out_in(base_layer), r, scale)
        with torch.no_grad():
            form.lora_A.copy_(a0)
            form.lora_B.copy_(b0)
