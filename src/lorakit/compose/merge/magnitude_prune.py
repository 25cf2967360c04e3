"""Magnitude pruning merge (PEFT's ``combination_type="magnitude_prune_svd"``): per module, keep the
top ``density`` fraction of each task vector τ_n = s_n·B_n·A_n by |·| (no sign election), then
ΔW = λ·Σ_n w_n·τ̂_n, returned as its best rank-k LoRA (k default: the largest input rank; the
truncation error is reported). ``rescale`` optionally restores each τ̂_n's norm (mergekit).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.compose.merge.parts import RESCALES, DenseMerger
from lorakit.core.checks import check_choice, check_density, check_k


@dataclass(frozen=True)
class MagnitudePruneArgs:
    k: int | None = None
    density: float = 0.2
    rescale: str = "none"  # "none" | "density" | "l1" | "l2" | "linf"
    lam: float = 1.0

    def __post_init__(self) -> None:
        check_k("magnitude_prune", self.k)
        check_density("magnitude_prune", self.density)
        check_choice("magnitude_prune", "rescale", self.rescale, RESCALES)


class MagnitudePruneMerge(DenseMerger):
    name = "magnitude_prune"
    Args = MagnitudePruneArgs
    sparsifier = "magnitude"
    uses_consensus = False
