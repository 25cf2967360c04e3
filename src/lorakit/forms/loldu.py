"""LoLDU: only the diagonal of a truncated LDU decomposition of W trains (r parameters per layer).

Shi, Wei, Wu, Ran, Sun, He, Yang. "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning", arXiv 2410.13618 (2024). Official code: SKDDJ/LoLDU
``minloldu/loldu.py`` (``LoLDUParametrization``).

Form (paper Fig. 3 / Sec. 3, as the official code implements it). LU with partial pivoting of the
pretrained weight, W = P·L·U (fp32, ``torch.linalg.lu_factor``), D = diag(U), U ← D⁻¹U (unit upper),
so W = P·L·diag(D)·U. Keep the first r pivots: L_r = L[:, :r], D_r = D[:r], U_r = U[:r]. The paper
writes the residual W_res = W − σ·P·L_r·diag(D_r)·U_r into the layer and trains z ∈ R^r in

    W_eff = W_res + σ·P·L_r·diag(z)·U_r,      z₀ = D_r,   σ = α/r,

so the output equals the base output at init. lorakit never rewrites the base weight: it uses the
identical update in additive form,

    ΔW = W_eff − W = σ·P·L_r·diag(z − D_r)·U_r        (rank ≤ r, exactly 0 at init),

which keeps the base model untouched (its fingerprint, other adapters on the same layer, ``disabled``,
``unload`` all keep working), makes merge/unmerge plain W ± ΔW (no overrides needed) and exports like
any low-rank ΔW. Fast path: x ↦ ((x·U_rᵀ)·σ(z − D_r))·L_rᵀ then the row permutation, O(r(m+n)) per
token; ΔW is never materialized (the official code builds P·L·diag(z)·U, O(m·r·n), every forward).

Pitfalls handled:
- P is stored as an index vector π (W[j] = (L·diag(D)·U)[π[j]]), never as an m×m matrix; it is
  derived from the LAPACK pivots of ``lu_factor`` without building P.
- Reload never re-factors a modified weight: the base weight is never modified, so a fresh model
  has the original W. With ``save_factors=False`` (default) the file holds z and D_r (2r numbers per
  layer; the official code saves only z) and P, L_r, U_r are recomputed from the base weight when
  the adapter is built; the saved D_r is checked against the recomputed one (a different base, an
  adapter merged into the layer, or an LU that pivots differently on another device is refused with
  a clear error) and then used as the anchor, so ΔW = 0 stays exact for z = D_r. ``save_factors=True``
  also stores π, L_r, U_r (about LoRA-size files): reload is then independent of the base weight.
- Tiny pivots (a rank-deficient W, or r past its numerical rank): where |D_i| ≤ eps·max(m,n)·max|D|
  the row of U is not normalized and D_i is set to 1, so P·L·diag(D)·U still equals W (no inf/NaN).
- LU pivot order is not an importance order (unlike SVD): the first r pivots are kept as the paper.
- Non-square W: L is m×k, U is k×n with k = min(m, n); r ≤ k is required.
- The official non-"lu" z inits (uniform/normal/constant/ones/zeros, ablations) are not offered: with
  them the output would not equal the base at init.

Defaults: r = 15 (the README quick-start example; the repo's default config uses r = 768, the ViT-B
width, i.e. a full-rank LDU there), α = 1 (``from_linear``'s default), so σ = α/r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_common
from lorakit.forms.base import Form, init_skipped


@dataclass(frozen=True)
class LoLDUArgs:
    r: int = 15
    alpha: float = 1.0
    save_factors: bool = False  # also save π, L_r, U_r (reload then never re-factors the base weight)

    def __post_init__(self) -> None:
        check_common("loldu", self)


def ldu(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(π, L, D, U) with W[j] = (L·diag(D)·U)[π[j]], i.e. W = P·L·diag(D)·U, P[j, π[j]] = 1.

    L is unit lower (m×k), U unit upper (k×n) where the pivot is not negligible, k = min(m, n).
    Computed in fp32 on the weight's device.
    """
    w = weight.detach().to(torch.float32)
    m, n = w.shape
    k = min(m, n)
    packed, pivots = torch.linalg.lu_factor(w)
    lower = torch.tril(packed[:, :k], diagonal=-1) + torch.eye(m, k, device=w.device)
    upper = torch.triu(packed[:k, :])
    # LAPACK row interchanges: step i swapped rows i and pivots[i]-1; apply them to find which row of W
    # ended up at each position of L·U, then invert.
    order = list(range(m))
    for i, p in enumerate(pivots.tolist()):
        order[i], order[p - 1] = order[p - 1], order[i]
    pi = torch.empty(m, dtype=torch.long)
    pi[torch.tensor(order)] = torch.arange(m)
    d = torch.diagonal(upper).clone()
    tiny = d.abs() <= torch.finfo(torch.float32).eps * max(m, n) * d.abs().max().clamp_min(1e-30)
    d = torch.where(tiny, torch.ones_like(d), d)
    return pi.to(w.device), lower, d, upper / d[:, None]


class LoLDU(Form):
    name = "loldu"
    Args = LoLDUArgs
    caps = Cap.MERGEABLE | Cap.CONV1D_OK | Cap.IDENTITY_AT_INIT
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)

    def __init__(self, base_layer: nn.Module, args: LoLDUArgs) -> None:
        super().__init__(base_layer, args)
        k = min(self.in_features, self.out_features)
        if args.r > k:
            raise ValueError(f"loldu: rank r={args.r} exceeds min(out, in)={k} of a "
                             f"{self.out_features}x{self.in_features} layer")
        r, keep = args.r, args.save_factors
        if keep and init_skipped():  # a load that carries π, L_r, U_r and D_r: no LU of the base weight
            m, n, dev = self.out_features, self.in_features, self.base_weight.device
            pi, lower = torch.empty(m, dtype=torch.long, device=dev), torch.empty(m, r, device=dev)
            d, upper = torch.empty(r, device=dev), torch.empty(r, n, device=dev)
        else:
            pi, lower, d, upper = ldu(self.base_weight)
        self.register_buffer("perm", pi, persistent=keep)
        self.register_buffer("ldu_L", lower[:, :r].contiguous(), persistent=keep)
        self.register_buffer("ldu_U", upper[:r].contiguous(), persistent=keep)
        self.register_buffer("ldu_D", d[:r].clone())  # the anchor z₀ = D_r, always saved
        self.ldu_z = nn.Parameter(d[:r].clone())
        self.scaling = args.alpha / args.r

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.ldu_z.copy_(self.ldu_D)

    def _diag(self) -> torch.Tensor:
        return (self.ldu_z - self.ldu_D) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        core = (self.ldu_L * self._diag()) @ self.ldu_U
        return core.index_select(0, self.perm)

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        v = ((x @ self.ldu_U.T) * self._diag()) @ self.ldu_L.T
        return base_out + v.index_select(-1, self.perm)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not self.args.save_factors and "ldu_D" in tensors:
            saved, here = tensors["ldu_D"].to(self.ldu_D), self.ldu_D
            tol = 1e-4 * float(here.abs().max().clamp_min(1e-12))
            if saved.shape != here.shape or not torch.allclose(saved, here, rtol=1e-4, atol=tol):
                raise ValueError(
                    "loldu: the LU pivots of this base weight differ from the ones the adapter was made "
                    f"with (max |ΔD| = {(saved - here).abs().max().item():.3g}); load it onto the original, "
                    "unmerged base weights, or save it with save_factors=True")
        super().load_tensors(tensors)

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: LoLDUArgs) -> int:
        return args.r

    @classmethod
    def examples(cls) -> list[LoLDUArgs]:
        return [LoLDUArgs(r=4, alpha=4), LoLDUArgs(r=16, alpha=16, save_factors=True)]
