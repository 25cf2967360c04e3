"""The one reader and writer of LoRA factors: every axis that needs ΔW = B·A goes through here.

For an adapter module with update ΔW (out × in, the base weight's layout) this module returns
:class:`LoRAFactors` ``(B, A, bias)`` with the scale FOLDED IN, so that from then on

    ΔW = B · A,     B ∈ R^{out×k},  A ∈ R^{k×in},

expressed relative to the ORIGINAL base weight W (the pretrained one):

- factored forms (``Cap.FACTORED_AB``: ΔW = s·B·A with ``lora_A``/``lora_B``, s = α/r or α/√r as the
  form computes it) are read EXACTLY: ``B ← s·B``;
- a base-rewriting init (PiSSA, LoRA-GA, LDU, ... store their initial tensors B0, A0 and the model runs
  on W_res = W − s·B0·A0) is, relative to W, the update s·B·A − s·B0·A0 = [s·B, −s·B0]·[A; A0]: exact
  at rank 2r (PEFT's ``path_initial_model_for_weight_conversion``). Bias: b − b0;
- any other MERGEABLE form is read through its dense ΔW (minus ΔW0 where an init rewrote the base)
  and the truncated SVD ΔW ≈ U_k Σ_k V_kᵀ, B = U_k Σ_k^½, A = Σ_k^½ V_kᵀ (Eckart–Young: the best rank-k
  approximation in Frobenius norm); ``LoRAFactors.error`` = ‖ΔW − B·A‖_F / ‖ΔW‖_F is reported;
- input-dependent forms (no ``Cap.MERGEABLE``) have no fixed ΔW and are refused.

:func:`lora_state` is the one builder of plain-LoRA output states (α = k, so s = 1 and the factors are
stored as they are): merges, exports and federated aggregation write their results with it, so every
result saves in the PEFT format.

Readers: :func:`form_factors` (a live form in a model), :func:`state_factors` (an ``AdapterState``:
factored forms need no model; other forms need the base layers they were made for).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.core import registry
from lorakit.core.caps import Cap
from lorakit.core.layer import initial_delta, set_initial_tensors
from lorakit.core.spec import AdapterSpec, build_args
from lorakit.core.state import AdapterState
from lorakit.forms.base import Form, skip_init

FACTOR_TENSORS = ("lora_A", "lora_B", "lora_bias")


class FactorError(ValueError):
    """An adapter whose factors cannot be read (input-dependent form, unexpected tensors, no base)."""


@dataclass
class LoRAFactors:
    """One module of one adapter with the scale folded in: ΔW ≈ B @ A (exact when ``error`` is 0)."""

    B: torch.Tensor  # (out, k)
    A: torch.Tensor  # (k, in)
    bias: torch.Tensor | None = None  # (out,), already scaled
    error: float = 0.0  # relative Frobenius error of an SVD read; 0 for exact reads

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.B @ self.A

    def padded(self, rank: int) -> LoRAFactors:
        """The same update at ``rank`` ≥ its own (zero components: B·A unchanged)."""
        k = self.rank
        if rank < k:
            raise FactorError(f"cannot pad rank-{k} factors down to rank {rank}")
        if rank == k:
            return self
        return dataclasses.replace(self, B=torch.cat([self.B, self.B.new_zeros(self.B.shape[0], rank - k)], 1),
                                   A=torch.cat([self.A, self.A.new_zeros(rank - k, self.A.shape[1])], 0))


def svd_factors(delta: torch.Tensor, rank: int) -> LoRAFactors:
    """Best rank-``rank`` factors of a dense ΔW (zero-padded if ΔW has lower rank), with the error."""
    if rank < 1:
        raise FactorError(f"rank must be >= 1, got {rank}")
    delta = delta.detach().float()
    k = min(rank, *delta.shape)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:k].sqrt()
    b = delta.new_zeros(delta.shape[0], rank)
    a = delta.new_zeros(rank, delta.shape[1])
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    norm = float(delta.norm())
    error = float((delta - b @ a).norm()) / norm if norm > 0 else 0.0
    return LoRAFactors(B=b, A=a, error=error)


def form_scale(form: Form) -> float:
    """s of a FACTORED_AB form (ΔW = s·B·A): its ``scaling``, else read off its ΔW (any factored form)."""
    scaling = getattr(form, "scaling", None)
    if isinstance(scaling, (int, float)):
        return float(scaling)
    with torch.no_grad():
        ba = form.lora_B.detach().float() @ form.lora_A.detach().float()
        return float((form.delta_weight().detach().float() * ba).sum() / ba.square().sum().clamp_min(1e-30))


LINEAR_KINDS = (None, "linear", "conv1d")


def _check_linear(kind: str | None, label: str) -> None:
    """The factor model covers linear maps (Linear, HF Conv1D); Conv2d/Embedding factors have other
    shapes and PEFT keys, and are refused by name rather than written wrongly."""
    if kind not in LINEAR_KINDS:
        raise FactorError(f"{label} adapts a {kind} layer; merges, export, serving and federated aggregation "
                          "read Linear/Conv1D LoRA factors only")


def factored_scale(cls: type[Form], args: Any, in_features: int, out_features: int, *,
                   label: str = "adapter") -> float:
    """s of a FACTORED_AB form class for ``args`` on an (out, in) layer, as the form computes it (it is
    built on a meta-device layer: no memory, no tensors), so no caller restates a scaling rule."""
    scale = getattr(cls(nn.Linear(in_features, out_features, bias=False, device="meta"), args), "scaling", None)
    if not isinstance(scale, (int, float)):
        raise FactorError(f"{label}: form {cls.name!r} declares FACTORED_AB but has no numeric `scaling`")
    return float(scale)


def _check_mergeable(cls: type[Form], label: str) -> None:
    if Cap.MERGEABLE not in cls.caps:
        raise FactorError(f"{label}: form {cls.name!r} depends on the input (not MERGEABLE): it has no fixed "
                          "ΔW = B·A to read")


def _relative_to_original(factors: LoRAFactors, initial: LoRAFactors | None) -> LoRAFactors:
    """[B, −B0]·[A; A0] and b − b0: the update for the original base of an adapter whose init rewrote it."""
    if initial is None:
        return factors
    bias = factors.bias
    if initial.bias is not None:
        bias = (bias if bias is not None else 0.0) - initial.bias
    return LoRAFactors(B=torch.cat([factors.B, -initial.B], dim=1), A=torch.cat([factors.A, initial.A], dim=0),
                       bias=bias, error=factors.error)


def dense_update(form: Form, *, original_base: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ΔW, Δb) of a live mergeable form, dense, fp32; relative to the original base by default
    (ΔW − ΔW0 and b − b0 where a base-rewriting init left initial tensors)."""
    _check_mergeable(type(form), f"module of form {form.name!r}")
    with torch.no_grad():
        delta = form.delta_weight().detach().float()
        bias = form.delta_bias()
        bias = None if bias is None else bias.detach().float()
        offset = initial_delta(form) if original_base else None
        if offset is not None:
            delta = delta - offset[0].float()
            if offset[1] is not None:
                bias = (bias if bias is not None else 0.0) - offset[1].float()
    return delta, bias


def form_factors(form: Form, *, rank: int | None = None, original_base: bool = True) -> LoRAFactors:
    """Factors of one live form (fp32, CPU-independent: on the form's device).

    ``rank`` is the SVD rank for non-factored forms (default: the form's ``r`` where it has one, else
    full rank, which is exact); factored forms are always exact at their own rank (2r with a
    base-rewriting init). ``original_base=False`` reads the update relative to the current base
    (the rewritten W_res), i.e. ignores the init's rewrite.
    """
    _check_mergeable(type(form), f"module of form {form.name!r}")
    _check_linear(getattr(form, "layer_kind", None), f"a module of form {form.name!r}")
    with torch.no_grad():
        initial = getattr(form, "initial_tensors", None) if original_base else None
        if Cap.FACTORED_AB in form.caps:
            s = form_scale(form)
            bias = form.delta_bias()
            out = LoRAFactors(B=s * form.lora_B.detach().float(), A=form.lora_A.detach().float(),
                              bias=None if bias is None else bias.detach().float())
            if initial:
                offset = initial_delta(form)
                b0 = None if offset is None or offset[1] is None else offset[1].float()
                start = LoRAFactors(B=s * initial["lora_B"].float().to(out.B.device),
                                    A=initial["lora_A"].float().to(out.A.device), bias=b0)
                out = _relative_to_original(out, start)
            return out
        delta, bias = dense_update(form, original_base=original_base)
        offset = bool(initial)
        if rank is None:
            r = getattr(form.args, "r", None)
            rank = min(delta.shape) if r is None else int(r) * (2 if offset else 1)
        out = svd_factors(delta.reshape(delta.shape[0], -1), rank)
        out.bias = bias
        return out


def _raw_factored(state: AdapterState, cls: type[Form], label: str) -> dict[str, LoRAFactors]:
    """Exact factors of a FACTORED_AB state read from its tensors (no model needed)."""
    initial_by_module = dataclasses.replace(state, tensors=state.initial).by_module() if state.initial else {}
    scales: dict[tuple, float] = {}
    out: dict[str, LoRAFactors] = {}
    embedding_keys = {k.rsplit(".", 1)[0] for k in state.tensors if k.endswith(".lora_embedding_A")}
    for path, tensors in state.by_module().items():
        if path in embedding_keys:
            _check_linear("embedding", f"{label}: module {path}")
        if "lora_A" in tensors and tensors["lora_A"].dim() == 4:
            _check_linear("conv2d", f"{label}: module {path}")
        extra = sorted(set(tensors) - set(FACTOR_TENSORS))
        if "lora_A" not in tensors or "lora_B" not in tensors or extra:
            raise FactorError(f"{label}: module {path} has tensors {sorted(tensors)}; expected lora_A, lora_B "
                              "(and optionally lora_bias)")
        A, B = tensors["lora_A"].float(), tensors["lora_B"].float()
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise FactorError(f"{label}: module {path} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                              "expected (r, in) and (out, r)")
        try:
            args = build_args(cls.Args, state.spec.args_for(path), owner=f"{label}: form {cls.name!r}")
        except (TypeError, ValueError) as e:
            raise FactorError(str(e)) from e
        if getattr(args, "r", A.shape[0]) != A.shape[0]:
            raise FactorError(f"{label}: module {path} has rank {A.shape[0]} but its spec says r={args.r}")
        key = (args, B.shape[0], A.shape[1])
        if key not in scales:
            scales[key] = factored_scale(cls, args, A.shape[1], B.shape[0], label=label)
        s = scales[key]
        bias = tensors.get("lora_bias")
        factors = LoRAFactors(B=s * B, A=A, bias=None if bias is None else s * bias.float())
        init = initial_by_module.get(path)
        if init is not None:
            if "lora_A" not in init or "lora_B" not in init:
                raise FactorError(f"{label}: module {path} has initial tensors {sorted(init)}; expected lora_A, "
                                  "lora_B")
            b0 = init.get("lora_bias")
            factors = _relative_to_original(factors, LoRAFactors(
                B=s * init["lora_B"].float(), A=init["lora_A"].float(), bias=None if b0 is None else s * b0.float()))
        out[path] = factors
    return out


def build_state_forms(state: AdapterState, base_layers: Mapping[str, nn.Module], *,
                      label: str = "adapter") -> dict[str, Form]:
    """Stand-alone forms of ``state`` on the given base layers (tensors and initial tensors loaded),
    for reading ΔW without installing the adapter in a model. Layers are not modified."""
    cls = state.form_class()
    by_module = state.by_module()
    missing = sorted(set(by_module) - set(base_layers))
    if missing:
        raise FactorError(f"{label} targets module(s) {missing[:3]} that are not among the given base layers "
                          f"({sorted(base_layers)[:4]}...)")
    initial_by_module = dataclasses.replace(state, tensors=state.initial).by_module() if state.initial else {}
    forms: dict[str, Form] = {}
    with skip_init():
        for path in by_module:
            args = build_args(cls.Args, state.spec.args_for(path), owner=f"{label}: form {cls.name!r}")
            forms[path] = cls(base_layers[path], args)
            forms[path].bind_path(path)
    if Cap.SHARED_TENSORS in cls.caps and forms:
        shared = cls.build_shared(forms)
        for form in forms.values():
            form.bind_shared(shared)
        given = state.shared_tensors()
        if given:
            shared.load(given)
    for path, form in forms.items():
        expected = form.save_tensors()
        got = by_module[path]
        if set(got) != set(expected):
            raise FactorError(f"{label}: module {path} has tensors {sorted(got)}, form {cls.name!r} expects "
                              f"{sorted(expected)}")
        try:
            form.load_tensors({k: v.to(expected[k].device, expected[k].dtype) for k, v in got.items()})
        except RuntimeError as e:  # shape mismatch: another base
            raise FactorError(f"{label}: module {path}: {e}") from e
        if path in initial_by_module:
            set_initial_tensors(form, initial_by_module[path])
    return forms


def state_factors(state: AdapterState, base_layers: Mapping[str, nn.Module] | None = None, *,
                  rank: int | None = None, label: str = "adapter") -> dict[str, LoRAFactors]:
    """module path -> factors of ``state`` relative to the original base (see the module docstring).

    Factored forms are read from the tensors alone. Other mergeable forms need ``base_layers``
    (module path -> the base layer they adapt: their ΔW may read W, e.g. DoRA) and are read through
    the SVD at ``rank`` (default: the form's r).
    """
    cls = state.form_class()
    _check_mergeable(cls, label)
    if Cap.FACTORED_AB in cls.caps:
        out = _raw_factored(state, cls, label)
    else:
        if base_layers is None:
            raise FactorError(f"{label}: form {cls.name!r} is not a factored B·A form; reading its ΔW needs the "
                              "base layers it was made for (or convert it first with `lorakit export`)")
        forms = build_state_forms(state, base_layers, label=label)
        out = {path: form_factors(form, rank=rank) for path, form in forms.items()}
    if not out:
        raise FactorError(f"{label}: the adapter holds no modules")
    return out


def model_factors(forms: Mapping[str, Form], *, rank: int | None = None) -> dict[str, LoRAFactors]:
    """module path -> factors of an installed adapter's forms (``core.inject.adapter_modules``)."""
    return {path: form_factors(form, rank=rank) for path, form in forms.items()}


def lora_state(factors: Mapping[str, LoRAFactors], *, base: dict[str, Any] | None = None,
               meta: dict[str, Any] | None = None, rank: int | None = None,
               targets: list[str] | None = None, exclude: list[str] | None = None) -> AdapterState:
    """A plain ``lora`` AdapterState with ΔW = B·A per module: α = r per module, so s = 1.

    With ``rank``, every module is zero-padded to that one rank (exact); otherwise each module keeps
    its own rank: the most common one is the adapter's ``r`` and the others are per-module args
    (PEFT's ``rank_pattern``/``alpha_pattern``). If any module has a bias, every module gets one
    (zeros where absent: LoRA's bias option is per adapter).
    """
    if not factors:
        raise FactorError("no modules to write")
    cls = registry.get("form", "lora")
    if rank is not None:
        factors = {p: f.padded(rank) for p, f in factors.items()}
    ranks = {p: f.rank for p, f in factors.items()}
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    has_bias = any(f.bias is not None for f in factors.values())
    tensors: dict[str, torch.Tensor] = {}
    for path, f in factors.items():
        tensors[f"{path}.{cls.tensor_key('lora_A')}"] = f.A.detach().float().cpu().contiguous()
        tensors[f"{path}.{cls.tensor_key('lora_B')}"] = f.B.detach().float().cpu().contiguous()
        if has_bias:
            bias = f.bias if f.bias is not None else f.B.new_zeros(f.B.shape[0])
            tensors[f"{path}.{cls.tensor_key('lora_bias')}"] = bias.detach().float().cpu().contiguous()
    module_args = {"^" + re.escape(p): {"r": r, "alpha": float(r)} for p, r in ranks.items() if r != default_r}
    spec = AdapterSpec(form="lora", form_args={"r": default_r, "alpha": float(default_r), "bias": has_bias},
                       targets=list(targets) if targets is not None else sorted(factors),
                       exclude=list(exclude or []), module_args=module_args)
    return AdapterState(spec=spec, tensors=tensors, base=dict(base or {}), meta=dict(meta or {}))


def relative_error(factors: Mapping[str, LoRAFactors], deltas: Mapping[str, torch.Tensor]) -> tuple[float,
                                                                                                    dict[str, float]]:
    """sqrt(Σ‖ΔW − B·A‖²) / sqrt(Σ‖ΔW‖²) over modules, and the per-module relative errors."""
    err_sq = total_sq = 0.0
    per_module = {}
    for path, f in factors.items():
        delta = deltas[path].float()
        err, norm = float((delta - f.delta()).norm() ** 2), float(delta.norm() ** 2)
        per_module[path] = (err / norm) ** 0.5 if norm > 0 else 0.0
        err_sq, total_sq = err_sq + err, total_sq + norm
    return ((err_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0), per_module
