"""ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws (Huang & Balestriero, 2024, arXiv 2410.09692).

The method (abstract and Sec. 4 of the paper): LoRA with **no dropout** and **no scaling factor**
(ΔW = B·A, s = 1), trained with a per-parameter coefficient **inversely proportional to the
parameter's ℓ2 norm**, which speeds B's escape from 0 and removes two hyper-parameters.

What is implemented (no official code exists; METHODS.md §3 records the choices):

- coefficient, per row i of A and of B (``granularity="row"``, the default)::

      c(θ_i) = 1 / sqrt(‖θ_i‖² + η⁻²)

  bounded at θ_i = 0 (c = η), which is needed because B starts at 0. ``granularity="rank"`` uses one
  coefficient per rank-1 component (rows of A, columns of B) and ``"tensor"`` one per tensor.
  ``eta`` defaults to 4.0 [our choice, not from the paper; the paper gives no code and no value we
  could read]; ``c`` is evaluated on the parameter *before* the step.
- **Where the coefficient goes.** Under Adam a gradient multiplied by a per-row constant is divided
  out again by m̂/√v̂ (Adam is invariant to a constant rescaling of a coordinate's gradient), so
  scaling the gradient would do nothing. The coefficient is applied to the optimizer's *update*
  instead: θ ← θ + c(θ_old) ⊙ (θ_opt − θ_old), where θ_opt is what the trainer's optimizer (AdamW)
  would have written. With SGD this is identical to scaling the gradient (the paper's wording).
  It is installed as optimizer step pre/post hooks (``wrap_optimizer``), so any optimizer works.
- **No dropout, no α/r.** ``on_conflict="override"`` (default) rewrites adapters that have
  dropout > 0 or a scale ≠ 1 before training, with a warning: dropout becomes 0 and α becomes r (√r
  with rsLoRA) in the forms *and* the adapter's saved spec, and the old scale is folded into B (and
  the LoRA bias) so ΔW is unchanged; the saved adapter is an ordinary LoRA with scale 1.
  ``on_conflict="error"`` refuses such adapters with a message that names the fix.

Modules are found by capability (``Cap.FACTORED_AB`` forms with ``scaling``), never by name; the
LoRA bias (if any) is trained plainly. Logs ``allora_coef_B`` (mean coefficient over B rows).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_fields
from lorakit.forms.base import Form
from lorakit.strategies.base import Strategy

if TYPE_CHECKING:
    from lorakit.train.context import TrainingContext

GRANULARITIES = ("row", "rank", "tensor")


def factored_forms(model: nn.Module) -> dict[str, Form]:
    """Trainable ``Cap.FACTORED_AB`` forms of ``model`` (module path -> form)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, Form) and Cap.FACTORED_AB in m.caps and m.lora_B.requires_grad}


def coefficient(theta: torch.Tensor, eta: float, granularity: str, *, is_B: bool) -> torch.Tensor:
    """c = 1/sqrt(‖θ_i‖² + η⁻²) for each group i of ``theta``, broadcastable to its shape."""
    t = theta.detach().float()
    if granularity == "tensor":
        sq = t.pow(2).sum()
    elif granularity == "rank" and is_B:
        sq = t.pow(2).sum(dim=0, keepdim=True)  # columns of B (out, r)
    else:
        sq = t.pow(2).sum(dim=-1, keepdim=True)  # rows
    return torch.rsqrt(sq + eta ** -2)


def _unit_alpha(values: dict[str, Any], args_cls: type) -> float:
    defaults = {f.name: f.default for f in dataclasses.fields(args_cls)}
    r = int(values.get("r", defaults.get("r", 8)))
    return math.sqrt(r) if values.get("rslora", defaults.get("rslora", False)) else float(r)


@dataclass(frozen=True)
class ALLoRAArgs:
    eta: float = 4.0  # c(0) = η bounds the coefficient 1/sqrt(‖θ_i‖² + η⁻²) [our choice; see above]
    granularity: str = "row"  # row | rank | tensor: the groups i that share one coefficient
    on_conflict: str = "override"  # override (rewrite dropout/scale, ΔW unchanged) | error

    def __post_init__(self) -> None:
        check_fields("allora", self, choices={"granularity": GRANULARITIES, "on_conflict": ("override", "error")},
                     positive=("eta",))


class ALLoRA(Strategy):
    name = "allora"
    caps = Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    Args = ALLoRAArgs
    requires = Cap.FACTORED_AB

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        a = self.args
        self.eta, self.granularity, self.on_conflict = float(a.eta), a.granularity, a.on_conflict
        self._tracked: dict[int, tuple[nn.Parameter, bool]] = {}  # id -> (param, is_B)
        self._before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_coef_B: float | None = None

    # -- set-up ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Check (or rewrite) every factored adapter to dropout 0 and scale 1; track its A and B."""
        from lorakit.core.inject import specs

        forms = factored_forms(model)
        if not forms:
            raise ValueError("strategy 'allora' needs a trainable factored adapter (form 'lora' or another "
                             "Cap.FACTORED_AB form); the model has none")
        bad = {p: f for p, f in forms.items() if _dropout(f) > 0 or abs(float(getattr(f, "scaling", 1.0)) - 1) > 1e-12}
        if bad:
            path, f = next(iter(bad.items()))
            what = f"dropout={_dropout(f)}, scale={float(getattr(f, 'scaling', 1.0)):g}"
            if self.on_conflict == "error":
                raise ValueError(f"strategy 'allora' trains LoRA without dropout and without the alpha/r scale, but "
                                 f"{len(bad)} module(s) differ (e.g. {path}: {what}); attach with dropout=0 and "
                                 f"alpha=r (CLI: --dropout 0 --alpha <rank>), or use on_conflict='override'")
            warnings.warn(f"allora: {len(bad)} module(s) have dropout or a scale != 1 (e.g. {path}: {what}); setting "
                          "dropout=0 and alpha=r, with the old scale folded into B (dW unchanged)", stacklevel=2)
            for f in bad.values():
                self._override(f)
            bad_ids = {id(f) for f in bad.values()}
            for name, spec in list(specs(model).items()):
                owned = [f for f in _forms_of(model, name) if id(f) in bad_ids]
                if owned:  # the saved adapter must say scale 1 / dropout 0 too
                    specs(model)[name] = self._override_spec(spec, type(owned[0]).Args)
        for f in forms.values():
            if abs(float(getattr(f, "scaling", 1.0)) - 1) > 1e-9:
                raise ValueError(f"allora: form {f.name!r} still has scale {f.scaling} after the override")
        self._tracked = {}
        for f in forms.values():
            if f.lora_A.requires_grad:
                self._tracked[id(f.lora_A)] = (f.lora_A, False)
            self._tracked[id(f.lora_B)] = (f.lora_B, True)

    @staticmethod
    def _override(form: Form) -> None:
        s = float(getattr(form, "scaling", 1.0))
        args = form.args
        fields = {f.name for f in dataclasses.fields(args)}
        if abs(s - 1) > 1e-12 and "alpha" not in fields:
            raise ValueError(f"allora: form {form.name!r} has scale {s} but no 'alpha' argument to set it to 1")
        new = {"dropout": 0.0} if "dropout" in fields else {}
        if "alpha" in fields:
            new["alpha"] = args.alpha / s
        with torch.no_grad():
            form.lora_B.mul_(s)
            if getattr(form, "lora_bias", None) is not None:
                form.lora_bias.mul_(s)
        form.args = dataclasses.replace(args, **new)
        if hasattr(form, "dropout") and isinstance(form.dropout, nn.Module):
            form.dropout = nn.Identity()

    @staticmethod
    def _override_spec(spec: Any, args_cls: type) -> Any:
        form_args = {**spec.form_args, "dropout": 0.0}
        form_args["alpha"] = _unit_alpha(form_args, args_cls)
        module_args = {}
        for pattern, over in spec.module_args.items():
            over = dict(over)
            if "dropout" in over:
                over["dropout"] = 0.0
            if {"r", "rslora", "alpha"} & set(over):
                over["alpha"] = _unit_alpha({**form_args, **over}, args_cls)
            module_args[pattern] = over
        return dataclasses.replace(spec, form_args=form_args, module_args=module_args)

    # -- hooks -----------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        # runs once in Trainer.__init__, before any resume: the override happens exactly once
        self.prepare(model)
        return None

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if not self._tracked:
            raise RuntimeError("allora: call prepare(model) (or use the Trainer) before wrap_optimizer")
        optimizer.register_step_pre_hook(self._pre_step)
        optimizer.register_step_post_hook(self._post_step)
        return optimizer

    @torch.no_grad()
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._before = {}
        for key, (p, is_B) in self._tracked.items():
            if p.grad is not None:
                self._before[key] = (p.detach().clone(), coefficient(p, self.eta, self.granularity, is_B=is_B))

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        coefs = []
        for key, (old, c) in self._before.items():
            p, is_B = self._tracked[key]
            p.copy_(old + c.to(p.dtype) * (p - old))
            if is_B:
                coefs.append(float(c.mean()))
        self.last_coef_B = sum(coefs) / len(coefs) if coefs else None
        self._before = {}

    def on_step_end(self, ctx: TrainingContext, step: int, logs: dict[str, Any]) -> None:
        if self.last_coef_B is not None:
            logs["allora_coef_B"] = self.last_coef_B


def _dropout(form: Form) -> float:
    return float(getattr(form.args, "dropout", 0.0) or 0.0)


def _forms_of(model: nn.Module, name: str) -> list[Form]:
    from lorakit.core.inject import adapter_modules

    return list(adapter_modules(model, name).values())
