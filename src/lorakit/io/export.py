"""Export any mergeable adapter to a plain PEFT LoRA (on the one factor model, ``core.factors``).

``export_lora``: per module, the update relative to the ORIGINAL base, ΔW = U Σ Vᵀ ≈ U_k Σ_k V_kᵀ written
as B = U_k Σ_k^{1/2}, A = Σ_k^{1/2} V_kᵀ with α = k (scale 1). By Eckart–Young this is the best rank-k
approximation in Frobenius norm; the relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F is reported per module and
overall. Input-dependent forms (no MERGEABLE capability) have no ΔW to export and are refused.

``export_for_original_base`` / ``original_base_state``: the exact plain LoRA for the original base
(``core.factors.form_factors``): for an adapter whose init rewrote the base (W_res = W − ΔW0, as PiSSA
and LoRA-GA do) the update ΔW − ΔW0 = s·[B, −B0]·[A; A0] (rank 2r, PEFT's
``path_initial_model_for_weight_conversion``); other forms use the SVD at rank 2r, exact whenever
rank(ΔW − ΔW0) ≤ 2r.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.extract import extract_state
from lorakit.core.factors import LoRAFactors, dense_update, form_factors, lora_state, relative_error, svd_factors
from lorakit.core.inject import adapter_modules
from lorakit.core.state import AdapterState
from lorakit.forms.base import Form


@dataclass
class ExportReport:
    rank: int
    relative_error: float  # over all modules: sqrt(Σ‖E‖²) / sqrt(Σ‖ΔW‖²)
    per_module: dict[str, float] = field(default_factory=dict)


def _check_mergeable(name: str, forms: Mapping[str, Form]) -> None:
    refused = sorted({f.name for f in forms.values() if Cap.MERGEABLE not in f.caps})
    if refused:
        raise ValueError(f"adapter {name!r} uses form(s) {refused} whose update depends on the input "
                         "(not MERGEABLE): there is no fixed ΔW to export as a LoRA")


def _write(factors: dict[str, LoRAFactors], deltas: dict[str, torch.Tensor], source: AdapterState, rank: int,
           how: str) -> tuple[AdapterState, ExportReport]:
    error, per_module = relative_error(factors, deltas)
    report = ExportReport(rank=rank, relative_error=error, per_module=per_module)
    export = {"from": source.spec.form, "method": how, "rank": rank, "relative_error": error}
    state = lora_state(factors, base=source.base, meta={**source.meta, "export": export}, rank=rank)
    return state, report


def export_lora(model: nn.Module, name: str = "default", rank: int = 16) -> tuple[AdapterState, ExportReport]:
    """A plain-LoRA AdapterState approximating adapter ``name`` of ``model`` at ``rank``."""
    if rank < 1:
        raise ValueError(f"export rank must be >= 1, got {rank}")
    forms = adapter_modules(model, name)
    _check_mergeable(name, forms)
    factors, deltas = {}, {}
    for path, form in forms.items():
        delta, bias = dense_update(form)
        deltas[path] = delta.cpu()
        factors[path] = svd_factors(deltas[path], rank)
        factors[path].bias = None if bias is None else bias.cpu()
    return _write(factors, deltas, extract_state(model, name), rank, "svd")


def original_base_state(forms: Mapping[str, Form], source: AdapterState) -> tuple[AdapterState, ExportReport]:
    """The plain LoRA that, applied to the ORIGINAL base weights, reproduces ``forms`` (the installed
    adapter ``source`` was extracted from): exact for factored forms, SVD at 2r otherwise."""
    _check_mergeable(source.spec.form, forms)
    factors = {p: form_factors(f) for p, f in forms.items()}
    factors = {p: LoRAFactors(B=f.B.cpu(), A=f.A.cpu(), bias=None if f.bias is None else f.bias.cpu(),
                              error=f.error) for p, f in factors.items()}
    deltas = {p: dense_update(f)[0].cpu() for p, f in forms.items()}
    rank = max(f.rank for f in factors.values())  # one rank for the whole adapter: zero components pad
    return _write(factors, deltas, source, rank, "relative to the original base")


def export_for_original_base(model: nn.Module, name: str = "default") -> tuple[AdapterState, ExportReport]:
    """The plain LoRA that applied to the ORIGINAL base reproduces the adapted model."""
    return original_base_state(adapter_modules(model, name), extract_state(model, name))
