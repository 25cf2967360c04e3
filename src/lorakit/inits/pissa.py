"""PiSSA: Principal Singular values and Singular vectors Adaptation (Meng, Wang & Zhang, NeurIPS 2024,
arXiv 2404.02948), Sec. 3, Eq. (2)–(5).

W = U S Vᵀ (SVD of the pretrained weight). The adapter starts on the principal part,
A = S_r^{1/2} V_rᵀ, B = U_r S_r^{1/2} (so B·A = U_r S_r V_rᵀ), and the frozen base becomes the
residual W_res = W − U_r S_r V_rᵀ: the model's output is unchanged at init while training moves the
most important directions. With LoRA's scale s = α/r, the factors carry S_r/s so that s·B·A is the
principal part (as PEFT). ``niter`` > 0 uses the fast randomized SVD (``torch.svd_lowrank``, the
paper's Sec. 3 "fast SVD", PEFT's ``pissa_niter_k``) instead of the exact one.

The base rewrite is declared (``Cap.REWRITES_BASE``): lorakit records the initial factors, and
``lorakit.save`` writes the PEFT files for the ORIGINAL base (rank 2r: s·[B, −B0]·[A; A0]), as PEFT's
``path_initial_model_for_weight_conversion`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_fields
from lorakit.forms.base import Form, weight_out_in
from lorakit.inits.base import Init


@dataclass(frozen=True)
class PiSSAArgs:
    niter: int = 0  # 0: exact SVD; > 0: randomized SVD with this many subspace iterations

    def __post_init__(self) -> None:
        check_fields("init 'pissa'", self, at_least={"niter": 0})


class PiSSAInit(Init):
    name = "pissa"
    caps = Cap.LOW_PRECISION_OK  # hardware: bf16/fp16; rewrites W or needs its gradient: no quantized base
    Args = PiSSAArgs
    needs = Cap.REWRITES_BASE
    requires = Cap.FACTORED_AB

    def apply(self, form: Form, base_layer: nn.Module, stats: Any) -> None:
        w = weight_out_in(base_layer).detach().float()
        r = form.lora_A.shape[0]
        if self.args.niter:
            u, s, v = torch.svd_lowrank(w, q=r, niter=self.args.niter)
            vh = v.T
        else:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = (s[:r] / form.scaling).sqrt()
        with torch.no_grad():
            form.lora_A.copy_(root[:, None] * vh[:r])
            form.lora_B.copy_(u[:, :r] * root)
