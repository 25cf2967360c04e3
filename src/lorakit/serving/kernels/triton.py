"""Triton backend (CUDA only) for batched multi-LoRA over the paged bank: a BGMV-style pair of kernels.

Per token m with adapter slot s (Punica's shrink/expand split, arXiv 2310.18547; S-LoRA's paged
MBGMV, arXiv 2311.03285 Sec. 5.1): ``shrink`` computes h[m] = A_s · x[m] page by page (page ids from
the slot's page table; no gather copy of the weights), ``expand`` computes out[m] += Bᵀ_sᵀ · h[m].
One program per (token, page) for shrink and per (token, output block) for expand; rows with slot -1
(the base model) or no pages in this module exit at once.

Status: minimal and untested on the machine this was written on (no GPU); the tests run it against
the torch reference only when CUDA and triton are available. ``available()`` guards every use.
"""

from __future__ import annotations

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no triton"
    _HAVE_TRITON = False


def available() -> bool:
    return _HAVE_TRITON and torch.cuda.is_available()


if _HAVE_TRITON:  # pragma: no cover - needs a GPU

    @triton.jit
    def _shrink(x_ptr, slot_ptr, table_ptr, npages_ptr, a_ptr, h_ptr, in_features, max_pages, h_stride,
                PAGE: tl.constexpr, BLOCK_K: tl.constexpr):
        m = tl.program_id(0)
        p = tl.program_id(1)
        slot = tl.load(slot_ptr + m)
        if slot < 0:
            return
        n = tl.load(npages_ptr + slot)
        if p >= n:
            return
        page = tl.load(table_ptr + slot * max_pages + p)
        rows = tl.arange(0, PAGE)
        acc = tl.zeros((PAGE,), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < in_features
            xv = tl.load(x_ptr + m * in_features + ks, mask=kmask, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + (page * PAGE + rows[:, None]) * in_features + ks[None, :], mask=kmask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(a * xv[None, :], axis=1)
        tl.store(h_ptr + m * h_stride + p * PAGE + rows, acc)

    @triton.jit
    def _expand(h_ptr, slot_ptr, table_ptr, npages_ptr, bt_ptr, out_ptr, out_features, max_pages, h_stride,
                PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
        m = tl.program_id(0)
        nb = tl.program_id(1)
        slot = tl.load(slot_ptr + m)
        if slot < 0:
            return
        n = tl.load(npages_ptr + slot)
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < out_features
        rows = tl.arange(0, PAGE)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for p in range(0, n):
            page = tl.load(table_ptr + slot * max_pages + p)
            h = tl.load(h_ptr + m * h_stride + p * PAGE + rows)
            bt = tl.load(bt_ptr + (page * PAGE + rows[:, None]) * out_features + cols[None, :], mask=cmask[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(bt * h[:, None], axis=0)
        prev = tl.load(out_ptr + m * out_features + cols, mask=cmask, other=0.0)
        tl.store(out_ptr + m * out_features + cols, (prev.to(tl.float32) + acc).to(prev.dtype), mask=cmask)


def batched_lora(x: torch.Tensor, out: torch.Tensor, layer, plan) -> torch.Tensor:
    """Same contract as ``torch_ref.batched_lora``; every token of a row uses the row's slot."""
    if not available():
        raise RuntimeError("the triton backend needs the triton package and a CUDA device")
    if not plan.any_active:
        return out
    page = layer.page_rows
    if page & (page - 1):
        raise ValueError(f"the triton backend needs a power-of-two page_rows, got {page}")
    b = plan.slots.numel()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out2 = out.view(-1, out.shape[-1])
    tokens = x2.shape[0] // b
    slots = plan.slots.repeat_interleave(tokens).to(torch.int32).contiguous()
    max_pages = layer.page_table.shape[1]
    h = torch.zeros(x2.shape[0], max_pages * page, dtype=torch.float32, device=x.device)
    table = layer.page_table.to(torch.int32).contiguous()
    npages = layer.npages.to(torch.int32).contiguous()
    _shrink[(x2.shape[0], max_pages)](x2, slots, table, npages, layer.A_pool, h, layer.in_features, max_pages,
                                      h.stride(0), PAGE=page, BLOCK_K=128)
    block_n = 128
    _expand[(x2.shape[0], triton.cdiv(layer.out_features, block_n))](
        h, slots, table, npages, layer.Bt_pool, out2, layer.out_features, max_pages, h.stride(0), PAGE=page,
        BLOCK_N=block_n)
    return out
