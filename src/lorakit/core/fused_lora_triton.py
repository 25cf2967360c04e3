"""Triton backend of op ``fused_lora`` (LoRAFusion, arXiv 2510.00206, ``lorafusion/ops/triton_ops``).

**Untested on GPU**: written in a session without one; ``available()`` guards every use, and the
``torch`` backend (``core.fused_lora``) is the reference its tests must compare with on CUDA.

One kernel, :func:`_mm_lowrank_kernel`, computes OUT = P·Q + c·(U·V) ⊙ (mask·inv), a base GEMM with a
rank-r GEMM in the epilogue of each output tile (the rank-r operand is loaded once per tile, never a
full-width intermediate):

- forward ``fused_lora_xw_sb``: P = X, Q = Wᵀ, U = S = X̃·Aᵀ, V = Bᵀ, c = s, no mask (then + bias);
- backward ``fused_lora_dyw_dsa``: P = dY, Q = W, U = dS, V = A, c = 1, mask m, inv = 1/(1 − p).

S = X̃·Aᵀ, dS = s·dY·B, dB = s·dYᵀ·S and dA = dSᵀ·X̃ are thin GEMMs left to torch (lorakit's choice: the
code's ``fused_lora_dys_dyb`` also fuses dS and dB into one pass over dY). fp32 inputs go through
``tl.dot`` at Triton's default precision (TF32 on Ampere and later): compare with tolerances, not 1e-6.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # CPU builds: the torch reference is the only backend
    _HAVE_TRITON = False


def available() -> bool:
    return _HAVE_TRITON and torch.cuda.is_available()


if _HAVE_TRITON:

    @triton.jit
    def _mm_lowrank_kernel(P, Q, U, V, MASK, BIAS, OUT, M, N, K, R,
                           s_pm, s_pk, s_qk, s_qn, s_um, s_ur, s_vr, s_vn, s_mm, s_mn, s_om, s_on,
                           c, inv,
                           HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_R: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            p = tl.load(P + rm[:, None] * s_pm + rk[None, :] * s_pk,
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            q = tl.load(Q + rk[:, None] * s_qk + rn[None, :] * s_qn,
                        mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc += tl.dot(p, q)
        rr = tl.arange(0, BLOCK_R)
        u = tl.load(U + rm[:, None] * s_um + rr[None, :] * s_ur, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        v = tl.load(V + rr[:, None] * s_vr + rn[None, :] * s_vn, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        low = tl.dot(u, v) * c
        if HAS_MASK:
            keep = tl.load(MASK + rm[:, None] * s_mm + rn[None, :] * s_mn,
                           mask=(rm[:, None] < M) & (rn[None, :] < N), other=0)
            low = low * keep.to(tl.float32) * inv
        acc += low
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0)[None, :].to(tl.float32)
        tl.store(OUT + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(OUT.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def _mm_lowrank(P: torch.Tensor, Q: torch.Tensor, U: torch.Tensor, V: torch.Tensor, c: float,
                mask: torch.Tensor | None = None, inv: float = 1.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """P [M, K] · Q [K, N] + c·(U [M, R] · V [R, N]) ⊙ mask·inv (+ bias [N])."""
    M, K = P.shape
    N = Q.shape[1]
    R = U.shape[1]
    out = torch.empty((M, N), device=P.device, dtype=P.dtype)
    block_r = max(16, triton.next_power_of_2(R))
    BM, BN, BK = 64, 64, 32
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    m = mask if mask is not None else out  # a dummy pointer when HAS_MASK is False
    b = bias if bias is not None else out
    _mm_lowrank_kernel[grid](P, Q, U, V, m, b, out, M, N, K, R,
                             P.stride(0), P.stride(1), Q.stride(0), Q.stride(1), U.stride(0), U.stride(1),
                             V.stride(0), V.stride(1), m.stride(0), m.stride(1), out.stride(0), out.stride(1),
                             float(c), float(inv),
                             HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
                             BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=block_r)
    return out


class _TritonFusedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, mask, p):  # noqa: D102
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        keep = None if mask is None else mask.reshape(-1, x.shape[-1]).to(torch.uint8).contiguous()
        xm = x2 if keep is None else x2 * keep.to(x2.dtype) / (1.0 - p)
        s = xm @ A.t()
        y = _mm_lowrank(x2, weight.t(), s, B.t(), scale, bias=bias)
        ctx.save_for_backward(x2, weight, A, B, s, keep)
        ctx.scale, ctx.p, ctx.has_bias, ctx.lead = scale, p, bias is not None, lead
        return y.reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x2, weight, A, B, s, keep = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        scale, p = ctx.scale, ctx.p
        dB = scale * dy2.t() @ s
        dS = (scale * dy2 @ B).contiguous()
        xm = x2 if keep is None else x2 * keep.to(x2.dtype) / (1.0 - p)
        dA = dS.t() @ xm
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _mm_lowrank(dy2, weight, dS, A, 1.0, mask=keep, inv=1.0 / (1.0 - p)).reshape(*ctx.lead, -1)
        dW = dy2.t() @ x2 if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dW, db, dA, dB, None, None, None


def fused_lora(x, weight, bias, A, B, scale, mask, p):
    if not available():
        raise RuntimeError("the triton fused_lora backend needs CUDA and Triton")
    return _TritonFusedLoRA.apply(x, weight, bias, A, B, scale, mask, p)
