"""DyLoRA: LoRA trained for a whole range of ranks at once (nested truncation of one r_max adapter).

Valipour, Rezagholizadeh, Kobyzev, Ghodsi. "DyLoRA: Parameter-Efficient Tuning of Pretrained Models
using Dynamic Search-Free Low-Rank Adaptation", EACL 2023, arXiv 2210.07558.

Form (the paper's truncated forward, Sec. 3): with A ∈ R^{r_max×in}, B ∈ R^{out×r_max} and a rank
b ∈ {1..r_max},

    h = W0·x + (α/b) · B[:, :b] · A[:b, :] · x,        ΔW_b = (α/b) · B[:, :b] · A[:b, :].

Training samples b each step (the ``dylora`` strategy, ``lorakit.strategies.dylora``), so every prefix
of the components is a usable adapter; after training the same tensors serve, merge or export at any
b ≤ r_max (``set_rank``). Init as LoRA: A Kaiming-uniform(a=√5), B = 0, so ΔW_b = 0 for every b.

Scale. The official code (Huawei ``dynamic`` module, applied to both factors) multiplies each
truncated factor by sqrt(r_max/b) and the product by α/r_max, i.e. α/b overall, as the paper. The
kohya-style ``DyLoRAModule`` applies a single sqrt(r_max/b) to the output (effective
(α/r_max)·sqrt(r_max/b)); that variant is NOT implemented here.

``frozen``: the paper's update rule trains only the b-th component at rank b (row b of A, column b
of B); components < b enter the forward detached. The official code offers it as
``set_rank(rank, frozen)`` with ``frozen=False`` by default (all components ≤ b train); lorakit's
default follows the official code and METHODS.md, ``frozen=True`` gives the paper's rule. Components
> b get no gradient in either mode.

Rank bookkeeping. ``set_rank(b)`` changes the rank the form serves at; the chosen b is saved with the
adapter (tensor ``dylora_rank``) next to the full r_max factors, so a reload serves at the same b and
``set_rank`` can still move it anywhere in 1..r_max. Merging folds ΔW at the current b and unmerging
removes that same ΔW even if the rank was changed in between. Pitfalls handled: the 1-based b (the
official ``set_rank`` takes b−1), α/b (not α/r_max) scale, both factors truncated/detached, one rank
model-wide per step (official) rather than per module (kohya).

Defaults: r_max = 8 (METHODS.md's toy; the paper's per-task rank ranges and α could not be read
here), α = 8 (lorakit's LoRA default, so s = 1 at b = r_max), dropout 0, ``frozen=False`` (official
code), serving rank r_max. Equation numbers are not cited: only the paper's abstract and the
official ``dynamic`` module were readable; the math above is the truncated forward both describe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_common
from lorakit.forms.base import Form


@dataclass(frozen=True)
class DyLoRAArgs:
    r: int = 8  # r_max
    alpha: float = 8.0
    dropout: float = 0.0
    frozen: bool = False  # True: only the b-th component trains at rank b (the paper's update rule)
    serve_rank: int | None = None  # initial serving rank b (None: r_max); a saved adapter keeps its own

    def __post_init__(self) -> None:
        check_common("dylora", self, "maximum rank r")
        if self.serve_rank is not None and not 1 <= self.serve_rank <= self.r:
            raise ValueError(f"dylora: serve_rank must be in 1..r={self.r}, got {self.serve_rank}")


class DyLoRA(Form):
    name = "dylora"
    Args = DyLoRAArgs
    caps = Cap.MERGEABLE | Cap.RANK_MUTABLE | Cap.NESTED_RANKS | Cap.CONV1D_OK | Cap.IDENTITY_AT_INIT
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)

    def __init__(self, base_layer: nn.Module, args: DyLoRAArgs) -> None:
        super().__init__(base_layer, args)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(args.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, args.r, device=device))
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        b = args.serve_rank or args.r
        # saved with the adapter; the Python int mirrors it so the hot path never reads a tensor
        self.register_buffer("dylora_rank", torch.tensor([b], dtype=torch.long, device=device))
        self._rank = b
        self._frozen = args.frozen
        self._merged_rank: int | None = None
        self.register_load_state_dict_post_hook(_sync_rank_after_load)
        self.reset_parameters()

    # -- rank ------------------------------------------------------------------------------
    @property
    def r_max(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        """The rank b the form currently serves / trains at."""
        return self._rank

    @property
    def frozen_mode(self) -> bool:
        return self._frozen

    def set_rank(self, rank: int, frozen: bool | None = None) -> None:
        """Serve (and train) at rank ``rank`` ∈ 1..r_max; ``frozen`` switches the paper's update rule."""
        if isinstance(rank, bool) or int(rank) != rank or not 1 <= rank <= self.r_max:
            raise ValueError(f"dylora: rank must be an integer in 1..{self.r_max}, got {rank!r}")
        self._rank = int(rank)
        self.dylora_rank.fill_(self._rank)
        if frozen is not None:
            self._frozen = bool(frozen)

    def resize(self, rank: int) -> None:
        """RANK_MUTABLE interface: same as ``set_rank`` (the r_max tensors are kept, nothing is lost)."""
        self.set_rank(rank)

    def scaling_at(self, b: int) -> float:
        return self.args.alpha / b

    @property
    def scaling(self) -> float:
        return self.scaling_at(self._rank)

    def factors(self, b: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:b], B[:, :b]); in frozen training mode components < b are detached."""
        b = self._rank if b is None else b
        a, bm = self.lora_A[:b], self.lora_B[:, :b]
        if self._frozen and self.training and b > 1:
            a = torch.cat([a[: b - 1].detach(), a[b - 1:]], dim=0)
            bm = torch.cat([bm[:, : b - 1].detach(), bm[:, b - 1:]], dim=1)
        return a, bm

    # -- semantics -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight_at(self, b: int) -> torch.Tensor:
        a, bm = self.factors(b)
        return (bm @ a) * self.scaling_at(b)

    def delta_weight(self) -> torch.Tensor:
        return self.delta_weight_at(self._rank)

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, bm = self.factors()
        return base_out + ((self.dropout(x) @ a.T) @ bm.T) * self.scaling

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        self._merged_rank = self._rank
        return weight + self.delta_weight_at(self._rank)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # remove exactly what was merged, even if set_rank moved the serving rank meanwhile
        return weight - self.delta_weight_at(self._merged_rank or self._rank)

    # -- bookkeeping -----------------------------------------------------------------------
    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: DyLoRAArgs) -> int:
        return args.r * (in_features + out_features)

    @classmethod
    def examples(cls) -> list[DyLoRAArgs]:
        return [DyLoRAArgs(r=4, alpha=8), DyLoRAArgs(r=8, alpha=4, frozen=True, serve_rank=3)]

    file_keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self._rank}/{self.r_max}, frozen={self._frozen}"


def _sync_rank_after_load(module: DyLoRA, incompatible_keys: Any) -> None:
    b = int(module.dylora_rank.item())
    if not 1 <= b <= module.r_max:
        raise ValueError(f"dylora: saved serving rank {b} is outside 1..r_max={module.r_max}")
    module._rank = b


def set_rank(model: nn.Module, rank: int, adapter: str = "default", frozen: bool | None = None) -> int:
    """Serve every DyLoRA module of ``adapter`` at rank ``rank`` (clamped to each module's r_max).

    Returns the number of modules changed. Unmerge first if the adapter is merged (merged weights
    keep the rank they were merged at).
    """
    from lorakit.core.inject import adapter_modules

    changed = 0
    for form in adapter_modules(model, adapter).values():
        if isinstance(form, DyLoRA):
            form.set_rank(min(rank, form.r_max), frozen=frozen)
            changed += 1
    if not changed:
        raise ValueError(f"adapter {adapter!r} has no dylora modules")
    return changed
