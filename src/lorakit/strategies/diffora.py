"""DiffoRA: Enabling Parameter-Efficient Fine-Tuning via Differential Module Selection (Jiang, Wang & Yuan,
2025, arXiv 2502.08905; v1 title "... via Differential Low-Rank Matrix Adaptation"), Sec. 3-4.

The Differential Adaptation Matrix (DAM) Γ ∈ {0,1}^{layers × module types} says which modules get a LoRA
branch: h = W₀x + Γ_i·ΔW_i x. DiffoRA builds Γ DARTS-style:

1. **Continuous relaxation**: every candidate module i (every module of the adapter) gets a learnable
   architecture weight α_i and its branch is scaled by γ_i = σ(α_i) (``relaxation="sigmoid"``) or by a
   softmax over the candidates of the same parent module/layer, times their count
   (``relaxation="softmax"``, mean gate 1): h_i = W₀x + γ_i·ΔW_i x.
2. **Joint / alternating optimisation** with the LoRA weights shared across the search and the final
   training ("weight-sharing"): ``schedule="alternate"`` (default) updates the LoRA weights on even steps
   and the architecture weights on odd steps, each on its own batch — the first-order form of the
   bi-level (train / validation) DARTS problem; ``schedule="joint"`` updates both on every batch.
   Architecture optimiser: Adam(lr 3e-4, betas (0.5, 0.999), weight decay 1e-3), the DARTS defaults.
3. **Discretisation** after ``search_steps``: the top-k modules by γ are kept (Γ_i = 1), the others lose
   their adapter (removed from the model, so the saved adapter and its PEFT ``target_modules`` list only
   the selected modules); with ``fold=True`` γ_i is folded into lora_B of a selected factored module,
   so the function is continuous across the switch (METHODS.md pitfall: fold the gate before export).
   ``reinit=True`` restarts the selected adapters from their init instead (plain DARTS retraining).
4. LoRA training continues on the selected modules only, with the trainer's optimizer.

No official code was found (METHODS.md §7); the relaxation function, the bi-level schedule and the
selection ratio are not given in the material read here, so they are options; defaults
(``select_ratio=0.5``, ``search_ratio=0.2`` of the steps, sigmoid, alternate) are our choices.
Logs ``diffora_gate_mean`` during the search and ``diffora_selected`` (count) at discretisation;
``selected`` and ``gates`` (module path -> γ at discretisation) stay on the strategy.
Resume across the discretisation step is not supported (the removed adapters are gone from the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.inject import adapter_modules, specs
from lorakit.strategies.base import Strategy

if TYPE_CHECKING:
    from lorakit.train.context import TrainingContext

RELAXATIONS = ("sigmoid", "softmax")
SCHEDULES = ("alternate", "joint")


@dataclass(frozen=True)
class DiffoRAArgs:
    search_steps: int | None = None  # None: search_ratio of the training steps
    search_ratio: float = 0.2
    select: int | None = None  # modules kept (top-k by γ); None: select_ratio of the candidates
    select_ratio: float = 0.5
    relaxation: str = "sigmoid"  # sigmoid | softmax
    schedule: str = "alternate"  # alternate | joint
    arch_lr: float = 3e-4  # the architecture optimizer: Adam(arch_lr, (arch_beta1, 0.999), arch_weight_decay)
    arch_weight_decay: float = 1e-3
    arch_beta1: float = 0.5
    init_logit: float = 0.0  # α_i at the start of the search
    fold: bool = True  # fold γ_i into lora_B of the selected modules at discretisation
    reinit: bool = False  # restart the selected adapters from their init instead
    adapter: str = "default"

    def __post_init__(self) -> None:
        if self.relaxation not in RELAXATIONS:
            raise ValueError(f"diffora: relaxation must be one of {RELAXATIONS}, got {self.relaxation!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"diffora: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 < self.select_ratio <= 1.0 or not 0.0 < self.search_ratio <= 1.0:
            raise ValueError("diffora: select_ratio and search_ratio must be in (0, 1]")


class DiffoRA(Strategy):
    name = "diffora"
    caps = Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    Args = DiffoRAArgs
    exclusive_with = frozenset({"lisa"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        a = self.args
        self.search_steps, self.search_ratio = a.search_steps, float(a.search_ratio)
        self.select, self.select_ratio = a.select, float(a.select_ratio)
        self.relaxation, self.schedule = a.relaxation, a.schedule
        self.arch_lr, self.arch_wd, self.arch_beta1 = float(a.arch_lr), float(a.arch_weight_decay), float(a.arch_beta1)
        self.init_logit, self.fold, self.reinit = float(a.init_logit), bool(a.fold), bool(a.reinit)
        self.adapter = a.adapter
        self.logits: dict[str, nn.Parameter] = {}
        self.groups: dict[str, list[str]] = {}
        self.forms: dict[str, Any] = {}
        self.arch_opt: torch.optim.Optimizer | None = None
        self.selected: list[str] | None = None
        self.gates: dict[str, float] = {}
        self._stop = 0
        self._pending: dict[str, torch.Tensor] = {}

    # -- relaxation ----------------------------------------------------------------------------
    def gate(self, path: str) -> torch.Tensor:
        """γ of module ``path`` under the current architecture weights."""
        if self.relaxation == "sigmoid":
            return torch.sigmoid(self.logits[path])
        members = self.groups[path]
        z = torch.stack([self.logits[p] for p in members])
        return torch.softmax(z, 0)[members.index(path)] * len(members)

    def gate_values(self) -> dict[str, float]:
        with torch.no_grad():
            return {p: float(self.gate(p)) for p in self.logits}

    def install(self, model: nn.Module) -> None:
        """Give every module of the adapter an architecture weight and gate its branch."""
        self.forms = adapter_modules(model, self.adapter)
        if not self.forms:
            raise ValueError(f"strategy 'diffora': adapter {self.adapter!r} has no modules")
        for path, form in self.forms.items():
            device = next(form.parameters()).device
            start = self._pending.get(path, torch.tensor(self.init_logit))
            self.logits[path] = nn.Parameter(start.detach().clone().float().to(device))
            parent = path.rpartition(".")[0]
            self.groups.setdefault(parent, []).append(path)
            inner = form.apply  # the form's own (bound) apply; restored by deleting the override

            def gated(x: torch.Tensor, base_out: torch.Tensor, path=path, inner=inner) -> torch.Tensor:
                out = inner(x, base_out)
                return base_out + self.gate(path).to(out.dtype) * (out - base_out)

            form.apply = gated
        self.groups = {p: members for members in self.groups.values() for p in members}
        self.arch_opt = torch.optim.Adam(list(self.logits.values()), lr=self.arch_lr,
                                         betas=(self.arch_beta1, 0.999), weight_decay=self.arch_wd)

    def discretize(self, model: nn.Module) -> list[str]:
        """Keep the top-k modules by γ (Γ = 1), fold γ into them, remove the adapter elsewhere."""
        gates = self.gate_values()
        n = len(gates)
        k = self.select if self.select is not None else max(1, round(self.select_ratio * n))
        k = max(1, min(int(k), n))
        order = sorted(gates, key=lambda p: (-gates[p], p))
        selected = sorted(order[:k])
        for path, form in self.forms.items():
            if "apply" in form.__dict__:
                del form.apply
            if path in selected:
                if self.reinit:
                    form.reset_parameters()
                elif self.fold and Cap.FACTORED_AB in form.caps:
                    with torch.no_grad():
                        form.lora_B.mul_(gates[path])
                        if getattr(form, "lora_bias", None) is not None:
                            form.lora_bias.mul_(gates[path])
                continue
            layer = model.get_submodule(path)
            del layer.adapters[self.adapter]
        spec = specs(model)[self.adapter]
        spec.targets = list(selected)  # full module paths: exactly the selected modules
        self.selected, self.gates = selected, gates
        self.logits = {}
        self.arch_opt = None
        return selected

    # -- trainer hooks -----------------------------------------------------------------------
    def on_train_start(self, ctx: TrainingContext) -> None:
        steps = ctx.total_steps
        self._stop = self.search_steps if self.search_steps is not None else max(1, math.ceil(self.search_ratio
                                                                                             * steps))
        if self.selected is None and ctx.step < self._stop:
            self.install(ctx.model)

    def _arch_step(self, step: int) -> bool:
        return self.schedule == "joint" or step % 2 == 1

    def _weight_step(self, step: int) -> bool:
        return self.schedule == "joint" or step % 2 == 0

    def on_before_optimizer_step(self, ctx: TrainingContext, step: int) -> None:
        if self.arch_opt is None:
            return
        if self._arch_step(step):
            self.arch_opt.step()
        self.arch_opt.zero_grad(set_to_none=True)
        if not self._weight_step(step):  # architecture step: the LoRA weights keep their values
            for form in self.forms.values():
                for p in form.parameters():
                    p.grad = None

    def on_step_end(self, ctx: TrainingContext, step: int, logs: dict[str, Any]) -> None:
        if self.arch_opt is None:
            return
        gates = self.gate_values()
        logs["diffora_gate_mean"] = sum(gates.values()) / len(gates)
        if step >= self._stop:
            logs["diffora_selected"] = len(self.discretize(ctx.model))

    def state_dict(self) -> dict[str, Any]:
        return {"logits": {p: v.detach().cpu() for p, v in self.logits.items()}, "selected": self.selected,
                "gates": self.gates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and state.get("selected") is not None:
            raise ValueError("strategy 'diffora': cannot resume after the discretisation step")
        self._pending = dict(state.get("logits", {})) if state else {}
