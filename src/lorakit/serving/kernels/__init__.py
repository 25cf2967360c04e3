"""Batched multi-LoRA kernels over the serving bank's pages: op ``paged`` of the core's backend registry.

``batched_lora(x, out, bank_layer, row_slots_or_plan, backend="auto", path="auto") -> out`` adds to
``out`` (B, ..., out_features) each row's LoRA update of ``x`` (B, ..., in_features), row b using the
adapter in slot ``row_slots[b]`` of the bank (-1 = base model, no update).
Backends (one file each, registered in ``lorakit.core.batched``): ``torch`` (``torch_ref``, the
reference, everywhere) and ``triton`` (``triton.py``, available only for CUDA tensors with Triton
installed; ``auto`` prefers it there by priority).
"""

from __future__ import annotations

import torch

from lorakit.core.batched import choose_backend, register_backend
from lorakit.serving.kernels.torch_ref import RowPlan, choose_path
from lorakit.serving.kernels.torch_ref import batched_lora as _torch_batched_lora


def triton_available() -> bool:
    from lorakit.serving.kernels import triton as triton_backend

    return triton_backend.available()


def _triton_batched_lora(x: torch.Tensor, out: torch.Tensor, bank_layer, plan: RowPlan) -> torch.Tensor:
    from lorakit.serving.kernels import triton as triton_backend

    return triton_backend.batched_lora(x, out, bank_layer, plan)


register_backend("paged", "torch", _torch_batched_lora, priority=0)
register_backend("paged", "triton", _triton_batched_lora,
                 available=lambda x, *a, **k: bool(x.is_cuda) and triton_available(), priority=10)


def batched_lora(x: torch.Tensor, out: torch.Tensor, bank_layer, row_slots: torch.Tensor | RowPlan, *,
                 backend: str = "auto", path: str = "auto") -> torch.Tensor:
    plan = row_slots if isinstance(row_slots, RowPlan) else RowPlan.build(
        row_slots, tokens_per_row=x[0].numel() // x.shape[-1] if x.dim() > 2 else 1, path=path)
    return choose_backend("paged", backend, x, out, bank_layer, plan).fn(x, out, bank_layer, plan)


__all__ = ["RowPlan", "batched_lora", "choose_path", "triton_available"]
