"""LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy, Banaei, Aberer,
Tabor; ECAI 2025; arXiv 2405.17604).

The method (from the abstract and the official code; equation numbers not checked here):
ΔW = s·B·R·A with A and B frozen, taken from the truncated SVD of the pretrained weight, and only
the small R ∈ R^{r×r} trained (r² parameters per layer, independent of the layer's width).
In lorakit's (out, in) layout, with W = U Σ Vᵀ:

    B = U_r (out, r),   A = Σ_r V_rᵀ (r, in),   R ~ N(0, σ²), σ = 1e-5.

Σ sits in A (the input side), as the official code (MohammadrezaBanaei/LoRA-XS
utils/initialization_utils.py: TruncatedSVD of Wᵀ; ``lora_A = (Wᵀ V)ᵀ = Σ Uᵀ`` of Wᵀ, ``lora_B =
components_ᵀ``). (Only the abstract of the paper could be read here; the Σ placement follows the
code, and Σ placement changes R's optimization geometry, so it is worth checking.) The official
code uses scikit-learn's randomized TruncatedSVD (n_iter=10, random_state=42); lorakit takes the
exact ``torch.linalg.svd`` in fp32, which spans the same top-r singular subspace (exactly, where
the randomized one approximates it). The base weight is not changed (no residual, unlike PiSSA).

R starts at N(0, (1e-5)²) (official ``init_module_weights(..., sigma=0.00001)``), so the output is
only approximately the base output at init: the form does not declare IDENTITY_AT_INIT. With
``init_std=0`` R starts at zero and the output equals the base exactly; R still trains because its
gradient s·Bᵀ·G·Aᵀ does not vanish (A and B are non-zero).

LoRA-SB (arXiv 2411.19557) is this form with A, B and R set from a gradient step (an init): the
tensors are named ``lora_A``, ``lora_B`` and ``lora_R`` (the middle, ``middle_name``).

Defaults: r=64 with α=r (scale 1): the official math runs (scripts/run_math_tuning.sh:
Mistral-7B ``LORA_RANK=64``; main_math_tuning.py ``lora_alpha=lora_r``, dropout 0, lr 4e-3).
``alpha=None`` means α = r. (GLUE runs use r ∈ {4..25}, α = 16.)

Files: lorakit saves R and the frozen A, B (so a reload does not depend on the SVD routine); there
is no PEFT equivalent (PEFT's TinyLoRA is a relative with Σ in B and a projected trainable vector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_common, check_min
from lorakit.forms.base import Form


@dataclass(frozen=True)
class LoRAXSArgs:
    r: int = 64
    alpha: float | None = None  # None: α = r, i.e. scale 1 (official LLM runs)
    dropout: float = 0.0
    init_std: float = 1e-5  # R ~ N(0, init_std²); 0 gives R = 0 (exact identity at init)

    def __post_init__(self) -> None:
        check_common("lora_xs", self)
        check_min("lora_xs", "init_std", self.init_std, 0)


class LoRAXS(Form):
    name = "lora_xs"
    Args = LoRAXSArgs
    caps = Cap.MERGEABLE | Cap.CONV1D_OK | Cap.FACTORED_BMA
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    middle_name: ClassVar[str] = "lora_R"

    def __init__(self, base_layer: nn.Module, args: LoRAXSArgs) -> None:
        super().__init__(base_layer, args)
        if args.r > min(self.in_features, self.out_features):
            raise ValueError(f"lora_xs: rank r={args.r} exceeds min(in, out) = "
                             f"{min(self.in_features, self.out_features)} of a {self.out_features}x"
                             f"{self.in_features} layer (the SVD has no more singular vectors)")
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(args.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, args.r, device=device))
        self.lora_R = nn.Parameter(torch.empty(args.r, args.r, device=device))
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        self.frozen.update({"lora_A", "lora_B"})
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return 1.0 if self.args.alpha is None else self.args.alpha / self.lora_R.shape[0]

    def reset_parameters(self) -> None:
        """A, B from the truncated SVD of the base weight; R ~ N(0, init_std²) (zero if init_std=0)."""
        r = self.lora_R.shape[0]
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(self.base_weight.detach().float(), full_matrices=False)
            self.lora_B.copy_(u[:, :r])
            self.lora_A.copy_(s[:r, None] * vh[:r])
        if self.args.init_std > 0:
            nn.init.normal_(self.lora_R, mean=0.0, std=self.args.init_std)
        else:
            nn.init.zeros_(self.lora_R)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_R @ self.lora_A) * self.scaling

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_R)
        return base_out + F.linear(h, self.lora_B) * self.scaling

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: LoRAXSArgs) -> int:
        return args.r * args.r

    @classmethod
    def examples(cls) -> list[LoRAXSArgs]:
        return [LoRAXSArgs(r=4), LoRAXSArgs(r=8, alpha=16, init_std=0.0)]
