"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario", arXiv 2311.03099) on each module's ΔW.

Drop And REscale: every entry of each task vector τ_n = s_n·B_n·A_n is dropped with probability
p = 1 − density and the survivors are divided by the density, so E[τ̃_n] = τ_n:

    τ̃_n = (m_n ⊙ τ_n) / density,   m_n ~ Bernoulli(density) entrywise.

Then ``dare_linear``: ΔW = λ·Σ_n w_nτ̃_n; ``dare_ties``: the TIES elect + disjoint merge over the
τ̃_n (see ``ties``). The result is returned as its best rank-k LoRA (k default: the largest input rank;
error reported). ``rescale`` may instead match the l1/l2/l∞ norm (mergekit's choice: l1) or be "none".
Masks are drawn from ``torch.Generator`` seeded with seed·1_000_003 + (module index in sorted
order), input by input, ``torch.bernoulli(full(shape, density))`` — so a merge is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.compose.merge.parts import CONSENSUS, RESCALES, DenseMerger
from lorakit.core.checks import check_choice, check_density, check_k


@dataclass(frozen=True)
class DareLinearArgs:
    k: int | None = None  # output rank (None: the largest input rank)
    density: float = 0.1  # keep probability 1 − p (the paper drops p = 0.9)
    rescale: str = "density"  # "density" (paper: 1/(1−p)) | "l1" | "l2" | "linf" | "none"
    seed: int = 0
    lam: float = 1.0

    def __post_init__(self) -> None:
        check_k(self._owner, self.k)
        check_density(self._owner, self.density)
        check_choice(self._owner, "rescale", self.rescale, RESCALES)

    _owner = "dare_linear"


@dataclass(frozen=True)
class DareTiesArgs(DareLinearArgs):
    consensus: str = "sum"
    normalize: bool = True

    _owner = "dare_ties"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self._owner, "consensus", self.consensus, CONSENSUS)


class DareLinearMerge(DenseMerger):
    name = "dare_linear"
    Args = DareLinearArgs
    sparsifier = "random"
    uses_consensus = False


class DareTiesMerge(DenseMerger):
    name = "dare_ties"
    Args = DareTiesArgs
    sparsifier = "random"
    uses_consensus = True
