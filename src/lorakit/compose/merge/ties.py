"""TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708) on each module's dense ΔW.

Per module, with task vectors τ_n = s_n·B_n·A_n:
1. Trim: keep the top ``density`` fraction of |τ_n| entries (paper: top 20%), zero the rest → τ̂_n.
2. Elect: γ = sign(Σ_n w_nτ̂_n) per entry (``consensus="sum"``, the paper; ``"count"``: majority of
   signs, PEFT's "frequency"); zero elects +.
3. Disjoint merge: τ_m = Σ_n m_n·w_nτ̂_n / Σ_n m_n·w_n with m_n = [sign(w_nτ̂_n) = γ]; with equal
   weights this is the paper's mean over the agreeing entries (weights as mergekit's; ``normalize=False``
   gives the plain sum over agreeing entries).
4. ΔW = λ·τ_m, returned as its best rank-k LoRA (k default: the largest input rank; the truncation
   error is reported). Acting on ΔW, not on A and B separately as PEFT's ``ties`` does (PEFT's
   ``ties_svd`` is this method).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.compose.merge.parts import CONSENSUS, DenseMerger
from lorakit.core.checks import check_choice, check_density, check_k


@dataclass(frozen=True)
class TiesArgs:
    k: int | None = None  # output rank (None: the largest input rank)
    density: float = 0.2  # fraction kept by the trim (paper: top-20%)
    consensus: str = "sum"  # "sum" (paper) | "count"
    normalize: bool = True  # disjoint mean (paper) rather than disjoint sum
    lam: float = 1.0  # λ, scale of the merged task vector

    def __post_init__(self) -> None:
        check_k("ties", self.k)
        check_density("ties", self.density)
        check_choice("ties", "consensus", self.consensus, CONSENSUS)


class TiesMerge(DenseMerger):
    name = "ties"
    Args = TiesArgs
    sparsifier = "magnitude"
    uses_consensus = True
