"""Block-LoRA: LoRA whose down-projection is one block shared by every chunk of the input.

Zhou, Shen, Yu, Bu, Wang. "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based
Few-Shot Learning", arXiv 2501.16720 (2025). No official code was found.

What is from the paper (abstract; the method section's equations could not be read here): Block-LoRA
"partitions the original low-rank decomposition matrix of LoRA into a series of sub-matrices while
sharing all down-projection sub-matrices", which reduces the trainable parameters and "transforms
certain complex matrix multiplication operations into simpler matrix addition"; it is a CLIP
few-shot method compared with CLIP-LoRA.

What is INFERRED (METHODS.md's reading; verify against the paper's equations before relying on it):
split the input x ∈ R^n into n_blk chunks x = [x_1; …; x_{n_blk}] of size c = n/n_blk and the LoRA
down-projection A ∈ R^{r×n} into column blocks A = [A_1, …, A_{n_blk}], all equal to one shared
A_s ∈ R^{r×c}. Then

    ΔW·x = s·B·A_s·Σ_i x_i,       ΔW = s·B·A_s·(1ᵀ ⊗ I_c) = s·B·[A_s, A_s, …, A_s],

with B ∈ R^{m×r}, s = α/r: the r×n product A·x becomes n_blk−1 vector additions and one r×c product,
and the parameters drop from r(m+n) to r(m + n/n_blk). ΔW does not depend on the input, so it merges
like LoRA. The other reading (split the rank, share A across rank blocks: ΔW = (Σ_i B_i)·A_s) has
the same count but saves no compute, so it fits the abstract worse and is not implemented.
When n is not a multiple of n_blk the input is zero-padded to n_blk·⌈n/n_blk⌉ (as PEFT's MiSS):
c = ⌈n/n_blk⌉ and the last chunk is shorter (INFERRED; the paper's CLIP widths divide evenly).
MiSS's default form is the special case A_s = I_r fixed with c = r.

Init (INFERRED, as LoRA/CLIP-LoRA): A_s Kaiming-uniform(a=√5) for its own shape, B = 0, so the
output equals the base output at init. Dropout is applied to x before the chunk sum.

Defaults: r = 2, α = 1, dropout = 0.25 are CLIP-LoRA's fixed hyperparameters (MaxZanella/CLIP-LoRA,
the baseline and protocol Block-LoRA follows, per METHODS.md); n_blk = 8 is INFERRED from the title
("one head eight arms": one shared down-projection, eight blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_common, check_min
from lorakit.forms.base import Form


@dataclass(frozen=True)
class BlockLoRAArgs:
    r: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    n_blk: int = 8

    def __post_init__(self) -> None:
        check_common("block_lora", self)
        check_min("block_lora", "n_blk", self.n_blk, 1)


def chunk_size(in_features: int, n_blk: int) -> int:
    return -(-in_features // n_blk)


class BlockLoRA(Form):
    name = "block_lora"
    Args = BlockLoRAArgs
    caps = Cap.MERGEABLE | Cap.CONV1D_OK | Cap.IDENTITY_AT_INIT
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)

    def __init__(self, base_layer: nn.Module, args: BlockLoRAArgs) -> None:
        super().__init__(base_layer, args)
        if args.n_blk > self.in_features:
            raise ValueError(f"block_lora: n_blk={args.n_blk} exceeds the layer's input size "
                             f"{self.in_features}")
        device = base_layer.weight.device
        self.chunk = chunk_size(self.in_features, args.n_blk)
        self.lora_A = nn.Parameter(torch.empty(args.r, self.chunk, device=device))  # the shared A_s
        self.lora_B = nn.Parameter(torch.empty(self.out_features, args.r, device=device))
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        self.scaling = args.alpha / args.r
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def chunk_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_i x_i over the n_blk input chunks (zero-padded to n_blk·c): (..., n) -> (..., c)."""
        pad = self.args.n_blk * self.chunk - self.in_features
        if pad:
            x = F.pad(x, (0, pad))
        return x.unflatten(-1, (self.args.n_blk, self.chunk)).sum(dim=-2)

    def tiled_A(self) -> torch.Tensor:
        """The full down-projection [A_s, A_s, …] (r, n) that the shared block stands for."""
        return self.lora_A.repeat(1, self.args.n_blk)[:, : self.in_features]

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.tiled_A()) * self.scaling

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        summed = self.chunk_sum(self.dropout(x))
        return base_out + ((summed @ self.lora_A.T) @ self.lora_B.T) * self.scaling

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: BlockLoRAArgs) -> int:
        return args.r * (out_features + chunk_size(in_features, args.n_blk))

    @classmethod
    def examples(cls) -> list[BlockLoRAArgs]:
        # n_blk=3 does not divide 32/64: exercises the zero-padded last chunk
        return [BlockLoRAArgs(r=4, alpha=8, dropout=0.0, n_blk=8),
                BlockLoRAArgs(r=2, alpha=3, dropout=0.0, n_blk=3)]

    file_keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
