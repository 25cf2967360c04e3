"""Op ``fused_lora``: a LoRA linear layer split at the rank-r tensor, as LoRAFusion's kernels.

LoRAFusion (Zhu et al., EuroSys 2026, arXiv 2510.00206; ``CentML/lorafusion``,
``lorafusion/ops/lora_v1.py::FusedLinearLoRA``, reference ``lora_torch_ref.py``) fuses the memory-bound
LoRA GEMMs into the base GEMMs but "splits the graph" at the small tensor S = dropout(X)·Aᵀ [tokens, r],
so nothing needs recomputation or a grid-wide synchronisation. With X [M, in], W [out, in], A [r, in],
B [out, r], mask m ∈ {0, 1}^{M×in} (dropout p; m = 1, p = 0 without dropout) and X̃ = X ⊙ m / (1 − p):

forward  S = X̃·Aᵀ                                        (``fused_dropout_matmul``)
         Y = X·Wᵀ + b + s·S·Bᵀ                             (``fused_lora_xw_sb``: one GEMM, B in the epilogue)
backward dB = s·dYᵀ·S,   dS = s·dY·B                       (``fused_lora_dys_dyb``: one pass over dY)
         dA = dSᵀ·X̃                                        (torch)
         dX = dY·W + (dS·A) ⊙ m / (1 − p)                  (``fused_lora_dyw_dsa``)
         db = Σ_rows dY,  dW = dYᵀ·X (only if W requires grad; the frozen base never does)

The base GEMM sees X, the LoRA path X̃ (LoRA's definition and LoRAFusion's single-LoRA path; its
multi-LoRA path swaps them, LATER-ROWS §6.4). ``s`` is the scale itself (the code's ``alpha``; the
caller passes α/r). The same mask is used by forward and backward (it is saved, not redrawn).

Backends (``core.batched`` registry, op ``fused_lora``): ``torch`` (:class:`FusedLoRAFunction`, the
explicit split forward/backward above; every device) and ``triton`` (``core/fused_lora_triton.py``,
CUDA tensors with Triton installed, priority 10). **The Triton backend is untested on GPU** (written in a
session without one).
"""

from __future__ import annotations

import torch

from lorakit.core.batched import choose_backend, register_backend


class FusedLoRAFunction(torch.autograd.Function):
    """The split forward/backward of the module docstring in plain torch (the CPU path and the reference)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, mask, p):  # noqa: D102
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        keep = None if mask is None else mask.reshape(-1, x.shape[-1]).to(x.dtype)
        xm = x2 if keep is None else x2 * keep / (1.0 - p)
        s = xm @ A.t()
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y = torch.addmm(y, s, B.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, A, B, s, keep)
        ctx.scale, ctx.p, ctx.has_bias, ctx.lead = scale, p, bias is not None, lead
        return y.reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x2, weight, A, B, s, keep = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        scale, p = ctx.scale, ctx.p
        dB = scale * dy2.t() @ s
        dS = scale * dy2 @ B
        xm = x2 if keep is None else x2 * keep / (1.0 - p)
        dA = dS.t() @ xm
        dx = None
        if ctx.needs_input_grad[0]:
            low = dS @ A
            dx = dy2 @ weight + (low if keep is None else low * keep / (1.0 - p))
            dx = dx.reshape(*ctx.lead, x2.shape[-1])
        dW = dy2.t() @ x2 if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dW, db, dA, dB, None, None, None


def fused_lora_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                         B: torch.Tensor, scale: float, *, mask: torch.Tensor | None = None,
                         p: float = 0.0) -> torch.Tensor:
    """The ``torch`` backend: :class:`FusedLoRAFunction` (differentiable in x, W, b, A, B)."""
    _check(x, weight, A, B, mask, p)
    return FusedLoRAFunction.apply(x, weight, bias, A, B, float(scale), mask, float(p))


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor | None:
    """A keep-mask (True = kept) with P(keep) = 1 − p, or None for p = 0."""
    if p <= 0:
        return None
    return torch.rand(shape, generator=generator, device=device) >= p


def _check(x, weight, A, B, mask, p) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"fused_lora: dropout p must be in [0, 1), got {p}")
    r, k = A.shape
    if x.shape[-1] != k or weight.shape[1] != k or B.shape != (weight.shape[0], r):
        raise ValueError(f"fused_lora: shapes do not match: x {tuple(x.shape)}, W {tuple(weight.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(x.shape):
        raise ValueError(f"fused_lora: mask shape {tuple(mask.shape)} != x shape {tuple(x.shape)}")
    if p > 0 and mask is None:
        raise ValueError("fused_lora: p > 0 needs the dropout mask (draw it with dropout_mask)")


def _triton_available(x: torch.Tensor, *args, **kwargs) -> bool:
    if not x.is_cuda:
        return False
    from lorakit.core import fused_lora_triton

    return fused_lora_triton.available()


def _triton_fused_lora(x, weight, bias, A, B, scale, *, mask=None, p=0.0):
    from lorakit.core import fused_lora_triton

    _check(x, weight, A, B, mask, p)
    return fused_lora_triton.fused_lora(x, weight, bias, A, B, float(scale), mask, float(p))


register_backend("fused_lora", "torch", fused_lora_reference, priority=0)
register_backend("fused_lora", "triton", _triton_fused_lora, available=_triton_available, priority=10)


def fused_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
               scale: float, *, mask: torch.Tensor | None = None, p: float = 0.0,
               backend: str = "auto") -> torch.Tensor:
    """Y = X·Wᵀ + b + s·(X ⊙ m/(1−p))·Aᵀ·Bᵀ through the registry (see the module docstring)."""
    kwargs = {"mask": mask, "p": p}
    return choose_backend("fused_lora", backend, x, weight, bias, A, B, scale, **kwargs).fn(
        x, weight, bias, A, B, scale, **kwargs)
