"""LoRA (Hu et al., 2021, arXiv 2106.09685) with rsLoRA scaling (Kalajdzievski, 2023, arXiv 2312.03732).

Eq. (3) of the LoRA paper:  h = W0·x + ΔW·x = W0·x + s·B·A·x,  B ∈ R^{d×r}, A ∈ R^{r×k},
with A random (Kaiming-uniform, as the reference code and PEFT), B = 0 so ΔW = 0 at init, and
s = α/r. rsLoRA (Theorem 3.2) shows s = α/√r keeps learning stable as r grows.
Dropout is applied to x before A (as the reference implementation). With ``bias=True`` B carries a
trainable bias (PEFT's ``lora_bias``), scaled by s like the rest of the update.

FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313, Sec. 4): the same ΔW = s·B·A with A frozen at its
(seeded) random init and only B trained (zero-init): m·r trainable parameters per layer. With a
shared A, averaging B across clients is exact: mean_k(B_k)·A = mean_k(B_k·A). Form ``ffa``, or
``lora`` with ``freeze_A=True``; PEFT loads it as a plain LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.forms.base import Form


@dataclass(frozen=True)
class LoRAArgs:
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    bias: bool = False
    freeze_A: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora: rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora: dropout must be in [0, 1), got {self.dropout}")


class LoRA(Form):
    name = "lora"
    Args = LoRAArgs
    caps = Cap.FACTORED_AB | Cap.MERGEABLE | Cap.CONV1D_OK | Cap.IDENTITY_AT_INIT
    peft_type = "LORA"
    peft_patterns = {"r": "rank_pattern", "alpha": "alpha_pattern"}

    def __init__(self, base_layer: nn.Module, args: LoRAArgs) -> None:
        super().__init__(base_layer, args)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(args.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, args.r, device=device))
        self.lora_bias = nn.Parameter(torch.zeros(self.out_features, device=device)) if args.bias else None
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        if args.freeze_A:
            self.frozen.add("lora_A")
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        r = self.lora_A.shape[0]
        return self.args.alpha / (math.sqrt(r) if self.args.rslora else r)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.lora_bias is not None:
            nn.init.zeros_(self.lora_bias)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.lora_bias is None else self.lora_bias * self.scaling

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # Scale the thin rank-r intermediate, not the (tokens × out) update, and fuse the final add into
        # one addmm: two full-width elementwise passes (and their backward) fewer than the naive form.
        h = (self.dropout(x) @ self.lora_A.T) * self.scaling
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.T)
        out = out.view(base_out.shape)
        return out if self.lora_bias is None else out + self.lora_bias * self.scaling

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: LoRAArgs) -> int:
        return args.r * ((0 if args.freeze_A else in_features) + out_features) + (out_features if args.bias else 0)

    @classmethod
    def examples(cls) -> list[LoRAArgs]:
        return [LoRAArgs(r=4, alpha=8), LoRAArgs(r=2, alpha=3, rslora=True, bias=True)]

    file_keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_bias": "lora_B.bias"}

    @classmethod
    def peft_accepts(cls, config: dict[str, Any]) -> bool:
        return not config.get("use_dora")

    @classmethod
    def peft_config(cls, args: LoRAArgs) -> dict[str, Any]:
        return {"r": args.r, "lora_alpha": args.alpha, "lora_dropout": args.dropout, "init_lora_weights": True,
                "use_rslora": args.rslora, "lora_bias": args.bias, "bias": "none", "use_dora": False}

    @classmethod
    def args_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        if config.get("use_dora"):
            raise ValueError("PEFT adapter uses DoRA (use_dora=true), which form 'lora' does not implement")
        if config.get("bias", "none") != "none":
            raise ValueError(f"PEFT option bias={config['bias']!r} (trained base biases) is not supported")
        return {"r": int(config.get("r", 8)), "alpha": float(config.get("lora_alpha", 8)),
                "dropout": float(config.get("lora_dropout", 0.0) or 0.0),
                "rslora": bool(config.get("use_rslora", False)), "bias": bool(config.get("lora_bias", False))}


@dataclass(frozen=True)
class FFAArgs(LoRAArgs):
    freeze_A: bool = True


class FFALoRA(LoRA):
    """FFA-LoRA: LoRA with A frozen at its seeded init; only B trains (see the module docstring)."""

    name = "ffa"
    Args = FFAArgs

    @classmethod
    def examples(cls) -> list[LoRAArgs]:
        return [FFAArgs(r=4, alpha=8)]

    @classmethod
    def peft_accepts(cls, config: dict[str, Any]) -> bool:
        return False  # a PEFT file cannot say A was frozen: read it as plain LoRA
