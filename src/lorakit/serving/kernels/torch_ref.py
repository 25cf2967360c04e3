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

Pages are gathered with one ``index_select`` over the pool seen as (pages, page_rows·width) rows
(``gather_pages``; advanced indexing was the largest LoRA cost of a CPU decode step). The gathered
weights of a layer are cached on the RowPlan (``RowPlan.gathered``, up to ``gather_limit`` bytes) and
reused while the plan is (decode steps with unchanged row slots, ``ServingContext.set_rows``) and the
bank layer's ``version`` is unchanged. See bench/serving/README.md for the profile.
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
    gathered: dict = field(default_factory=dict)  # id(bank layer) -> (layer version, groups, bytes)
    gather_limit: int = 0  # bytes of gathered weights the plan may keep across steps (0: none)
    gather_bytes: int = 0

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


def gather_pages(pool: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """``pool[pages]`` for a 1-D page list, as one ``index_select`` over the pool seen as (P, page_rows·width)
    rows: on CPU about 7x faster than advanced indexing (``aten::index``), which dominated the decode
    profile (bench/serving/README.md)."""
    return pool.view(pool.shape[0], -1).index_select(0, pages)


def _prepared(plan: RowPlan, layer, build) -> list:
    """``build()`` (a list of (rows or None, A, Bᵀ) groups of gathered weights) for ``layer``, cached on
    the plan while the layer's version is unchanged and the plan's byte allowance holds it: decode steps
    that reuse the plan (same row slots, see ``ServingContext.set_rows``) skip the gathers."""
    key = id(layer)
    hit = plan.gathered.get(key)
    if hit is not None and hit[0] == layer.version:
        return hit[1]
    groups = build()
    if hit is not None:
        plan.gather_bytes -= hit[2]
        del plan.gathered[key]
    nbytes = sum(a.numel() * a.element_size() + bt.numel() * bt.element_size() for _, a, bt in groups)
    if plan.gather_bytes + nbytes <= plan.gather_limit:
        plan.gathered[key] = (layer.version, groups, nbytes)
        plan.gather_bytes += nbytes
    return groups


def sgmv(x3: torch.Tensor, out3: torch.Tensor, layer, plan: RowPlan) -> torch.Tensor:
    def build():
        groups = []
        for slot, rows in plan.segments:
            n = int(layer.npages[slot])
            if n == 0:  # this adapter does not target this module
                continue
            pages = layer.page_table[slot, :n]
            a = gather_pages(layer.A_pool, pages).view(-1, layer.in_features)
            bt = gather_pages(layer.Bt_pool, pages).view(-1, layer.out_features)
            groups.append((None if rows.numel() == x3.shape[0] else rows, a, bt))
        return groups

    for rows, a, bt in _prepared(plan, layer, build):
        if rows is None:
            out3.add_(((x3 @ a.T) @ bt).to(out3.dtype))
        else:
            out3.index_add_(0, rows, ((x3.index_select(0, rows) @ a.T) @ bt).to(out3.dtype))
    return out3


def _bgmv_gather(layer, rows: torch.Tensor | None, slots: torch.Tensor, maxp: int) -> tuple:
    idx = layer.page_table.index_select(0, slots)[:, :maxp]  # (n, maxp), padded with the zero page
    n, r = idx.shape[0], maxp * layer.page_rows
    flat = idx.reshape(-1)
    return (rows, gather_pages(layer.A_pool, flat).view(n, r, layer.in_features),
            gather_pages(layer.Bt_pool, flat).view(n, r, layer.out_features))


def _bgmv_groups(layer, plan: RowPlan) -> list:
    """Gather each row's pages. Rows whose page counts differ by more than 2x go in separate buckets
    (page counts in (2^(k-1), 2^k]) so padding never more than doubles the work."""
    s = plan.active_slots
    npages = layer.npages.index_select(0, s)
    maxp = int(npages.max())
    if maxp == 0:
        return []
    minp = int(torch.where(npages > 0, npages, maxp).min())  # smallest nonzero (no boolean-mask gather)
    if maxp <= 2 * minp:
        return [_bgmv_gather(layer, plan.active, s, maxp)]
    keys = torch.ceil(torch.log2(npages.clamp_min(1).float())).long()
    keys[npages == 0] = -1
    rows_all = plan.active if plan.active is not None else torch.arange(s.numel(), device=s.device)
    groups = []
    for key in torch.unique(keys).tolist():
        if key < 0:
            continue
        sel = (keys == key).nonzero().flatten()
        groups.append(_bgmv_gather(layer, rows_all.index_select(0, sel), s.index_select(0, sel),
                                   int(npages.index_select(0, sel).max())))
    return groups


def bgmv(x3: torch.Tensor, out3: torch.Tensor, layer, plan: RowPlan) -> torch.Tensor:
    """Per-row gathered weights (``_bgmv_groups``), one pair of batched matmuls per bucket."""
    for rows, a, bt in _prepared(plan, layer, lambda: _bgmv_groups(layer, plan)):
        xs = x3 if rows is None else x3.index_select(0, rows)
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), bt).to(out3.dtype)
        if rows is None:
            out3.add_(delta)
        else:
            out3.index_add_(0, rows, delta)
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
