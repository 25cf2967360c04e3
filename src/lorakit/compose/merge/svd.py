"""SVD merge (PEFT's ``combination_type="svd"``): the best rank-k approximation of the exact weighted sum

    M = Σ_n w_n·s_n·B_n·A_n = UΣVᵀ,   B = U_kΣ_k^½,  A = Σ_k^½V_kᵀ,   α = r = k,

with the relative error ‖M − B·A‖_F/‖M‖_F = √(Σ_{i>k}σ_i² / Σ_iσ_i²) (Eckart–Young) reported. M is never
formed: the SVD comes from QR factorizations of the concatenated factors. ``k`` defaults to the largest
input rank (as PEFT's ``svd_rank``). The dense methods (ties, dare_*, magnitude_prune) end with the
same truncation of their own merged ΔW.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.compose.merge.parts import LoRAFactors, Merger, ModuleResult, pool, truncate_factors
from lorakit.core.checks import check_k


@dataclass(frozen=True)
class SVDArgs:
    k: int | None = None  # output rank; None: the largest input rank of the module

    def __post_init__(self) -> None:
        check_k("svd", self.k)


class SVDMerge(Merger):
    name = "svd"
    Args = SVDArgs

    def merge_module(self, inputs: list[LoRAFactors], weights: list[float], index: int) -> ModuleResult:
        pooled = pool(inputs, weights)
        t = truncate_factors(pooled.B, pooled.A, self.args.k or max(f.rank for f in inputs))
        return ModuleResult(B=t.B, A=t.A, bias=pooled.bias, err_sq=t.err_sq, norm_sq=t.norm_sq)
