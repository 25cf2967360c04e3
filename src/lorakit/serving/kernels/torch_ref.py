"""Pure-PyTorch reference kernels for batched multi-LoRA: out[b] += (x[b] · A_{s_b}ᵀ) · B_{s_b}ᵀ·s.

Two paths over the same paged bank (``lorakit.serving.bank.BankLayer``):

- ``sgmv``: Punica's Segmented Gather Matrix-Vector multiplication (Chen et al., MLSys 2024,
  arXiv 2310.18547, Sec. 4): rows are grouped by adapter into segments and each segment does two
  dense matmuls with that adapter's weights, read once per segment. Best when segments are long
  (prefill, or many rows sharing an adapter).
- ``bgmv``: the per-row gather path (Punica's BGMV / S-LoRA's MBGMV, Sheng et al., MLSys 2024,
  arXiv 2311.03285, Sec. 5): every row gathers its adapter's pages (padded to the largest page count
  in the batch with the all-zero page 0, which adds exactly 0) and one batched matmul does all rows.
  No Python loop over adapters; best for decode with many distinct adapters.

``choose_path`` picks per step: sgmv when a row has more than one token (prefill) or when there are
at least 4 rows per distinct adapter, else bgmv. Both are exact (same math, different grouping).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SGMV_MIN_ROWS_PER_ADAPTER = 4


@dataclass
class RowPlan:
    """Per-step batch layout shared by every layer: row slots (-1 = base), active rows, segments."""

    slots: torch.Tensor  # (B,) long
    tokens_per_row: int = 1
    path: str = "auto"
    active: torch.Tensor | None = None  # indices of rows with an adapter; None = all rows
    active_slots: torch.Tensor | None = None
    segments: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (slot, row indices)
    any_active: bool = False

    @classmethod
    def build(cls, slots: torch.Tensor, tokens_per_row: int = 1, path: str = "auto") -> RowPlan:
        slots = slots.reshape(-1).long()
        mask = slots >= 0
        n_active = int(mask.sum())
        plan = cls(slots=slots, tokens_per_row=tokens_per_row, any_active=n_active > 0)
        if n_active == 0:
            plan.path = "none"
            return plan
        if n_active < slots.numel():
            plan.active = mask.nonzero().flatten()
            plan.active_slots = slots[plan.active]
        else:
            plan.active_slots = slots
        uniq, counts = torch.unique(plan.active_slots, return_counts=True)
        plan.path = path if path != "auto" else choose_path(n_active, uniq.numel(), tokens_per_row)
        if plan.path == "sgmv":
            order = torch.argsort(plan.active_slots, stable=True)
            rows = order if plan.active is None else plan.active[order]
            starts = [0, *torch.cumsum(counts, 0).tolist()]
            plan.segments = [(int(s), rows[starts[i]:starts[i + 1]]) for i, s in enumerate(uniq.tolist())]
        elif plan.path != "bgmv":
            raise ValueError(f"unknown batched-LoRA path {path!r}; use 'auto', 'sgmv' or 'bgmv'")
        return plan


def choose_path(rows: int, distinct: int, tokens_per_row: int) -> str:
    if tokens_per_row > 1 or rows >= SGMV_MIN_ROWS_PER_ADAPTER * distinct:
        return "sgmv"
    return "bgmv"


def sgmv(x3: torch.Tensor, out3: torch.Tensor, layer, plan: RowPlan) -> torch.Tensor:
    for slot, rows in plan.segments:
        n = int(layer.npages[slot])
        if n == 0:  # this adapter does not target this module
            continue
        pages = layer.page_table[slot, :n]
        a = layer.A_pool[pages].reshape(-1, layer.in_features)
        bt = layer.Bt_pool[pages].reshape(-1, layer.out_features)
        if rows.numel() == x3.shape[0]:
            out3.add_(((x3 @ a.T) @ bt).to(out3.dtype))
        else:
            out3.index_add_(0, rows, ((x3.index_select(0, rows) @ a.T) @ bt).to(out3.dtype))
    return out3


def _bgmv_rows(x3, out3, layer, rows: torch.Tensor | None, slots: torch.Tensor, maxp: int) -> None:
    idx = layer.page_table.index_select(0, slots)[:, :maxp]  # (n, maxp), padded with the zero page
    n, r = idx.shape[0], maxp * layer.page_rows
    a = layer.A_pool[idx].view(n, r, layer.in_features)
    bt = layer.Bt_pool[idx].view(n, r, layer.out_features)
    xs = x3 if rows is None else x3.index_select(0, rows)
    delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), bt).to(out3.dtype)
    if rows is None:
        out3.add_(delta)
    else:
        out3.index_add_(0, rows, delta)


def bgmv(x3: torch.Tensor, out3: torch.Tensor, layer, plan: RowPlan) -> torch.Tensor:
    """Gather each row's pages and batch-multiply. Rows whose page counts differ by more than 2x go
    in separate buckets (page counts in (2^(k-1), 2^k]) so padding never more than doubles the work."""
    s = plan.active_slots
    npages = layer.npages.index_select(0, s)
    maxp = int(npages.max())
    if maxp == 0:
        return out3
    minp = int(npages[npages > 0].min())
    if maxp <= 2 * minp:
        _bgmv_rows(x3, out3, layer, plan.active, s, maxp)
        return out3
    keys = torch.ceil(torch.log2(npages.clamp_min(1).float())).long()
    keys[npages == 0] = -1
    rows_all = plan.active if plan.active is not None else torch.arange(s.numel(), device=s.device)
    for key in torch.unique(keys).tolist():
        if key < 0:
            continue
        sel = (keys == key).nonzero().flatten()
        _bgmv_rows(x3, out3, layer, rows_all.index_select(0, sel), s.index_select(0, sel),
                   int(npages.index_select(0, sel).max()))
    return out3


def batched_lora(x: torch.Tensor, out: torch.Tensor, layer, plan: RowPlan) -> torch.Tensor:
    """``out`` (B, ..., out) += per-row LoRA of ``x`` (B, ..., in); rows follow ``plan.slots``."""
    if not plan.any_active:
        return out
    b = plan.slots.numel()
    x3 = x.reshape(b, -1, x.shape[-1])
    out3 = out.view(b, -1, out.shape[-1])
    if x3.dtype != layer.A_pool.dtype:
        x3 = x3.to(layer.A_pool.dtype)
    if plan.path == "sgmv":
        sgmv(x3, out3, layer, plan)
    else:
        bgmv(x3, out3, layer, plan)
    return out
