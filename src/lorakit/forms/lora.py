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

Layers beyond Linear/Conv1D, with PEFT's layouts and semantics (``peft.tuners.lora.layer``):

- **Conv2d** (groups = 1; weight W ∈ R^{out×in×kh×kw}): A is a convolution with the base layer's kernel,
  stride, padding, dilation and padding mode, A ∈ R^{r×in×kh×kw} (file key ``lora_A.weight``), B a 1×1
  convolution B ∈ R^{out×r×1×1} (``lora_B.weight``, bias ``lora_B.bias``):
  h = W0 ⋆ x + s·B ⋆ (A ⋆ x), and since a 1×1 convolution mixes channels only,
  ΔW = s·(B_{:, :, 0, 0} · A.flatten(1)).reshape(out, in, kh, kw), so W0 ⋆ x + ΔW ⋆ x is the same map (merge
  is exact). Trainable parameters r·(in·kh·kw + out).
- **Embedding** (weight E ∈ R^{num×dim}, the linear map one-hot(id) ↦ Eᵀ·one-hot(id), so in = num and
  out = dim): A ∈ R^{r×num} (``lora_embedding_A``), B ∈ R^{dim×r} (``lora_embedding_B``);
  h = E[id] + s·B·A[:, id] = E[id] + s·(Aᵀ[id] · Bᵀ), the lookup of Aᵀ using the base layer's padding_idx,
  max_norm, norm_type, scale_grad_by_freq and sparse, and times the base layer's ``embed_scale`` where it
  has one (scaled embeddings such as Gemma's), as PEFT. ΔW = s·B·A in (dim, num) layout, i.e. s·(B·A)ᵀ in
  the weight's own (num, dim) layout. As PEFT: A = 0 and B ~ N(0, 1) at init (the zero factor is the one
  that keeps ΔW = 0; with ``freeze_A`` the frozen A is N(0, 1) and B = 0 instead, or A would stay 0), no
  dropout (PEFT's embedding forward applies none) and no ``bias``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
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



def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    """s = α/r (LoRA, Eq. 4 of arXiv 2106.09685) or α/√r (rsLoRA, arXiv 2312.03732)."""
    return alpha / (math.sqrt(r) if rslora else r)

class LoRA(Form):
    name = "lora"
    Args = LoRAArgs
    caps = (Cap.FACTORED_AB | Cap.MERGEABLE | Cap.CONV1D_OK | Cap.IDENTITY_AT_INIT | Cap.CONV2D_OK
            | Cap.EMBEDDING_OK)
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    peft_type = "LORA"
    peft_patterns = {"r": "rank_pattern", "alpha": "alpha_pattern"}

    def __init__(self, base_layer: nn.Module, args: LoRAArgs) -> None:
        super().__init__(base_layer, args)
        device = base_layer.weight.device
        # A's trailing dims: the kernel on a Conv2d (A is a convolution), none otherwise; B is a 1×1 conv there
        a_tail = tuple(base_layer.kernel_size) if self.layer_kind == "conv2d" else ()
        b_tail = (1, 1) if self.layer_kind == "conv2d" else ()
        if self.layer_kind == "embedding" and args.bias:
            raise ValueError("lora: bias=True is not supported on Embedding layers (PEFT has no lora_bias there)")
        self.lora_A = nn.Parameter(torch.empty(args.r, self.in_features, *a_tail, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, args.r, *b_tail, device=device))
        self.lora_bias = nn.Parameter(torch.zeros(self.out_features, device=device)) if args.bias else None
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        if args.freeze_A:
            self.frozen.add("lora_A")
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return lora_scaling(self.args.alpha, self.lora_A.shape[0], self.args.rslora)

    def reset_parameters(self) -> None:
        if self.layer_kind == "embedding" and not self.args.freeze_A:
            nn.init.zeros_(self.lora_A)  # PEFT's embedding init: A = 0, B like nn.Embedding's default N(0, 1)
            nn.init.normal_(self.lora_B)
            return
        if self.layer_kind == "embedding":
            nn.init.normal_(self.lora_A)  # a frozen A must not be the zero factor
        else:
            # on a Conv2d the fan-in is in·kh·kw, as for PEFT's lora_A convolution
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.lora_bias is not None:
            nn.init.zeros_(self.lora_bias)

    def delta_weight(self) -> torch.Tensor:
        if self.layer_kind == "conv2d":  # (out, r)·(r, in·kh·kw), back to the kernel's (out, in, kh, kw)
            delta = self.lora_B.flatten(1) @ self.lora_A.flatten(1)
            return delta.view(self.out_features, *self.lora_A.shape[1:]) * self.scaling
        return (self.lora_B @ self.lora_A) * self.scaling

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.lora_bias is None else self.lora_bias * self.scaling

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.layer_kind == "conv2d":
            return self._apply_conv2d(x, base_out)
        if self.layer_kind == "embedding":
            return self._apply_embedding(x, base_out)
        # Scale the thin rank-r intermediate, not the (tokens × out) update, and fuse the final add into
        # one addmm: two full-width elementwise passes (and their backward) fewer than the naive form.
        h = (self.dropout(x) @ self.lora_A.T) * self.scaling
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.T)
        out = out.view(base_out.shape)
        return out if self.lora_bias is None else out + self.lora_bias * self.scaling

    def _apply_conv2d(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # A convolves with the base layer's own geometry (stride, padding, dilation, padding mode), so the
        # rank-r map lands on the base output's spatial grid; B (1×1) then mixes r channels into out.
        h = self._base_layer._conv_forward(self.dropout(x), self.lora_A, None) * self.scaling
        out = base_out + F.conv2d(h, self.lora_B)
        return out if self.lora_bias is None else out + (self.lora_bias * self.scaling).view(-1, 1, 1)

    def _apply_embedding(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # The layer may hand over the ids cast to the form's float dtype; ids are exact integers there.
        ids = x.round().long() if x.is_floating_point() else x
        base = self._base_layer
        after_a = F.embedding(ids, self.lora_A.T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                              sparse=base.sparse)
        delta = (after_a @ self.lora_B.T) * self.scaling
        # Scaled embeddings (Gemma) multiply the lookup by a scalar ``embed_scale``: the update too (as PEFT,
        # which ignores a non-scalar one)
        scale = getattr(base, "embed_scale", None)
        if scale is not None and torch.as_tensor(scale).numel() == 1:
            delta = delta * torch.as_tensor(scale, dtype=delta.dtype, device=delta.device)
        return base_out + delta

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: LoRAArgs) -> int:
        """On a Linear/Conv1D/Embedding; on a Conv2d ``in_features`` is in_channels·kh·kw."""
        return args.r * ((0 if args.freeze_A else in_features) + out_features) + (out_features if args.bias else 0)

    @classmethod
    def examples(cls) -> list[LoRAArgs]:
        return [LoRAArgs(r=4, alpha=8), LoRAArgs(r=2, alpha=3, rslora=True, bias=True)]

    file_keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_bias": "lora_B.bias"}
    layer_file_keys = {"embedding": {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}}

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
    caps = LoRA.caps | Cap.FROZEN_A

    @classmethod
    def examples(cls) -> list[LoRAArgs]:
        return [FFAArgs(r=4, alpha=8)]

    @classmethod
    def peft_accepts(cls, config: dict[str, Any]) -> bool:
        return False  # a PEFT file cannot say A was frozen: read it as plain LoRA
