"""Export any mergeable adapter to a plain PEFT LoRA by truncated SVD of its ΔW.

For forms PEFT lacks: per module, ΔW = U Σ Vᵀ ≈ U_k Σ_k V_kᵀ, written as B = U_k Σ_k^{1/2},
A = Σ_k^{1/2} V_kᵀ with α = k (scale 1). By Eckart–Young this is the best rank-k approximation in
Frobenius norm; the relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F is reported per module and overall.
Input-dependent forms (no MERGEABLE capability) have no ΔW to export and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.inject import adapter_modules, specs
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterState


@dataclass
class ExportReport:
    rank: int
    relative_error: float  # over all modules: sqrt(Σ‖E‖²) / sqrt(Σ‖ΔW‖²)
    per_module: dict[str, float] = field(default_factory=dict)


def export_lora(model: nn.Module, name: str = "default", rank: int = 16) -> tuple[AdapterState, ExportReport]:
    """A plain-LoRA AdapterState approximating adapter ``name`` of ``model`` at ``rank``."""
    from lorakit.api import extract_state

    if rank < 1:
        raise ValueError(f"export rank must be >= 1, got {rank}")
    forms = adapter_modules(model, name)
    spec = specs(model)[name]
    refused = sorted({f.name for f in forms.values() if Cap.MERGEABLE not in f.caps})
    if refused:
        raise ValueError(f"adapter {name!r} uses form(s) {refused} whose update depends on the input "
                         "(not MERGEABLE): there is no fixed ΔW to export as a LoRA")
    tensors: dict[str, torch.Tensor] = {}
    per_module: dict[str, float] = {}
    err_sq = total_sq = 0.0
    has_bias = False
    with torch.no_grad():
        for path, form in forms.items():
            delta = form.delta_weight().detach().float().cpu()
            k = min(rank, *delta.shape)
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            root = s[:k].sqrt()
            b = torch.zeros(delta.shape[0], rank)
            a = torch.zeros(rank, delta.shape[1])
            b[:, :k] = u[:, :k] * root
            a[:k] = root[:, None] * vh[:k]
            tensors[f"{path}.lora_A.weight"] = a
            tensors[f"{path}.lora_B.weight"] = b
            bias = form.delta_bias()
            if bias is not None:
                has_bias = True
                tensors[f"{path}.lora_B.bias"] = bias.detach().float().cpu()
            err = float((delta - b @ a).norm() ** 2)
            norm = float(delta.norm() ** 2)
            per_module[path] = (err / norm) ** 0.5 if norm > 0 else 0.0
            err_sq, total_sq = err_sq + err, total_sq + norm
    if has_bias:  # LoRA's bias option is per adapter: give zero biases to modules without one
        for path, form in forms.items():
            tensors.setdefault(f"{path}.lora_B.bias", torch.zeros(form.out_features))
    source = extract_state(model, name)
    lora_spec = AdapterSpec(form="lora", form_args={"r": rank, "alpha": float(rank), "bias": has_bias},
                            targets=sorted(forms), exclude=[])
    meta = {**source.meta, "exported_from": spec.form, "export_rank": rank}
    state = AdapterState(spec=lora_spec, tensors=tensors, base=source.base, meta=meta)
    report = ExportReport(rank=rank, relative_error=(err_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0,
                          per_module=per_module)
    return state, report
