"""LoraHub: "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition" (Huang et al.,
COLM 2024, arXiv 2307.13269; official code sail-sg/lorahub, lorahub/algorithm.py).

Composition (paper and code): with weights w ∈ R^N the LoRAs are combined factor by factor,

    Â = Σ_i w_i·A_i,   B̂ = Σ_i w_i·B_i,   ΔŴ = B̂·Â,

which needs equal ranks per module. Here the scale is folded first (B_i ← s_i·B_i), so adapters with
different α compose correctly; with equal scales this is exactly the official code (it sums the raw
state dicts and keeps the shared α/r). ``composition="delta"`` composes the exact Σ_i w_i·ΔW_i (rank
Σr) instead — an option, not the paper.

Search (``LoraHubMerge.search``): gradient-free minimization of
L(w) = few-shot loss of the model with ΔŴ(w) + 0.05·mean_i|w_i| over the box w ∈ [−1.5, 1.5]^N,
starting at w = 0, with nevergrad's NGOpt and a budget of 40 evaluations (the official defaults; the
paper uses 5 examples and 20 LoRAs on Flan-T5). ``optimizer="random"`` (no nevergrad needed; not in
the paper) evaluates w = 0 and then seeded uniform draws in the box. ``merge(states, weights)`` with
given weights just composes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.compose.merge.parts import (
    LoRAFactors,
    MergeInputError,
    Merger,
    ModuleResult,
    gather,
    load_inputs,
    merged_bias,
    pool,
    resolve_weights,
)
from lorakit.core.caps import Cap
from lorakit.core.checks import check_choice
from lorakit.core.state import AdapterState


@dataclass(frozen=True)
class LoraHubArgs:
    budget: int = 40  # loss evaluations (official max_inference_step)
    bound: float = 1.5  # w_i ∈ [−bound, bound]
    l1: float = 0.05  # weight of the mean |w_i| regularizer
    seed: int = 42
    composition: str = "factors"  # "factors" (paper/code: Â = Σ wA, B̂ = Σ wB) | "delta" (exact Σ w ΔW)
    optimizer: str = "ngopt"  # "ngopt" (nevergrad, as the official code) | "random"

    def __post_init__(self) -> None:
        check_choice("lorahub", "composition", self.composition, ("factors", "delta"))
        check_choice("lorahub", "optimizer", self.optimizer, ("ngopt", "random"))
        if self.budget < 1 or self.bound <= 0:
            raise ValueError(f"lorahub: budget must be >= 1 and bound > 0, got {self.budget}, {self.bound}")


def causal_lm_loss(batches: Iterable[dict[str, torch.Tensor]]) -> Callable[[nn.Module], float]:
    """Mean of ``model(**batch).loss`` over the few-shot batches (dicts with input_ids, labels, ...)."""
    batches = list(batches)
    if not batches:
        raise MergeInputError("lorahub needs at least one batch of few-shot examples")

    def loss(model: nn.Module) -> float:
        device = next(model.parameters()).device
        total = 0.0
        for batch in batches:
            total += float(model(**{k: v.to(device) for k, v in batch.items()}).loss)
        return total / len(batches)

    return loss


class LoraHubMerge(Merger):
    name = "lorahub"
    Args = LoraHubArgs
    caps = Cap.NEEDS_DATA  # the weight search reads few-shot examples

    def validate(self, ranks: dict[str, list[int]]) -> None:
        if self.args.composition != "factors":
            return
        uneven = {p: rs for p, rs in ranks.items() if len(set(rs)) > 1}
        if uneven:
            path, rs = next(iter(uneven.items()))
            raise MergeInputError(f"lorahub composes the factors (Â = Σ wA, B̂ = Σ wB), which needs equal ranks; "
                                  f"module {path} has ranks {rs}. Use composition='delta' for the exact sum")

    def merge_module(self, inputs: list[LoRAFactors], weights: list[float], index: int) -> ModuleResult:
        if self.args.composition == "delta":
            pooled = pool(inputs, weights)
            return ModuleResult(B=pooled.B, A=pooled.A, bias=pooled.bias)
        B = sum((w * f.B for f, w in zip(inputs[1:], weights[1:])), weights[0] * inputs[0].B)
        A = sum((w * f.A for f, w in zip(inputs[1:], weights[1:])), weights[0] * inputs[0].A)
        return ModuleResult(B=B, A=A, bias=merged_bias(inputs, weights))

    def search(self, model: nn.Module, states: Sequence[AdapterState | str | Path], *,
               loss_fn: Callable[[nn.Module], float] | None = None,
               batches: Iterable[dict[str, torch.Tensor]] | None = None, progress: bool = False,
               name: str = "lorahub") -> AdapterState:
        """Find the weights on ``model`` (the base the adapters were made for) and return the composed
        adapter; ``meta["merge"]["lorahub"]`` holds the weights, the best objective and the history.
        The few-shot objective is ``loss_fn(model)`` or, from ``batches``, the mean causal-LM loss."""
        from lorakit.api import apply_state
        from lorakit.core.inject import active_adapters, adapter_modules, delete, set_active, specs

        if loss_fn is None:
            if batches is None:
                raise MergeInputError("lorahub.search needs few-shot data: give loss_fn or batches")
            loss_fn = causal_lm_loss(batches)
        if name in specs(model):
            raise MergeInputError(f"the model already has an adapter named {name!r}; pass another name")
        start = time.perf_counter()
        states, labels = load_inputs(list(states))
        paths, factors = gather(states, labels)
        self.validate({p: [f[p].rank for f in factors] for p in paths})
        n = len(states)
        previous = active_adapters(model)
        apply_state(model, self.merge(states, [0.0] * n), name, activate=True)
        forms = adapter_modules(model, name)
        history: list[tuple[list[float], float]] = []
        bar = tqdm(total=self.args.budget, desc="lorahub", unit="eval", leave=False, disable=not progress)

        def objective(w: Sequence[float]) -> float:
            w = [float(x) for x in w]
            with torch.no_grad():
                for i, path in enumerate(paths):
                    r = self.merge_module([f[path] for f in factors], w, i)
                    form = forms[path]
                    form.lora_A.copy_(r.A)
                    form.lora_B.copy_(r.B)
                    if r.bias is not None and getattr(form, "lora_bias", None) is not None:
                        form.lora_bias.copy_(r.bias)
                value = float(loss_fn(model)) + self.args.l1 * sum(abs(x) for x in w) / len(w)
            history.append((w, value))
            bar.update(1)
            return value

        was_training = model.training
        try:
            model.eval()
            best = self._optimize(objective, n)
        finally:
            bar.close()
            delete(model, name)
            set_active(model, [a for a in previous if a in specs(model)])
            model.train(was_training)
        weights = resolve_weights(best, n)
        state = self.merge(states, weights)
        report = state.meta["merge"]
        report["lorahub"] = {"weights": weights, "objective": min(v for _, v in history),
                             "evaluations": len(history), "history": [v for _, v in history]}
        report["seconds"] = time.perf_counter() - start
        return state

    def _optimize(self, objective: Callable[[Sequence[float]], float], n: int) -> list[float]:
        a = self.args
        if a.optimizer == "ngopt":
            try:
                import nevergrad as ng
                import numpy as np
            except ImportError as e:
                raise ImportError("lorahub's optimizer 'ngopt' needs nevergrad (pip install nevergrad), as the "
                                  "official code; or pass optimizer='random'") from e
            param = ng.p.Array(init=[0.0] * n, lower=[-a.bound] * n, upper=[a.bound] * n)
            param.random_state = np.random.RandomState(a.seed)
            optimizer = ng.optimizers.NGOpt(parametrization=param, budget=a.budget)
            return [float(x) for x in optimizer.minimize(objective).value]
        g = torch.Generator().manual_seed(a.seed)
        candidates = [[0.0] * n] + [((torch.rand(n, generator=g) * 2 - 1) * a.bound).tolist()
                                    for _ in range(a.budget - 1)]
        values = [objective(w) for w in candidates]
        return candidates[min(range(len(values)), key=values.__getitem__)]
