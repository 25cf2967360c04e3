"""FLoRA: stacking-based federated LoRA with heterogeneous ranks (Wang et al., "FLoRA: Federated
Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations", NeurIPS 2024,
arXiv 2409.05976; official code ATP-1010/FederatedLLM, fed_utils/model_aggregation.py).

Stacking rule (per module), on the scale-folded factors of the core's factor reader (B'_k = s_k·B_k):
    A_st = concat_rows(p_1·A_1, …, p_K·A_K)  ∈ R^{Σr_k × k}
    B_st = concat_cols(s_1·B_1, …, s_K·B_K)  ∈ R^{d × Σr_k}
so that B_st·A_st = Σ_k p_k·s_k·B_k·A_k exactly, for any mix of client ranks r_k and scales s_k.
The official code multiplies only A by p_k and keeps α/r equal on every client; folding s_k into
the factors as well (METHODS.md) allows any per-client α. The stacked adapter (rank Σr_k, scale 1) is merged
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
from dataclasses import dataclass

import torch

from lorakit.core.factors import LoRAFactors, lora_state
from lorakit.core.state import AdapterState
from lorakit.federated.base import (
    AggregationError,
    AggregationResult,
    Aggregator,
    GlobalState,
    add_to_base_delta,
    check_same_modules,
    lora_factors,
    normalize_weights,
    tensor_bytes,
)


def flora_stack(states: Sequence[AdapterState], weights: Sequence[float] | torch.Tensor) -> AdapterState:
    """The stacked adapter: a plain LoRA of rank Σr_k with α = Σr_k (scale 1) whose ΔW is Σ_k p_k·ΔW_k."""
    p = normalize_weights(weights)
    if len(p) != len(states):
        raise AggregationError(f"{len(states)} updates but {len(p)} weights")
    check_same_modules(states)
    factors = [lora_factors(s, f"update {i}") for i, s in enumerate(states)]
    ranks = {sum(fs[path].rank for fs in factors) for path in factors[0]}
    if len(ranks) != 1:
        raise AggregationError("flora: the stacked rank differs between modules; give each client one rank")
    stacked: dict[str, LoRAFactors] = {}
    for path, f0 in factors[0].items():
        if any(fs[path].bias is not None for fs in factors):
            raise AggregationError("flora: adapters with a bias (lora_bias) are not supported")
        for i, fs in enumerate(factors):
            f = fs[path]
            if f.A.shape[1] != f0.A.shape[1] or f.B.shape[0] != f0.B.shape[0]:
                raise AggregationError(f"flora: {path} has other dimensions in update {i}")
        A = torch.cat([float(w) * fs[path].A for fs, w in zip(factors, p)], dim=0)
        B = torch.cat([fs[path].B for fs in factors], dim=1)  # already s_k·B_k
        stacked[path] = LoRAFactors(B=B.contiguous(), A=A.contiguous())
    return lora_state(stacked, base=states[0].base, meta=states[0].meta)


@dataclass(frozen=True)
class FLoRAArgs:
    """FLoRA has no settings: stacking is exact and the merge into the base happens every round."""


class FLoRA(Aggregator):
    """Exact stacking of heterogeneous-rank client adapters, merged into the base each round."""

    name = "flora"
    Args = FLoRAArgs
    fresh_adapters = True
    heterogeneous_ranks = True

    def combine(self, state: GlobalState, states: list[AdapterState], p: torch.Tensor) -> AggregationResult:
        stacked = flora_stack(states, p)
        delta = dict(state.base_delta)
        for path, f in lora_factors(stacked, "stacked adapter").items():
            delta = add_to_base_delta(delta, path, f.B, f.A)  # scale already folded into B
        new = GlobalState(adapter=None, base_delta=delta, round=state.round, spec=state.spec)
        return AggregationResult(new, info={"stacked_rank": stacked.spec.form_args["r"],
                                            "increment_bytes": tensor_bytes(stacked.tensors),
                                            "client_ranks": [s.spec.form_args.get("r") for s in states]})
