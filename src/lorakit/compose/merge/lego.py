"""LoRA-LEGO: "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through
Rank-Wise Clustering" (Zhao et al., ICLR 2025, arXiv 2409.16167).

Minimal Semantic Units. With the scale folded in, a LoRA is a sum of rank-1 units,
ΔW = Σ_i b_i·a_iᵀ with b_i = s·B[:, i] and a_i = A[i, :]. The paper shows that these MSUs are
permutation invariant (reordering the rank indices, columns of B with rows of A, leaves ΔW unchanged)
and that concatenation equals summation ([B_1 B_2]·[A_1; A_2] = B_1A_1 + B_2A_2), so the MSUs of
several LoRAs can be pooled and regrouped freely.

The method, per module (independently):
1. Pool the MSUs of all N adapters (any ranks), each b scaled by its adapter's weight w_n.
2. (option, not in the paper) canonicalize each unit: an MSU is only defined up to
   (b, a) ~ (−b, −a) ~ (c·b, a/c), so raw features can split identical units. ``"scale"`` balances
   ‖b‖ = ‖a‖ (c = √(‖a‖/‖b‖)); ``"sign"`` makes the largest-|·| entry of a positive (as
   scikit-learn's svd_flip); ``"both"`` does both. ΔW of every unit is unchanged.
3. Cluster the units with k-means (k-means++ seeding) into k clusters. Features: ``"normalized"``
   f_i = [a_i/‖a_i‖; b_i/‖b_i‖] (the only available code, see below) or ``"raw"`` [a_i; b_i].
4. Centroid of cluster c: m_c = mean of the members' [a; b] (the unit's own parameters).
5. Parameter reweighting (the paper's fix for "norm decay": averaging units that point in different
   directions shrinks the centroid): m_c ← m_c·mean_{j∈c}‖m_j‖ / ‖m_c‖; ``norm="l2"`` or ``"linf"``.
6. Merged LoRA of rank k: A' = [ā_c] (rows), B' = [b̄_c] (columns).
7. Output reweighting (the paper's fix for "variance expansion": a sum of k units instead of r grows
   the output's variance by about k/r): ΔW' = √(r/k)·B'A', r = the inputs' rank (``rank_ref``:
   the mean, max or min of the input ranks when they differ; the paper assumes equal ranks).

Sources and what is paper vs code. No official code was found; the full paper text was not available
here either. The paper (abstract and reviews) gives: MSUs and their two properties, MSU pooling,
rank-wise clustering into k clusters, centroids as the merged rank-k LoRA, and a dual reweighting
named parameter reweighting (norm decay) and output reweighting (variance expansion). The exact
formulas of steps 3, 5 and 7 follow the only public implementation found, a third-party
reimplementation (wooseong97/TARA-Merge, src/merge_strategy.py::LoRA_LEGO): normalized features,
raw-parameter centroids, the centroid rescaled to its members' mean norm (it uses the max-abs norm:
``norm="linf"``; L2, the natural reading of "norm", is the default here), and the √(r/k) factor. That
code seeds k-means with random points and runs 10 iterations; here k-means++ and Lloyd to convergence
(scikit-learn when installed). Its default k is the input rank r, also the default here.

Properties kept exactly (tested): k = Σr without reweighting reproduces ``cat`` (each unit is its own
cluster); the result does not depend on the order of the units or of the adapters (the pool is put in
a canonical order before clustering); with canonicalization, flipping the sign of units or rescaling
them (c·b, a/c) does not change the merge. Bias terms (PEFT's lora_bias) are summed with the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.compose.merge.kmeans import BACKENDS, kmeans
from lorakit.compose.merge.parts import (
    LoRAFactors,
    MergeInputError,
    Merger,
    ModuleResult,
    merged_bias,
    module_generator,
    pool,
)
from lorakit.core.checks import check_choice, check_k

CANONICAL = ("none", "sign", "scale", "both")
_EPS = 1e-12


@dataclass(frozen=True)
class LegoArgs:
    k: int | None = None  # clusters = output rank; None: the largest input rank (as the reimplementation)
    param_reweight: bool = True  # norm-decay fix: centroid norm ← mean member norm
    output_reweight: bool = True  # variance-expansion fix: ΔW ← √(r/k)·ΔW
    norm: str = "l2"  # norm of the parameter reweighting: "l2" | "linf" (the reimplementation)
    rank_ref: str = "mean"  # r in √(r/k) for heterogeneous ranks: "mean" | "max" | "min"
    features: str = "normalized"  # k-means features: "normalized" [a/‖a‖; b/‖b‖] | "raw" [a; b]
    canonicalize: str = "none"  # "none" (paper) | "sign" | "scale" | "both"
    backend: str = "auto"  # k-means: "auto" (scikit-learn if installed) | "torch" | "sklearn"
    n_init: int = 1  # k-means restarts (best inertia kept)
    max_iter: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        check_k("lego", self.k)
        check_choice("lego", "norm", self.norm, ("l2", "linf"))
        check_choice("lego", "rank_ref", self.rank_ref, ("mean", "max", "min"))
        check_choice("lego", "features", self.features, ("normalized", "raw"))
        check_choice("lego", "canonicalize", self.canonicalize, CANONICAL)
        check_choice("lego", "backend", self.backend, BACKENDS)
        if self.n_init < 1 or self.max_iter < 1:
            raise ValueError(f"lego: n_init and max_iter must be >= 1, got {self.n_init}, {self.max_iter}")


def msus(inputs: list[LoRAFactors], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled MSUs as rows: b (n, out) with scale and weight folded in, a (n, in)."""
    pooled = pool(inputs, weights)
    return pooled.B.T.contiguous(), pooled.A.contiguous()


def canonicalize(b: torch.Tensor, a: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Representatives of (b, a) ~ (−b, −a) ~ (c·b, a/c); every b_i·a_iᵀ is unchanged."""
    if mode in ("scale", "both"):
        nb, na = b.norm(dim=1), a.norm(dim=1)
        ok = (nb > _EPS) & (na > _EPS)
        c = torch.where(ok, (na / torch.where(ok, nb, torch.ones_like(nb))).sqrt(), torch.ones_like(nb))
        b, a = b * c[:, None], a / c[:, None]
    if mode in ("sign", "both"):
        top = a.gather(1, a.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        s = torch.where(top < 0, -1.0, 1.0).to(a.dtype)
        b, a = b * s[:, None], a * s[:, None]
    return b, a


def features(b: torch.Tensor, a: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "raw":
        return torch.cat([a, b], dim=1)
    return torch.cat([a / a.norm(dim=1, keepdim=True).clamp_min(_EPS),
                      b / b.norm(dim=1, keepdim=True).clamp_min(_EPS)], dim=1)


def _norms(x: torch.Tensor, how: str) -> torch.Tensor:
    return x.norm(dim=-1) if how == "l2" else x.abs().amax(dim=-1)


class LegoMerge(Merger):
    name = "lego"
    Args = LegoArgs

    def validate(self, ranks: dict[str, list[int]]) -> None:
        k = self.args.k
        for path, rs in ranks.items():
            if k is not None and k > sum(rs):
                raise MergeInputError(f"lego: k={k} is larger than the pool of {sum(rs)} MSUs (Σ ranks {rs}) in "
                                      f"module {path}; choose k <= {sum(rs)}")

    def canonical_order(self, f: torch.Tensor, index: int) -> torch.Tensor:
        """A fixed order of the pooled units (by a seeded random projection of their features), so
        the clustering does not depend on the order of units within an adapter or of the adapters."""
        v = torch.randn(f.shape[1], generator=module_generator(self.args.seed, index), dtype=torch.float64)
        return torch.argsort(f.double() @ v, stable=True)

    def merge_module(self, inputs: list[LoRAFactors], weights: list[float], index: int) -> ModuleResult:
        a = self.args
        ranks = [f.rank for f in inputs]
        k = a.k or max(ranks)
        b, av = canonicalize(*msus(inputs, weights), a.canonicalize)
        in_features = av.shape[1]
        raw = torch.cat([av, b], dim=1)  # one MSU per row: [a; b]
        if k == raw.shape[0]:  # every unit is its own cluster: no clustering, the pool order is kept
            labels = torch.arange(k)
        else:
            f = features(b, av, a.features)
            order = self.canonical_order(f, index)
            raw, f = raw[order], f[order]
            labels = kmeans(f, k, seed=a.seed * 1_000_003 + index, n_init=a.n_init, max_iter=a.max_iter,
                            backend=a.backend)
        counts = torch.bincount(labels, minlength=k).to(raw.dtype)
        centroids = torch.zeros(k, raw.shape[1], dtype=raw.dtype).index_add_(0, labels, raw)
        centroids = centroids / counts.clamp_min(1)[:, None]
        if a.param_reweight:
            member = torch.zeros(k, dtype=raw.dtype).index_add_(0, labels, _norms(raw, a.norm)) / counts.clamp_min(1)
            own = _norms(centroids, a.norm)
            gamma = torch.where(own > _EPS, member / own.clamp_min(_EPS), torch.ones_like(own))
            centroids = centroids * gamma[:, None]
        A = centroids[:, :in_features]
        B = centroids[:, in_features:].T
        if a.output_reweight:
            r = {"mean": sum(ranks) / len(ranks), "max": max(ranks), "min": min(ranks)}[a.rank_ref]
            B = B * math.sqrt(r / k)
        return ModuleResult(B=B.contiguous(), A=A.contiguous(), bias=merged_bias(inputs, weights))
