"""Concatenation merge (PEFT's ``combination_type="cat"``): the adapters' factors side by side, the
weights and scales folded into B:

    B = [w_1s_1B_1 … w_Ns_NB_N],  A = [A_1; …; A_N],  α = r = Σ r_n  →  ΔW = Σ_n w_n·ΔW_n  exactly.

Rank-1 units (MSUs) are independent, so concatenation equals summation (LoRA-LEGO's
concatenation–summation equivalence). Same result as ``linear`` without ``k``; kept under PEFT's name.
"""

from __future__ import annotations

from lorakit.compose.merge.parts import LoRAFactors, Merger, ModuleResult, pool


class CatMerge(Merger):
    name = "cat"

    def merge_module(self, inputs: list[LoRAFactors], weights: list[float], index: int) -> ModuleResult:
        pooled = pool(inputs, weights)
        return ModuleResult(B=pooled.B, A=pooled.A, bias=pooled.bias)
