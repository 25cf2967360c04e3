"""Linear merge: the exact weighted sum of the adapters' ΔW (task arithmetic; Ilharco et al., ICLR 2023,
arXiv 2212.04089), optionally truncated to rank k.

    ΔW = Σ_n w_n·s_n·B_n·A_n = [w_1s_1B_1 … w_Ns_NB_N]·[A_1; …; A_N]        (exact, rank Σ r_n)

This is NOT PEFT's ``combination_type="linear"``, which averages the factors (A = Σ√(w_n s_n)A_n,
B = Σ√(w_n s_n)B_n) and so adds the cross terms B_iA_j; the concatenation above is exact for any ranks.
With ``k`` the sum is replaced by its best rank-k approximation (computed from the factors by QR + a
small SVD, never forming ΔW), and the relative Frobenius error Σ_{i>k}σ_i² / Σσ_i² (square-rooted)
is reported. Weights default to 1 (a sum); pass 1/N each for an average.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.compose.merge.parts import LoRAFactors, Merger, ModuleResult, pool, truncate_factors
from lorakit.core.checks import check_k


@dataclass(frozen=True)
class LinearArgs:
    k: int | None = None  # None: exact (rank Σr); else the best rank-k approximation of the sum

    def __post_init__(self) -> None:
        check_k("linear", self.k)


class LinearMerge(Merger):
    name = "linear"
    Args = LinearArgs

    def merge_module(self, inputs: list[LoRAFactors], weights: list[float], index: int) -> ModuleResult:
        pooled = pool(inputs, weights)
        k = self.args.k
        if k is None:
            return ModuleResult(B=pooled.B, A=pooled.A, bias=pooled.bias)
        t = truncate_factors(pooled.B, pooled.A, k)
        return ModuleResult(B=t.B, A=t.A, bias=pooled.bias, err_sq=t.err_sq, norm_sq=t.norm_sq)
