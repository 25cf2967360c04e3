"""FedAvg on LoRA factors, a.k.a. FedIT (Zhang et al., "Towards Building the Federated GPT: Federated
Instruction Tuning", ICASSP 2024, arXiv 2305.05644; FedAvg: McMahan et al., AISTATS 2017, arXiv 1602.05629).

Rule: Ā = Σ_k p_k·A_k and B̄ = Σ_k p_k·B_k, averaged separately (Flower's built-in FedAvg does the
same key by key, as in its FlowerTune-LLM example). The new global update is s·B̄·Ā whereas the
ideal is Σ_k p_k·s·B_k·A_k; the difference s·Σ_k p_k (B_k − B̄)(A_k − Ā) is the "aggregation
noise", non-zero as soon as clients move A differently. All clients share one rank and one α.
Traffic: r(d+k) numbers per module each way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.core.state import AdapterState
from lorakit.federated.base import (
    AggregationError,
    AggregationResult,
    Aggregator,
    GlobalState,
    check_same_modules,
    lora_factors,
    normalize_weights,
    weighted_sum,
    with_tensors,
)


def fedavg_states(states: Sequence[AdapterState], weights: Sequence[float] | torch.Tensor) -> AdapterState:
    """Average every tensor of same-shaped adapters separately: Σ_k p_k·T_k (A, B and bias alike)."""
    p = normalize_weights(weights)
    if len(p) != len(states):
        raise AggregationError(f"{len(states)} updates but {len(p)} weights")
    check_same_modules(states)
    factors = [lora_factors(s, f"update {i}") for i, s in enumerate(states)]
    for path, f0 in factors[0].items():
        for i, fs in enumerate(factors[1:], 1):
            f = fs[path]
            if f.A.shape != f0.A.shape or f.B.shape != f0.B.shape:
                raise AggregationError(f"fedavg needs one rank for all clients: {path} has A{tuple(f0.A.shape)} in "
                                       f"update 0 and A{tuple(f.A.shape)} in update {i} (use 'flora' for mixed ranks)")
            if f.s != f0.s:
                raise AggregationError(f"fedavg needs one scale for all clients: {path} has s={f0.s} and s={f.s}")
    keys = sorted(states[0].tensors)
    for i, s in enumerate(states[1:], 1):
        if sorted(s.tensors) != keys:
            raise AggregationError(f"update {i} has other tensors than update 0")
    tensors = {k: weighted_sum([s.tensors[k] for s in states], p) for k in keys}
    return with_tensors(states[0], tensors)


class FedAvg(Aggregator):
    """FedIT: A and B averaged separately (the common baseline; inexact)."""

    name = "fedavg"

    def combine(self, state: GlobalState, states: list[AdapterState], p: torch.Tensor) -> AggregationResult:
        avg = fedavg_states(states, p)
        new = GlobalState(adapter=with_tensors(state.adapter or avg, avg.tensors), base_delta=dict(state.base_delta),
                          round=state.round, spec=state.spec)
        return AggregationResult(new)
