"""FLoRA: stacking-based federated LoRA with heterogeneous ranks (Wang et al., "FLoRA: Federated
Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations", NeurIPS 2024,
arXiv 2409.05976; official code ATP-1010/FederatedLLM, fed_utils/model_aggregation.py).

Stacking rule (per module):
    A_st = concat_rows(p_1·s_1·A_1, …, p_K·s_K·A_K) ∈ R^{Σr_k × k}
    B_st = concat_cols(B_1, …, B_K)                 ∈ R^{d × Σr_k}
so that B_st·A_st = Σ_k p_k·s_k·B_k·A_k exactly, for any mix of client ranks r_k and scales s_k.
The official code multiplies only A by p_k and keeps α/r equal on every client; folding s_k into
A as well (METHODS.md) allows any per-client α. The stacked adapter (rank Σr_k, scale 1) is merged
into the base weights every round, and every client starts the next round from a *fresh* LoRA
(random A, B = 0) on the merged base.

Traffic: clients send r_k(d+k) per module; the server sends the merged change of the base
(stateless clients), as stacked factors while Σ rank·(d+k) < d·k, then as one dense d×k matrix.
A client that kept its merged base from the previous round needs only that round's stacked factors
(Σr_k·(d+k) per module): each round reports their size as ``increment_bytes``, the downlink per client
of a stateful deployment, next to the stateless downlink counted in the traffic.
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
    add_to_base_delta,
    check_same_modules,
    key,
    lora_factors,
    normalize_weights,
    tensor_bytes,
    with_tensors,
)


def flora_stack(states: Sequence[AdapterState], weights: Sequence[float] | torch.Tensor) -> AdapterState:
    """The stacked adapter: a LoRA of rank Σr_k with α = Σr_k (scale 1) whose ΔW is Σ_k p_k·ΔW_k."""
    p = normalize_weights(weights)
    if len(p) != len(states):
        raise AggregationError(f"{len(states)} updates but {len(p)} weights")
    check_same_modules(states)
    factors = [lora_factors(s, f"update {i}") for i, s in enumerate(states)]
    ranks = {sum(fs[path].rank for fs in factors) for path in factors[0]}
    if len(ranks) != 1:
        raise AggregationError("flora: the stacked rank differs between modules; give each client one rank")
    total = ranks.pop()
    tensors = {}
    for path, f0 in factors[0].items():
        if any(fs[path].bias is not None for fs in factors):
            raise AggregationError("flora: adapters with a bias (lora_bias) are not supported")
        for i, fs in enumerate(factors):
            f = fs[path]
            if f.A.shape[1] != f0.A.shape[1] or f.B.shape[0] != f0.B.shape[0]:
                raise AggregationError(f"flora: {path} has other dimensions in update {i}")
        A = torch.cat([(float(w) * fs[path].s) * fs[path].A for fs, w in zip(factors, p)], dim=0)
        B = torch.cat([fs[path].B for fs in factors], dim=1)
        tensors[key(path, "lora_A", states[0])] = A.contiguous()
        tensors[key(path, "lora_B", states[0])] = B.contiguous()
    form_args = {**states[0].spec.form_args, "r": total, "alpha": float(total), "rslora": False}
    return with_tensors(states[0], tensors, form_args=form_args, module_args={})


class FLoRA(Aggregator):
    """Exact stacking of heterogeneous-rank client adapters, merged into the base each round."""

    name = "flora"
    fresh_adapters = True
    heterogeneous_ranks = True

    def combine(self, state: GlobalState, states: list[AdapterState], p: torch.Tensor) -> AggregationResult:
        stacked = flora_stack(states, p)
        delta = dict(state.base_delta)
        for path, f in lora_factors(stacked, "stacked adapter").items():
            delta = add_to_base_delta(delta, path, f.B * f.s, f.A)
        new = GlobalState(adapter=None, base_delta=delta, round=state.round, spec=state.spec)
        return AggregationResult(new, info={"stacked_rank": stacked.spec.form_args["r"],
                                            "increment_bytes": tensor_bytes(stacked.tensors),
                                            "client_ranks": [s.spec.form_args.get("r") for s in states]})
