"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024, arXiv 2402.09353).

Eq. (5) of the paper: the adapted weight is split into a magnitude and a direction,

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_c,

with the LoRA pair (A ∈ R^{r×in} Kaiming-uniform, B ∈ R^{out×r} zero) updating the direction and a
trainable magnitude vector m initialized to ‖W‖_c, so W' = W at init. ‖·‖_c is the norm of each
output neuron's weight vector: in lorakit's (out, in) layout that is the norm of each *row* (the
paper writes W ∈ R^{d×k} and calls it column-wise; PEFT and the official code both take
``torch.linalg.norm(W, dim=1)`` of the (out, in) weight, as here).

Sec. 4.3 ("reduction of training overhead") treats ‖W + s·B·A‖_c as a constant in the backward
pass: the norm is detached, so it follows ΔV in value but gets no gradient. PEFT always detaches;
the official code has ``dora_simple=True`` (detach) as default and can keep the gradient. Here
``detach_norm=True`` is the default and ``detach_norm=False`` keeps the full gradient.

Fast path (as the official code and PEFT): with σ = m / ‖W + s·B·A‖_c per output,

    y = W·x + b + (σ − 1) ⊙ (W·x̃) + σ ⊙ s·B·A·x̃,        x̃ = dropout(x),

so ``apply`` adds (σ−1)·(W·x̃) + σ·s·B·A·x̃ to the given base output. W·x̃ is recomputed from the
base weight (one extra matmul; PEFT reuses the base output minus the bias when dropout is off,
which is only valid when nothing else was added to it). The row norms are computed without
materializing W + s·B·A: ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·⟨B_i, (W·Aᵀ)_i⟩ + s²·B_i(A·Aᵀ)B_iᵀ.

Merging writes W' into the base weight and caches the norm used; unmerging needs that cached norm
(the norm of W' itself is m, not the norm it was divided by): W = W'·(‖V‖_c / m) − s·B·A, as PEFT.
The norm is taken from the weight the layer holds when merging (other adapters merged before are
part of it, as they are part of ``base_weight`` in the unmerged forward).

PEFT: ``peft_type="LORA"`` with ``use_dora=true``; tensors ``lora_A.weight``, ``lora_B.weight`` and
``lora_magnitude_vector`` (PEFT 0.21 saves the magnitude without a ``.weight`` suffix).

Defaults: r=32, α=64, dropout 0.05 — the official LLaMA-7B commonsense-reasoning runs
(NVlabs/DoRA commonsense_reasoning/llama_7B_Dora.sh and README: ``r=32 α=64``, finetune.py
``lora_dropout=0.05``, lr 2e-4, targets q,k,v,up,down).

Pitfalls handled: the norm is detached (Sec. 4.3); m is (re)computed from W + s·B·A after the
factors are set (``reset_magnitude`` for inits that change A or B); unmerge uses the cached norm;
Conv1D weights are read in (out, in) layout; lora_bias is refused (PEFT's DoRA norm would then
include the bias in every column). ``delta_weight`` = W' − W reads the layer's current weight, so
it is meaningful while this adapter is not merged. The form does not declare FACTORED_AB: ΔW is not
s·B·A, so generic code that combines B·A products (LoRA inits, merges, federated stacking) must
not treat it as a plain LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_common, check_peft_bias
from lorakit.forms.base import Form
from lorakit.forms.lora import lora_scaling


@dataclass(frozen=True)
class DoRAArgs:
    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.05
    rslora: bool = False
    detach_norm: bool = True  # paper Sec. 4.3, PEFT, official dora_simple=True

    def __post_init__(self) -> None:
        check_common("dora", self)


class DoRA(Form):
    name = "dora"
    Args = DoRAArgs
    caps = Cap.MERGEABLE | Cap.CONV1D_OK | Cap.IDENTITY_AT_INIT
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    peft_type = "LORA"
    peft_patterns = {"r": "rank_pattern", "alpha": "alpha_pattern"}

    def __init__(self, base_layer: nn.Module, args: DoRAArgs) -> None:
        super().__init__(base_layer, args)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(args.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, args.r, device=device))
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=device))
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        self._merge_norm: torch.Tensor | None = None  # norm used by the last merge (not saved)
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return lora_scaling(self.args.alpha, self.lora_A.shape[0], self.args.rslora)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self.reset_magnitude()

    def reset_magnitude(self) -> None:
        """m ← ‖W + s·B·A‖_c (call after changing A, B or the base weight, as PEFT's dora_init)."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self._row_norm(self._weight()))

    def _weight(self) -> torch.Tensor:
        return self.base_weight.to(self.lora_A.dtype)

    def _row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W + s·B·A‖ per output row, without forming the (out, in) sum."""
        a, b, s = self.lora_A, self.lora_B, self.scaling
        sq = (torch.linalg.vector_norm(weight, dim=1).square()
              + 2 * s * (b * (weight @ a.T)).sum(1)
              + s * s * ((b @ (a @ a.T)) * b).sum(1))
        return sq.clamp_min(0).sqrt()

    def _scale(self, weight: torch.Tensor) -> torch.Tensor:
        """σ = m / ‖W + s·B·A‖_c, with the norm detached unless ``detach_norm=False``."""
        if self.args.detach_norm:
            with torch.no_grad():
                norm = self._row_norm(weight)
        else:
            norm = self._row_norm(weight)
        return self.lora_magnitude_vector / norm

    def delta_weight(self) -> torch.Tensor:
        w = self._weight()
        return self._directed(w) - w

    def _directed(self, weight: torch.Tensor) -> torch.Tensor:
        v = weight + (self.lora_B @ self.lora_A) * self.scaling
        return (self.lora_magnitude_vector / torch.linalg.vector_norm(v, dim=1))[:, None] * v

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        weight = self._weight()
        sigma = self._scale(weight)
        xd = self.dropout(x)
        lora = (xd @ self.lora_A.T) @ self.lora_B.T
        return base_out + (sigma - 1) * F.linear(xd, weight) + sigma * lora * self.scaling

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        v = weight + (self.lora_B @ self.lora_A) * self.scaling
        norm = torch.linalg.vector_norm(v, dim=1)
        self._merge_norm = norm.detach().clone()
        return (self.lora_magnitude_vector / norm)[:, None] * v

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self._merge_norm is None:
            raise RuntimeError("dora: unmerge needs the weight norm cached by merge; this adapter was not "
                               "merged by this form instance")
        factor = self._merge_norm.to(weight) / self.lora_magnitude_vector
        return factor[:, None] * weight - (self.lora_B @ self.lora_A) * self.scaling

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: DoRAArgs) -> int:
        return args.r * (in_features + out_features) + out_features

    @classmethod
    def examples(cls) -> list[DoRAArgs]:
        return [DoRAArgs(r=4, alpha=8, dropout=0.0), DoRAArgs(r=2, alpha=3, dropout=0.0, rslora=True)]

    file_keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
                 "lora_magnitude_vector": "lora_magnitude_vector"}

    @classmethod
    def peft_accepts(cls, config: dict[str, Any]) -> bool:
        return bool(config.get("use_dora"))

    @classmethod
    def peft_config(cls, args: DoRAArgs) -> dict[str, Any]:
        return {"r": args.r, "lora_alpha": args.alpha, "lora_dropout": args.dropout,
                "use_rslora": args.rslora, "lora_bias": False, "bias": "none", "use_dora": True}

    @classmethod
    def args_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        if not config.get("use_dora"):
            raise ValueError("PEFT adapter is a plain LoRA (use_dora is false); read it with form 'lora'")
        check_peft_bias(config)
        if config.get("lora_bias"):
            raise ValueError("PEFT option lora_bias=true is not supported together with DoRA")
        return {"r": int(config.get("r", 8)), "alpha": float(config.get("lora_alpha", 8)),
                "dropout": float(config.get("lora_dropout", 0.0) or 0.0),
                "rslora": bool(config.get("use_rslora", False))}
