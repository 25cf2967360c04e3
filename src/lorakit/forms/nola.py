"""NOLA: LoRA factors as linear combinations of seeded random bases; only the coefficients train.

Paper: "NOLA: Compressing LoRA using Linear Combination of Random Basis", Soroush Abbasi
Koohpayegani, K L Navaneet, Parsa Nooralinejad, Soheil Kolouri, Hamed Pirsiavash — ICLR 2024,
arXiv 2310.02556. Official code: github.com/UCDvision/NOLA, ``gpt/src/model_nola.py``
(``GenerateParams``, ``NOLALinear``, ``LoRA``) and ``gpt/scripts/finetune_gpt2m_e2e_qv_nola.sh``.

The paper's Eq. (NOLA re-parameterization of LoRA's ΔW = s·B·A):

    A = Σ_{i=1..k} α_i A_i,   B = Σ_{j=1..l} β_j B_j,   ΔW = (α/r) · B · A

with frozen random bases A_i ∈ R^{r×n}, B_j ∈ R^{m×r} regenerated from a seed and only the k + l
coefficients trained — independent of the rank r and of the layer's shape. The GPT-2 (LLM) code adds
the frozen LoRA init A0 (Kaiming-uniform, a = √5) to A and starts α = β = 0:

    ΔW = (α/r) · (Σ_j β_j B_j) · (A0 + Σ_i α_i A_i)            (``with_A0=True``, the default)

so ΔW = 0 at init while ∂L/∂β ≠ 0 (without A0, zero α and β would give zero gradients). Bases are
U(−1, 1)/√(number of bases), as the code.
``with_A0=False`` is the paper's equation without A0; α then starts at 1/k (the ViT code's
coefficient init) and β at 0, which keeps ΔW = 0 at init and a non-zero gradient (INFERRED pairing).

Seeds and portability (the code reseeds the *global* RNG and draws seeds up to 1e10 — not portable
across devices, and it disturbs the caller's RNG): here every basis comes from its own
``torch.Generator`` on the CPU, seeded by a SplitMix64 hash of (layer seed, which factor, basis
index), and is moved to the form's device afterwards, so the bases are a pure function of the layer
seed: the same in another process or on another device, never touching the global RNG. The layer
seed is derived from a base seed (``seed``, or one drawn from the global RNG at construction, which
``attach(seed=...)`` makes reproducible) and the module path (sha256), and is kept below 2^24 so it
survives lorakit's fp32 state exactly. Saved per layer: the coefficients (k + l numbers) and the seed;
A0 and the bases are never saved.

Memory: ``cache_bases=True`` keeps the bases of a layer in memory (plain attributes, never saved)
after first use — fastest for small models. ``cache_bases=False`` regenerates them in chunks in the
forward *and* in the backward pass through a custom autograd function, so no basis tensor is stored
(the code's GenerateParams behaviour; cost O((k·r·n + l·m·r)) random numbers per pass).

Defaults (GPT-2 M E2E script): r = 8, α = 8, k = l = 512 (``--nola_num_basis``), lr 5e-3, q and v.
Mergeable (ΔW does not depend on the input); the hot path materializes the small factors A (r×n) and
B (m×r), never ΔW (m×n).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_common, check_min
from lorakit.forms.base import Form

_MASK64 = (1 << 64) - 1
SEED_LIMIT = 1 << 24  # layer seeds are exact in fp32
_CHUNK = 32  # bases generated at a time when not cached
_TAG_A0, _TAG_A, _TAG_B = 0, 1, 2


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 chain): portable, no Python ``hash``."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (p & _MASK64))
    return h & ((1 << 63) - 1)


def layer_seed(base_seed: int, module_path: str) -> int:
    """The per-layer seed (< 2^24) for a base seed and a module path."""
    digest = int.from_bytes(hashlib.sha256(module_path.encode()).digest()[:8], "little")
    return mix_seed(base_seed, digest) % SEED_LIMIT


def uniform_basis(seed: int, tag: int, index: int, shape: tuple[int, ...], bound: float) -> torch.Tensor:
    """One basis matrix, U(−bound, bound), fp32 on the CPU, from its own generator."""
    g = torch.Generator(device="cpu").manual_seed(mix_seed(seed, tag, index))
    return (torch.rand(shape, generator=g, dtype=torch.float32) * 2.0 - 1.0) * bound


class _Combine(torch.autograd.Function):
    """Σ_i c_i · basis_i with the bases regenerated in chunks, in forward and in backward."""

    @staticmethod
    def forward(ctx, coef: torch.Tensor, make: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        ctx.make, ctx.count = make, coef.numel()
        out = torch.tensordot(coef[:_CHUNK], make(0, _CHUNK), dims=1)
        for start in range(_CHUNK, ctx.count, _CHUNK):
            out = out + torch.tensordot(coef[start:start + _CHUNK], make(start, start + _CHUNK), dims=1)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        parts = [torch.tensordot(ctx.make(start, start + _CHUNK), grad, dims=grad.dim())
                 for start in range(0, ctx.count, _CHUNK)]
        return torch.cat(parts), None


@dataclass(frozen=True)
class NOLAArgs:
    r: int = 8  # GPT-2 M E2E script RANK=8
    alpha: float = 8.0  # LORA_ALPHA=8, scale α/r
    num_basis_A: int = 512  # k; NUM_BASIS=512
    num_basis_B: int = 512  # l; NUM_BASIS=512
    seed: int | None = None  # base seed; None = drawn from the global RNG (attach(seed=...))
    with_A0: bool = True  # LLM code: A = A0 + Σ α_i A_i; False = the paper's A = Σ α_i A_i
    cache_bases: bool = True  # False: regenerate in forward and backward (no basis storage)
    dropout: float = 0.0  # on x before A (LoRA convention); the E2E script uses none

    def __post_init__(self) -> None:
        check_common("nola", self)
        if self.num_basis_A < 1 or self.num_basis_B < 1:
            raise ValueError(f"nola: num_basis_A and num_basis_B must be >= 1, got "
                             f"{self.num_basis_A}, {self.num_basis_B}")
        check_min("nola", "seed", self.seed, 0)


class NOLA(Form):
    name = "nola"
    Args = NOLAArgs
    caps = Cap.MERGEABLE | Cap.CONV1D_OK | Cap.IDENTITY_AT_INIT
    caps |= Cap.QUANTIZED_OK  # hardware: quantized base; not bf16 autocast: its custom backward mixes dtypes

    def __init__(self, base_layer: nn.Module, args: NOLAArgs) -> None:
        super().__init__(base_layer, args)
        device = base_layer.weight.device
        self.coef_A = nn.Parameter(torch.zeros(args.num_basis_A, device=device))
        self.coef_B = nn.Parameter(torch.zeros(args.num_basis_B, device=device))
        self.register_buffer("seed", torch.zeros(1, dtype=torch.int64, device=device))
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        self._base_seed = args.seed if args.seed is not None else int(torch.randint(0, 2**62, ()))
        self._seed_value = 0
        self._cache: tuple | None = None
        self._set_seed(layer_seed(self._base_seed, ""))
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_seed())
        self.reset_parameters()

    # -- seeds -----------------------------------------------------------------------------
    def bind_path(self, module_path: str) -> None:
        self._set_seed(layer_seed(self._base_seed, module_path))

    def _set_seed(self, value: int) -> None:
        with torch.no_grad():
            self.seed.fill_(value)
        self._sync_seed()

    def _sync_seed(self) -> None:
        value = int(self.seed.item())
        if not 0 <= value < SEED_LIMIT:
            raise ValueError(f"nola: layer seed {value} outside [0, 2^24)")
        self._seed_value = value
        self._cache = None

    # -- bases -----------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        return self.args.alpha / self.args.r

    def _a0(self) -> torch.Tensor:
        n = self.in_features
        return uniform_basis(self._seed_value, _TAG_A0, 0, (self.args.r, n), 1.0 / math.sqrt(n))

    def _make(self, tag: int, shape: tuple[int, int], count: int, like: torch.Tensor
              ) -> Callable[[int, int], torch.Tensor]:
        seed, bound = self._seed_value, 1.0 / math.sqrt(count)

        def make(start: int, stop: int) -> torch.Tensor:
            stop = min(stop, count)
            if stop <= start:
                return torch.zeros((0, *shape), dtype=like.dtype, device=like.device)
            block = torch.stack([uniform_basis(seed, tag, i, shape, bound) for i in range(start, stop)])
            return block.to(device=like.device, dtype=like.dtype)

        return make

    def bases(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(A0 or None, A bases (k, r, n), B bases (l, m, r)) on the coefficients' device and dtype."""
        like = self.coef_A
        key = (self._seed_value, like.device, like.dtype)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        r, n, m = self.args.r, self.in_features, self.out_features
        a0 = self._a0().to(device=like.device, dtype=like.dtype) if self.args.with_A0 else None
        ka, kb = self.args.num_basis_A, self.args.num_basis_B
        value = (a0, self._make(_TAG_A, (r, n), ka, like)(0, ka), self._make(_TAG_B, (m, r), kb, like)(0, kb))
        if self.args.cache_bases:
            self._cache = (key, value)
        return value

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A = [A0 +] Σ α_i A_i  (r, n) and B = Σ β_j B_j  (m, r)."""
        if self.args.cache_bases:
            a0, basis_a, basis_b = self.bases()
            a = torch.tensordot(self.coef_A, basis_a, dims=1)
            b = torch.tensordot(self.coef_B, basis_b, dims=1)
        else:
            r, n, m = self.args.r, self.in_features, self.out_features
            a0 = self._a0().to(self.coef_A) if self.args.with_A0 else None
            a = _Combine.apply(self.coef_A, self._make(_TAG_A, (r, n), self.args.num_basis_A, self.coef_A))
            b = _Combine.apply(self.coef_B, self._make(_TAG_B, (m, r), self.args.num_basis_B, self.coef_B))
        return (a if a0 is None else a0 + a), b

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.coef_A.fill_(0.0 if self.args.with_A0 else 1.0 / self.args.num_basis_A)
            self.coef_B.zero_()

    # -- semantics -------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a) * self.scaling

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return base_out + ((self.dropout(x) @ a.T) @ b.T) * self.scaling

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: NOLAArgs) -> int:
        return args.num_basis_A + args.num_basis_B

    @classmethod
    def examples(cls) -> list[NOLAArgs]:
        return [NOLAArgs(r=4, alpha=8.0, num_basis_A=16, num_basis_B=16),
                NOLAArgs(r=2, alpha=4.0, num_basis_A=8, num_basis_B=40, seed=3, with_A0=False,
                         cache_bases=False, dropout=0.1)]
