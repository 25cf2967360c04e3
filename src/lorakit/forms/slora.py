"""SLoRA, NLoRA and IntTune (Guo, Chang, Wu, "NLoRA: Nyström-Initiated Low-Rank Adaptation for Large
Language Models", Findings of EMNLP 2025, arXiv 2502.14482).

All three share the three-factor update of StructuredLoRA (equation numbers not checked: only the
abstract and the official code could be read here):

    ΔW = s·B·N·A,   A ∈ R^{r×in}, N ∈ R^{r×r}, B ∈ R^{out×r}, s = α/r (α/√r with rsLoRA),

computed as B(N(A·x̃)) with x̃ = dropout(x), as the official ``lora_B(lora_N(lora_A(dropout(x))))``
(TracyGuo2001/NLoRA peft/src/peft/tuners/lora/layer.py).

- ``slora``: A and N Kaiming-uniform (a=√5), B = 0, all trained (official ``slora_init``): ΔW = 0
  at init; r(in+out) + r² trainable parameters.
- ``nlora``: the Nyström init (``lorakit.inits.nystrom``): A = W[:r, :], B = W[:, :r], N = W[:r, :r]
  (official ``nlora_init``; ``nystrom_mode="pinv"`` gives N = pinv(W[:r, :r]), the paper's Nyström
  formula W ≈ C·W_II⁺·R), all trained. The base weight is not residualized, so the output is not
  the base output at init (no IDENTITY_AT_INIT).
- ``inttune``: the NLoRA init with only N trained (official inttune.py freezes lora_A and lora_B):
  r² trainable parameters.

``slora`` with ``init="nystrom"`` is the same as ``nlora``. Defaults r = α = 128, dropout 0: the
paper's LLaMA-2-7B MetaMathQA runs and the official README (``r=128, lora_alpha=128,
lora_dropout=0``; lr 2e-4). No PEFT equivalent (the official code is a PEFT fork with an
``init_lora_weights="n_lora"/"s_lora"`` option and a ``lora_N`` module that PEFT lacks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.caps import Cap
from lorakit.forms.base import Form
from lorakit.inits.nystrom import MODES, set_nystrom


@dataclass(frozen=True)
class SLoRAArgs:
    r: int = 128
    alpha: float = 128.0
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"slora: rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"slora: dropout must be in [0, 1), got {self.dropout}")


class SLoRA(Form):
    name = "slora"
    Args = SLoRAArgs
    caps = Cap.MERGEABLE | Cap.CONV1D_OK | Cap.IDENTITY_AT_INIT | Cap.FACTORED_BMA
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    middle_name: ClassVar[str] = "lora_N"

    def __init__(self, base_layer: nn.Module, args: SLoRAArgs) -> None:
        super().__init__(base_layer, args)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(args.r, self.in_features, device=device))
        self.lora_N = nn.Parameter(torch.empty(args.r, args.r, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, args.r, device=device))
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        r = self.lora_N.shape[0]
        return self.args.alpha / (math.sqrt(r) if self.args.rslora else r)

    def reset_parameters(self) -> None:
        """SLoRA: A, N ~ Kaiming-uniform(a=√5), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_N, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_N @ self.lora_A) * self.scaling

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_N)
        return base_out + F.linear(h, self.lora_B) * self.scaling

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: SLoRAArgs) -> int:
        return args.r * (in_features + out_features) + args.r * args.r

    @classmethod
    def examples(cls) -> list[SLoRAArgs]:
        return [SLoRAArgs(r=4, alpha=8), SLoRAArgs(r=2, alpha=3, rslora=True)]


@dataclass(frozen=True)
class NLoRAArgs(SLoRAArgs):
    nystrom_mode: str = "weight"  # "weight": N = W[:r,:r] (official code); "pinv": N = pinv(W[:r,:r])
    freeze_AB: bool = False  # IntTune: train N only

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nystrom_mode not in MODES:
            raise ValueError(f"nlora: nystrom_mode must be one of {MODES}, got {self.nystrom_mode!r}")


class NLoRA(SLoRA):
    """SLoRA with the Nyström init (see the module docstring); not the identity at init."""

    name = "nlora"
    Args = NLoRAArgs
    caps = Cap.MERGEABLE | Cap.CONV1D_OK | Cap.FACTORED_BMA
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)

    def __init__(self, base_layer: nn.Module, args: NLoRAArgs) -> None:
        super().__init__(base_layer, args)  # reset_parameters refuses r > min(in, out)
        if args.freeze_AB:
            self.frozen.update({"lora_A", "lora_B"})

    def reset_parameters(self) -> None:
        """NLoRA: A = W[:r, :], B = W[:, :r], N = W[:r, :r] (or its pseudo-inverse)."""
        set_nystrom(self, self.args.nystrom_mode)

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: NLoRAArgs) -> int:
        return args.r * args.r + (0 if args.freeze_AB else args.r * (in_features + out_features))

    @classmethod
    def examples(cls) -> list[NLoRAArgs]:
        # pinv mode is checked in tests/forms/test_slora.py: pinv(W[:r,:r]) of a random weight has
        # entries ~1e2, too large for the suite's absolute merge/unmerge tolerance after perturbation
        return [NLoRAArgs(r=4, alpha=4), NLoRAArgs(r=2, alpha=3, rslora=True)]


@dataclass(frozen=True)
class IntTuneArgs(NLoRAArgs):
    freeze_AB: bool = True


class IntTune(NLoRA):
    """IntTune: the NLoRA init with only the middle matrix N trained (r² per layer)."""

    name = "inttune"
    Args = IntTuneArgs

    @classmethod
    def examples(cls) -> list[NLoRAArgs]:
        # B·dN·A is tiny when A, B are slices of a small random weight: a larger α lets 12 steps show
        return [IntTuneArgs(r=4, alpha=64)]

