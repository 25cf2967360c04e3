"""Batched multi-LoRA kernels: one interface, one file per backend.

``batched_lora(x, out, bank_layer, row_slots_or_plan, backend="auto", path="auto") -> out`` adds to
``out`` (B, ..., out_features) each row's LoRA update of ``x`` (B, ..., in_features), row b using the
adapter in slot ``row_slots[b]`` of the bank (-1 = base model, no update).
Backends: ``torch`` (``torch_ref``, the reference, everywhere) and ``triton`` (``triton.py``, only
when Triton and CUDA are available; ``auto`` picks it for CUDA tensors then).
"""

from __future__ import annotations

import torch

from lorakit.serving.kernels.torch_ref import RowPlan, choose_path
from lorakit.serving.kernels.torch_ref import batched_lora as _torch_batched_lora


def triton_available() -> bool:
    from lorakit.serving.kernels import triton as triton_backend

    return triton_backend.available()


def batched_lora(x: torch.Tensor, out: torch.Tensor, bank_layer, row_slots: torch.Tensor | RowPlan, *,
                 backend: str = "auto", path: str = "auto") -> torch.Tensor:
    plan = row_slots if isinstance(row_slots, RowPlan) else RowPlan.build(
        row_slots, tokens_per_row=x[0].numel() // x.shape[-1] if x.dim() > 2 else 1, path=path)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown kernel backend {backend!r}; use 'auto', 'torch' or 'triton'")
    if backend == "triton" or (backend == "auto" and x.is_cuda and triton_available()):
        from lorakit.serving.kernels import triton as triton_backend

        return triton_backend.batched_lora(x, out, bank_layer, plan)
    return _torch_batched_lora(x, out, bank_layer, plan)


__all__ = ["RowPlan", "batched_lora", "choose_path", "triton_available"]
