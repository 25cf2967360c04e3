"""IncreLoRA form: a rank-growing SVD-style LoRA (Zhang et al., "IncreLoRA: Incremental Parameter
Allocation Method for Parameter-Efficient Fine-tuning", arXiv 2308.12043, Sec. 3; official code
FeiyuZhang98/IncreLoRA ``loralib/increlora.py::SVDLinear``).

    ΔW = B·diag(E)·A · α / (ranknum + 1e-5)

as AdaLoRA's parameterization (diagonal Λ = E between B and A), where ranknum is the current rank.
The rank-1 triplets come in chunks: chunk 0 holds the initial rank r (A, B ~ N(0, 0.02), E = 0, as the
code's ``reset_parameters``), chunk c ≥ 1 holds the ``add_r`` ranks added by the c-th growth, and a
**reserve** chunk of ``add_r`` triplets ("advance learning", Sec. 3.3): its a and b train from the start
while its e is fixed (1e-5, a non-trainable buffer) until a growth promotes it (e becomes trainable,
starting from 1e-5) and appends a fresh reserve. ``resize(rank)`` / ``grow()`` do that; the growth
count is the argument ``growths``, so a grown adapter's saved spec (per-module ``growths``) rebuilds the
same shapes on load. ranknum counts the trainable-e ranks (r + growths·add_r); the α/ranknum factor
changes the scale of existing ranks when the rank grows, as in the official code (METHODS.md pitfall).

The importance score of the strategy needs ∂L/∂ΔW: while ``track_importance`` is on, ``apply``
materializes ΔW (as the official code does on every forward) and a gradient hook adds
S = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW) to ``importance``; otherwise the factored path is used.
The strategy is ``lorakit.strategies.increlora``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_common
from lorakit.forms.base import Form, init_skipped

RESERVE_E = 1e-5


@dataclass(frozen=True)
class IncreLoRAArgs:
    r: int = 1  # initial rank (official NLU scripts: lora_r 1)
    alpha: float = 16.0  # NLU scripts use 16-32
    add_r: int = 1  # ranks per growth = reserve size ({2:1, 4:2, 6:3, 8:4}[target_rank] in the code)
    growths: int = 0  # growths done so far (set by the strategy; recorded in the saved spec)
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.r < 1 or self.add_r < 1 or self.growths < 0:
            raise ValueError(f"increlora: need r >= 1, add_r >= 1, growths >= 0; got r={self.r}, "
                             f"add_r={self.add_r}, growths={self.growths}")
        check_common("increlora", self)


class IncreLoRA(Form):
    name = "increlora"
    Args = IncreLoRAArgs
    caps = Cap.MERGEABLE | Cap.RANK_MUTABLE | Cap.RANK_GROWTH | Cap.CONV1D_OK
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)

    def __init__(self, base_layer: nn.Module, args: IncreLoRAArgs) -> None:
        super().__init__(base_layer, args)
        self._device = base_layer.weight.device
        self.n_chunks = 0
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        self.track_importance = False
        self.importance = 0.0
        self._add_chunk(args.r, e=0.0)
        for _ in range(args.growths):
            self._add_chunk(args.add_r, e=RESERVE_E)
        self._new_reserve()

    # -- structure ---------------------------------------------------------------------------
    def _normal(self, *shape: int) -> nn.Parameter:
        if init_skipped():  # built for a load: the file's tensors replace these
            return nn.Parameter(torch.empty(*shape, device=self._device))
        return nn.Parameter(torch.randn(*shape, device=self._device) * self.args.init_std)

    def _add_chunk(self, k: int, e: float) -> None:
        c = self.n_chunks
        self.register_parameter(f"lora_A_{c}", self._normal(k, self.in_features))
        self.register_parameter(f"lora_B_{c}", self._normal(self.out_features, k))
        self.register_parameter(f"lora_E_{c}", nn.Parameter(torch.full((k, 1), e, device=self._device)))
        self.n_chunks += 1

    def _new_reserve(self) -> list[nn.Parameter]:
        k = self.args.add_r
        self.lora_A_res = self._normal(k, self.in_features)
        self.lora_B_res = self._normal(self.out_features, k)
        self.register_buffer("lora_E_res", torch.full((k, 1), RESERVE_E, device=self._device))
        return [self.lora_A_res, self.lora_B_res]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith(("lora_A", "lora_B")):
                    p.normal_(0.0, self.args.init_std)
                elif name == "lora_E_0":
                    p.zero_()
                else:
                    p.fill_(RESERVE_E)
            self.lora_E_res.fill_(RESERVE_E)

    @property
    def rank(self) -> int:
        """ranknum: the ranks whose e trains (reserve excluded)."""
        return self.args.r + self.args.growths * self.args.add_r

    def grow(self) -> list[nn.Parameter]:
        """Promote the reserve to a trainable chunk (same a, b tensors; e trainable from its value)
        and append a fresh reserve. Returns the new parameters (new e, new reserve a and b)."""
        c = self.n_chunks
        A, B, e = self.lora_A_res, self.lora_B_res, self.lora_E_res.detach().clone()
        del self.lora_A_res, self.lora_B_res, self.lora_E_res
        self.register_parameter(f"lora_A_{c}", A)
        self.register_parameter(f"lora_B_{c}", B)
        E = nn.Parameter(e)
        self.register_parameter(f"lora_E_{c}", E)
        self.n_chunks += 1
        self.args = replace(self.args, growths=self.args.growths + 1)
        return [E, *self._new_reserve()]

    def resize(self, rank: int) -> list[nn.Parameter]:
        """Grow to ``rank`` (steps of add_r); IncreLoRA never shrinks."""
        if rank < self.rank or (rank - self.rank) % self.args.add_r:
            raise ValueError(f"increlora: can grow from rank {self.rank} in steps of {self.args.add_r}, "
                             f"not to {rank}")
        new: list[nn.Parameter] = []
        while self.rank < rank:
            new += self.grow()
        return new

    # -- math --------------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, E) over all chunks and the reserve: (k, in), (out, k), (k, 1)."""
        cs = range(self.n_chunks)
        A = torch.cat([getattr(self, f"lora_A_{c}") for c in cs] + [self.lora_A_res], 0)
        B = torch.cat([getattr(self, f"lora_B_{c}") for c in cs] + [self.lora_B_res], 1)
        E = torch.cat([getattr(self, f"lora_E_{c}") for c in cs] + [self.lora_E_res], 0)
        return A, B, E

    @property
    def scaling(self) -> float:
        return self.args.alpha / (self.rank + 1e-5)

    def delta_weight(self) -> torch.Tensor:
        A, B, E = self.factors()
        return (B @ (A * E)) * self.scaling

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.track_importance and torch.is_grad_enabled():
            W = self.delta_weight()
            if W.requires_grad:
                W.register_hook(self._score_hook(W))
            return base_out + F.linear(self.dropout(x), W)
        A, B, E = self.factors()
        return base_out + ((self.dropout(x) @ (A * E).T) @ B.T) * self.scaling

    def _score_hook(self, W: torch.Tensor):
        Wd = W.detach()

        def hook(grad: torch.Tensor) -> None:
            self.importance += float((Wd * grad).abs().sum() / math.sqrt(Wd.numel()))

        return hook

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: IncreLoRAArgs) -> int:
        rank = args.r + args.growths * args.add_r
        return (rank + args.add_r) * (in_features + out_features) + rank

    @classmethod
    def examples(cls) -> list[IncreLoRAArgs]:
        return [IncreLoRAArgs(r=2, alpha=4, add_r=1), IncreLoRAArgs(r=1, alpha=8, add_r=2, growths=1)]
