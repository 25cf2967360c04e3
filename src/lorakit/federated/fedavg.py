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
from dataclasses import dataclass

import torch

from lorakit.core.state import AdapterState
from lorakit.federated.base import (
    AggregationError,
    AggregationResult,
    Aggregator,
    GlobalState,
    check_same_modules,
    module_scales,
    module_tensors,
    normalize_weights,
    weighted_sum,
    with_tensors,
)


def fedavg_states(states: Sequence[AdapterState], weights: Sequence[float] | torch.Tensor) -> AdapterState:
    """Average every tensor of same-shaped adapters separately: Σ_k p_k·T_k (A, B and bias alike).

    The raw (unscaled) tensors are averaged, as FedIT does, so every client must share one scale s
    per module (read from the form, see ``base.module_scales``); otherwise s·B̄·Ā would mix scales.
    """
    p = normalize_weights(weights)
    if len(p) != len(states):
        raise AggregationError(f"{len(states)} updates but {len(p)} weights")
    check_same_modules(states)
    raw = [module_tensors(s, f"update {i}") for i, s in enumerate(states)]
    for path, t0 in raw[0].items():
        for i, ts in enumerate(raw[1:], 1):
            A, B = ts[path]["lora_A"], ts[path]["lora_B"]
            if A.shape != t0["lora_A"].shape or B.shape != t0["lora_B"].shape:
                raise AggregationError(f"fedavg needs one rank for all clients: {path} has "
                                       f"A{tuple(t0['lora_A'].shape)} in update 0 and A{tuple(A.shape)} in update {i} "
                                       "(use 'flora' for mixed ranks)")
    scales = [module_scales(s, f"update {i}") for i, s in enumerate(states)]
    for path, s0 in scales[0].items():
        for i, ss in enumerate(scales[1:], 1):
            if ss[path] != s0:
                raise AggregationError(f"fedavg needs one scale for all clients: {path} has s={s0} in update 0 "
                                       f"and s={ss[path]} in update {i}")
    keys = sorted(states[0].tensors)
    for i, s in enumerate(states[1:], 1):
        if sorted(s.tensors) != keys:
            raise AggregationError(f"update {i} has other tensors than update 0")
    tensors = {k: weighted_sum([s.tensors[k] for s in states], p) for k in keys}
    return with_tensors(states[0], tensors)


@dataclass(frozen=True)
class FedAvgArgs:
    """FedIT has no settings: the rule (a weighted mean of each tensor) is fixed by the paper."""


class FedAvg(Aggregator):
    """FedIT: A and B averaged separately (the common baseline; inexact)."""

    name = "fedavg"
    Args = FedAvgArgs

    def combine(self, state: GlobalState, states: list[AdapterState], p: torch.Tensor) -> AggregationResult:
        avg = fedavg_states(states, p)
        new = GlobalState(adapter=with_tensors(state.adapter or avg, avg.tensors), base_delta=dict(state.base_delta),
                          round=state.round, spec=state.spec)
        return AggregationResult(new)
