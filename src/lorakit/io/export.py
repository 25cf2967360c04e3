"""Export any mergeable adapter to a plain PEFT LoRA.

``export_lora``: for forms PEFT lacks, per module, ΔW = U Σ Vᵀ ≈ U_k Σ_k V_kᵀ written as
B = U_k Σ_k^{1/2}, A = Σ_k^{1/2} V_kᵀ with α = k (scale 1). By Eckart–Young this is the best rank-k
approximation in Frobenius norm; the relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F is reported per module and
overall. Input-dependent forms (no MERGEABLE capability) have no ΔW to export and are refused.

``export_for_original_base``: an adapter whose init rewrote the base (W_res = W − ΔW0, as PiSSA and
LoRA-GA do) is, relative to the ORIGINAL weight W, the update ΔW − ΔW0 (PEFT's
``path_initial_model_for_weight_conversion``). For factored forms ΔW − ΔW0 = s·[B, −B0]·[A; A0]
exactly (rank 2r); other forms use the SVD export at rank 2r, exact whenever rank(ΔW − ΔW0) ≤ 2r.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.inject import adapter_modules, specs
from lorakit.core.layer import initial_delta
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterState
from lorakit.forms.base import Form


@dataclass
class ExportReport:
    rank: int
    relative_error: float  # over all modules: sqrt(Σ‖E‖²) / sqrt(Σ‖ΔW‖²)
    per_module: dict[str, float] = field(default_factory=dict)


def _check_mergeable(name: str, forms: dict[str, Form]) -> None:
    refused = sorted({f.name for f in forms.values() if Cap.MERGEABLE not in f.caps})
    if refused:
        raise ValueError(f"adapter {name!r} uses form(s) {refused} whose update depends on the input "
                         "(not MERGEABLE): there is no fixed ΔW to export as a LoRA")


def _svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = min(rank, *delta.shape)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:k].sqrt()
    b = torch.zeros(delta.shape[0], rank)
    a = torch.zeros(rank, delta.shape[1])
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a


def _lora_state(model: nn.Module, name: str, rank: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                deltas: dict[str, tuple[torch.Tensor, torch.Tensor | None]], meta: dict) -> tuple[AdapterState,
                                                                                                 ExportReport]:
    """A plain LoRA state (α = rank, scale 1) from per-module factors, with the error against ``deltas``."""
    from lorakit.api import extract_state

    tensors: dict[str, torch.Tensor] = {}
    per_module: dict[str, float] = {}
    err_sq = total_sq = 0.0
    has_bias = any(bias is not None for _, bias in deltas.values())
    for path, (b, a) in factors.items():
        delta, bias = deltas[path]
        tensors[f"{path}.lora_A.weight"] = a.contiguous()
        tensors[f"{path}.lora_B.weight"] = b.contiguous()
        if has_bias:  # LoRA's bias option is per adapter: modules without one get zeros
            tensors[f"{path}.lora_B.bias"] = bias if bias is not None else torch.zeros(delta.shape[0])
        err, norm = float((delta - b @ a).norm() ** 2), float(delta.norm() ** 2)
        per_module[path] = (err / norm) ** 0.5 if norm > 0 else 0.0
        err_sq, total_sq = err_sq + err, total_sq + norm
    source = extract_state(model, name)
    spec = AdapterSpec(form="lora", form_args={"r": rank, "alpha": float(rank), "bias": has_bias},
                       targets=sorted(factors), exclude=[])
    report = ExportReport(rank=rank, relative_error=(err_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0,
                          per_module=per_module)
    export = {**meta, "rank": rank, "relative_error": report.relative_error}
    state = AdapterState(spec=spec, tensors=tensors, base=source.base,
                         meta={**source.meta, "export": export})
    return state, report


def export_lora(model: nn.Module, name: str = "default", rank: int = 16) -> tuple[AdapterState, ExportReport]:
    """A plain-LoRA AdapterState approximating adapter ``name`` of ``model`` at ``rank``."""
    if rank < 1:
        raise ValueError(f"export rank must be >= 1, got {rank}")
    forms = adapter_modules(model, name)
    _check_mergeable(name, forms)
    deltas, factors = {}, {}
    with torch.no_grad():
        for path, form in forms.items():
            delta = form.delta_weight().detach().float().cpu()
            bias = form.delta_bias()
            deltas[path] = (delta, None if bias is None else bias.detach().float().cpu())
            factors[path] = _svd_factors(delta, rank)
    return _lora_state(model, name, rank, factors, deltas, {"from": specs(model)[name].form, "method": "svd"})


def export_for_original_base(model: nn.Module, name: str = "default") -> tuple[AdapterState, ExportReport]:
    """The plain LoRA that applied to the ORIGINAL base weights reproduces the adapted model."""
    forms = adapter_modules(model, name)
    _check_mergeable(name, forms)
    deltas, factors, ranks = {}, {}, []
    with torch.no_grad():
        for path, form in forms.items():
            offset = initial_delta(form)
            d0, b0 = offset if offset is not None else (None, None)
            delta = form.delta_weight().detach().float().cpu()
            bias = form.delta_bias()
            bias = None if bias is None else bias.detach().float().cpu()
            if d0 is not None:
                delta = delta - d0.float().cpu()
                if b0 is not None:
                    bias = (bias if bias is not None else 0.0) - b0.float().cpu()
            deltas[path] = (delta, bias)
            if Cap.FACTORED_AB in form.caps and offset is not None:
                s = form.delta_weight().new_tensor(1.0) * _scale(form)
                b0_, a0_ = form.initial_tensors["lora_B"].float().cpu(), form.initial_tensors["lora_A"].float().cpu()
                factors[path] = (torch.cat([form.lora_B.detach().float().cpu() * s, -b0_ * s], dim=1),
                                 torch.cat([form.lora_A.detach().float().cpu(), a0_], dim=0))
            else:
                r = int(getattr(form.args, "r", min(delta.shape)))
                factors[path] = _svd_factors(delta, 2 * r if offset is not None else r)
            ranks.append(factors[path][1].shape[0])
    rank = max(ranks)
    for path, (b, a) in factors.items():  # one rank for the whole adapter: pad with zero components
        if a.shape[0] < rank:
            factors[path] = (torch.cat([b, b.new_zeros(b.shape[0], rank - a.shape[0])], dim=1),
                             torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], dim=0))
    return _lora_state(model, name, rank, factors, deltas,
                       {"from": specs(model)[name].form, "method": "relative to the original base"})


def _scale(form: Form) -> float:
    """s of a FACTORED_AB form: ΔW = s·B·A (read off ΔW so every factored form is covered)."""
    scaling = getattr(form, "scaling", None)
    if scaling is not None:
        return float(scaling)
    ba = form.lora_B.detach() @ form.lora_A.detach()
    return float((form.delta_weight().detach() * ba).sum() / ba.square().sum().clamp_min(1e-30))
