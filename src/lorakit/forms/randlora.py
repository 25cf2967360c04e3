"""RandLoRA: full-rank updates from shared random bases and trainable diagonals.

Paper: "RandLoRA: Full-rank parameter-efficient fine-tuning of large models", Paul Albert, Frederic Z.
Zhang, Hemanth Saratchandran, Cristian Rodriguez-Opazo, Anton van den Hengel, Ehsan Abbasnejad
(ICLR 2025), arXiv 2502.00987. Official code: PaulAlbert31/RandLoRA; PEFT ``tuners/randlora``.

The update (the paper's method section; the equation number could not be checked, only the abstract
and third-party summaries were readable here):

    ΔW = s · Σ_{i=1..N} B_i Λ_i A Γ_i,   s = α/r,

with D = max(m, n), d = min(m, n) of the layer's (out=m, in=n) weight, A ∈ R^{r×d} one frozen random
matrix shared by all terms, B_i ∈ R^{D×r} frozen random matrices, Λ_i = diag(λ_{:,i}) (r×r) and
Γ_i = diag(γ_i) (d×d) trainable, and N = ⌈d/r⌉ terms so that Σ rank(B_i Λ_i A Γ_i) = N·r ≥ d: the
sum can reach full rank min(m, n). Trainable per layer: λ ∈ R^{r×N} and γ ∈ R^{N×d}, N(r + d) values.
A and Γ act on the smaller side d (input side when n ≤ m, else output side: ΔW is then transposed).

As in PEFT (and the official code's ``generate_basis``) the random bases are shared by every layer
of the adapter: ``randlora_A`` (r, 1, d_max) and ``randlora_B`` (D_max, N_max, r), sized to the
elementwise-largest (out, in) of the targeted layers and sliced per layer (A[:, :, :d],
B[:D, :N, :]). They are built from ``projection_prng_key`` alone (a CPU ``torch.Generator``), so the
same key gives PEFT's bases exactly:
- dense (default): Kaiming-uniform(a=√5) A (r, 1, d_max), then N_max draws of (D_max, 1, r) for B,
  each in bfloat16 (float16 where accelerate reports no bf16, as PEFT), then each tensor divided by
  its own std;
- ``sparse``: ternary {-1, 0, +1} with P(±1) = 1/6 each (uniform draws, A first), divided by std;
- ``very_sparse``: ternary with P(±1) = 1/(2√d_max) each (d_max = min side of the largest shape);
  it takes precedence over ``sparse`` (as in PEFT).
The bases are lorakit's first model-level shared tensors (``Cap.SHARED_TENSORS``): one
``SharedTensors`` module per adapter, child of each of its forms, saved once as
``base_model.randlora_A``/``base_model.randlora_B`` (PEFT's keys for the tuner-level buffers) when
``save_projection`` (PEFT's default); otherwise they are rebuilt from the key on load.

Pitfalls handled:
- Pairing. PEFT (and the official code) flatten the scaled A side as (r, N) → row k·N + i but B as
  (N, r) → column i·r + k, so term (k, i) of the A side meets B column ((k·N+i) // r, (k·N+i) % r).
  That is still the paper's equation (B_i is a fixed relabelling of the same i.i.d. random columns),
  and reproducing it is what makes PEFT checkpoints give equal logits. Implemented here exactly.
- N = ⌈d/r⌉ (PEFT). The official code uses min(n, d//r + 1), one extra term when r divides d; not
  offered (PEFT files could not hold it).
- Init. Both keep ΔW = 0 at init. PEFT (default, ``init="peft"``): λ = 0, γ = 1/max(N, d) (= 1/d).
  Official code (``init="official"``): λ = 1/max(N, r), γ = 0 (the other factor gets the first
  gradient).
- Scale. α defaults to 640 with r = 32 (s = 20, PEFT's default, "typically 20 times the rank"); the
  large s can be unstable with high learning rates (PEFT doc); the official LLM example uses α = 2r.
- Bases depend on the largest targeted layer: the same adapter on a different set of modules gets
  different bases (files with ``save_projection`` do not depend on it).
- Memory. The scaled A side λ⊙A⊙γ (r·N·d ≈ d² values) is rebuilt every forward; a custom autograd
  function keeps only A, λ, γ for backward (as PEFT's ``UniqueBaseGrad``), not the product.
- Files. PEFT itself also writes a copy of both bases under every layer key; PEFT loads the compact
  file (one copy) with equal logits, warning about "missing adapter keys". ``peft_layer_copies=True``
  writes PEFT's exact layout (no warning, one extra copy of the bases per layer).

Defaults (r=32, α=640, sparse/very_sparse off, key 0, save_projection on) are PEFT's
``RandLoraConfig``; the official commonsense scripts train with lr 1e-4 on q,k,v,up,down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_choice, check_common, check_peft_bias
from lorakit.forms.base import Form, SharedTensors

INITS = ("peft", "official")


@dataclass(frozen=True)
class RandLoRAArgs:
    r: int = 32
    alpha: float = 640.0
    dropout: float = 0.0
    projection_prng_key: int = 0
    sparse: bool = False
    very_sparse: bool = False
    save_projection: bool = True
    init: str = "peft"
    peft_layer_copies: bool = False

    def __post_init__(self) -> None:
        check_common("randlora", self)
        check_choice("randlora", "init", self.init, INITS)


def num_bases(d: int, r: int) -> int:
    """N = ⌈d/r⌉: enough rank-r terms for a rank-d (full-rank) sum."""
    return -(-d // r)


class _ScaledBasis(torch.autograd.Function):
    """out[k, i, j] = λ[k, i] · A[k, 0, j] · γ[i, j], saving only the factors for backward."""

    @staticmethod
    def forward(ctx, basis_a: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(basis_a, lam, gam)
        return lam[:, :, None] * basis_a * gam[None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        basis_a, lam, gam = ctx.saved_tensors
        a = basis_a[:, 0].to(grad.dtype)
        grad_lam = torch.einsum("kij,kj,ij->ki", grad, a, gam.to(grad.dtype))
        grad_gam = torch.einsum("kij,kj,ki->ij", grad, a, lam.to(grad.dtype))
        return None, grad_lam, grad_gam


def _generation_dtype() -> torch.dtype:
    """PEFT draws the dense bases in bf16 where accelerate reports bf16 support, else fp16."""
    try:
        from accelerate.utils.imports import is_bf16_available
    except ImportError:  # accelerate is a lorakit dependency; keep the common answer if it is absent
        return torch.bfloat16
    return torch.bfloat16 if is_bf16_available() else torch.float16


def _ternary(shape: tuple[int, ...], gen: torch.Generator, sparsity: float) -> torch.Tensor:
    # explicit float32: torch.rand in the default dtype would draw other numbers under float64 defaults
    u = torch.rand(shape, generator=gen, dtype=torch.float32)
    out = torch.zeros(shape, dtype=torch.float32)
    out[u < 1 / (2 * sparsity)] = -1
    out[u > 1 - 1 / (2 * sparsity)] = 1
    return out


def make_bases(r: int, largest_out_in: tuple[int, int], key: int, *, sparse: bool = False,
               very_sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (A (r, 1, d), B (D, N, r)) for the elementwise-largest (out, in) shape, fp32 whatever
    torch's default dtype (the same key gives the same bases; forms cast them to their own dtype)."""
    big, small = max(largest_out_in), min(largest_out_in)
    n = num_bases(small, r)
    gen = torch.Generator(device="cpu").manual_seed(int(key))
    if very_sparse or sparse:
        sparsity = math.sqrt(small) if very_sparse else 3
        a = _ternary((r, 1, small), gen, sparsity)
        b = _ternary((big, n, r), gen, sparsity)
    else:
        dtype = _generation_dtype()

        def kaiming(shape: tuple[int, ...]) -> torch.Tensor:
            return nn.init.kaiming_uniform_(torch.empty(shape, dtype=dtype), a=math.sqrt(5), generator=gen)

        a = kaiming((r, 1, small))
        b = torch.cat([kaiming((big, 1, r)) for _ in range(n)], dim=1)
    if a.std() == 0 or b.std() == 0:
        raise ValueError(f"randlora: a sparse random basis came out all zeros (A {tuple(a.shape)}, B "
                         f"{tuple(b.shape)}); use another projection_prng_key or sparse=True")
    return (a / a.std()).float(), (b / b.std()).float()


class RandLoRA(Form):
    name = "randlora"
    Args = RandLoRAArgs
    caps = Cap.MERGEABLE | Cap.CONV1D_OK | Cap.IDENTITY_AT_INIT | Cap.SHARED_TENSORS
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    peft_type = "RANDLORA"
    shared_names = ("randlora_A", "randlora_B")

    def __init__(self, base_layer: nn.Module, args: RandLoRAArgs) -> None:
        super().__init__(base_layer, args)
        device = base_layer.weight.device
        self.small = min(self.in_features, self.out_features)
        self.big = max(self.in_features, self.out_features)
        self.num_bases = num_bases(self.small, args.r)
        self.randlora_lambda = nn.Parameter(torch.empty(args.r, self.num_bases, device=device))
        self.randlora_gamma = nn.Parameter(torch.empty(self.num_bases, self.small, device=device))
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.args.alpha / self.args.r

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.args.init == "peft":
                self.randlora_lambda.zero_()
                self.randlora_gamma.fill_(1.0 / max(self.randlora_gamma.shape))
            else:
                self.randlora_lambda.fill_(1.0 / max(self.randlora_lambda.shape))
                self.randlora_gamma.zero_()

    # -- the shared bases ---------------------------------------------------------------------
    @classmethod
    def build_shared(cls, forms: dict[str, Form]) -> SharedTensors:
        """One pair of bases for all ``forms`` of an adapter, sized to their largest (out, in)."""
        first = next(iter(forms.values()))
        keys = ("r", "projection_prng_key", "sparse", "very_sparse", "save_projection", "peft_layer_copies")
        differ = [k for k in keys if len({getattr(f.args, k) for f in forms.values()}) > 1]
        if differ:
            raise ValueError(f"randlora: all layers of one adapter share one pair of random bases, so "
                             f"{differ} must be the same on every module (no per-module overrides)")
        args = first.args
        largest = (max(f.out_features for f in forms.values()), max(f.in_features for f in forms.values()))
        a, b = make_bases(args.r, largest, args.projection_prng_key, sparse=args.sparse,
                          very_sparse=args.very_sparse)
        # the bases take the trainable tensors' dtype (torch's default when the forms were built, e.g.
        # float64): a float32 basis times float64 λ/γ would fail in the matmuls
        device, dtype = first.randlora_lambda.device, first.randlora_lambda.dtype
        return SharedTensors({"randlora_A": a.to(device, dtype), "randlora_B": b.to(device, dtype)},
                             saved=args.save_projection, layer_copies=args.peft_layer_copies)

    def _bases(self) -> SharedTensors:
        if self.shared is None:  # a form built alone (outside attach/load): bases sized to this layer
            self.bind_shared(type(self).build_shared({"": self}))
        return self.shared

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B side (D, N·r), scaled A side (N·r, d)) in PEFT's pairing: ΔW = s·B_side·A_side (or its
        transpose when the input is the larger side)."""
        bases = self._bases()
        r, n, d, big = self.args.r, self.num_bases, self.small, self.big
        basis_a, basis_b = bases.randlora_A, bases.randlora_B
        if basis_a.shape[0] < r or basis_a.shape[2] < d or basis_b.shape[0] < big or basis_b.shape[1] < n:
            raise ValueError(f"randlora: shared bases A{tuple(basis_a.shape)} B{tuple(basis_b.shape)} are "
                             f"too small for a {self.out_features}x{self.in_features} layer with r={r}")
        a_side = _ScaledBasis.apply(basis_a[:r, :, :d], self.randlora_lambda, self.randlora_gamma)
        a_side = a_side.reshape(r * n, d)  # row k·N + i
        b_side = basis_b[:big, :n, :r].reshape(big, n * r)  # column i·r + k
        return b_side, a_side

    # -- semantics ----------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        b_side, a_side = self.factors()
        full = (b_side @ a_side) * self.scaling  # (D, d)
        return full if self.in_features == self.small else full.T

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        b_side, a_side = self.factors()
        x = self.dropout(x)
        if self.in_features == self.small:
            update = (x @ a_side.T) @ b_side.T
        else:
            update = (x @ b_side) @ a_side
        return base_out + update * self.scaling

    # -- bookkeeping --------------------------------------------------------------------------
    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: RandLoRAArgs) -> int:
        d = min(in_features, out_features)
        return num_bases(d, args.r) * (args.r + d)

    @classmethod
    def examples(cls) -> list[RandLoRAArgs]:
        return [
            RandLoRAArgs(r=8, alpha=16),
            RandLoRAArgs(r=6, alpha=12, sparse=True, projection_prng_key=3, init="official"),
            RandLoRAArgs(r=4, alpha=8, very_sparse=True, projection_prng_key=11, save_projection=False),
        ]

    @classmethod
    def peft_config(cls, args: RandLoRAArgs) -> dict[str, Any]:
        alpha = int(args.alpha) if float(args.alpha).is_integer() else args.alpha
        return {"r": args.r, "randlora_alpha": alpha, "randlora_dropout": args.dropout,
                "projection_prng_key": args.projection_prng_key, "save_projection": args.save_projection,
                "sparse": args.sparse, "very_sparse": args.very_sparse, "bias": "none", "init_weights": True}

    @classmethod
    def args_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        check_peft_bias(config)
        return {"r": int(config.get("r", 32)), "alpha": float(config.get("randlora_alpha", 640)),
                "dropout": float(config.get("randlora_dropout", 0.0) or 0.0),
                "projection_prng_key": int(config.get("projection_prng_key", 0)),
                "sparse": bool(config.get("sparse", False)),
                "very_sparse": bool(config.get("very_sparse", False)),
                "save_projection": bool(config.get("save_projection", True))}
