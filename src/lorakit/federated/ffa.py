"""FFA-LoRA: Federated Freeze-A LoRA (Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving
Federated Learning", ICLR 2024, arXiv 2403.12313). No official code was found (METHODS.md).

A is fixed at its random init A0, drawn by every client from the same seed; only B is trained,
sent and averaged:  W = W0 + s·(Σ_k p_k·B_k)·A0 = W0 + Σ_k p_k·s·B_k·A0, which is exact.
Traffic: d·r per module each way (half of LoRA); A0 never travels. Under DP-SGD the noise enters
B only, so it stays linear in ΔW (no ξ_B·ξ_A term).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterState
from lorakit.federated.base import (
    AggregationError,
    AggregationResult,
    Aggregator,
    GlobalState,
    module_tensors,
    with_tensors,
)
from lorakit.federated.fedavg import fedavg_states


def ffa_states(states: Sequence[AdapterState], weights: Sequence[float] | torch.Tensor, *,
               atol: float = 0.0) -> AdapterState:
    """Σ_k p_k·B_k on the shared A0; every client's A must equal A0 (up to ``atol``)."""
    raw = [module_tensors(s, f"update {i}") for i, s in enumerate(states)]
    for path, t0 in raw[0].items():
        a0 = t0["lora_A"]
        for i, ts in enumerate(raw[1:], 1):
            a = ts[path]["lora_A"]
            if a.shape != a0.shape or not torch.allclose(a, a0, rtol=0.0, atol=atol):
                raise AggregationError(f"ffa: update {i} has another A on {path}; FFA-LoRA needs one frozen A "
                                       "shared by all clients (same adapter seed)")
    return fedavg_states(states, weights)  # A is the same everywhere, so its average is A0 itself


@dataclass(frozen=True)
class FFAArgs:
    """FFA-LoRA has no server-side settings: B is averaged on the one seeded A0 (the rule is exact)."""


class FFA(Aggregator):
    """FFA-LoRA: A frozen at the shared seed, B averaged; exact."""

    name = "ffa"
    Args = FFAArgs
    form = "ffa"  # LoRA with freeze_A=True
    seeded_tensors = ("lora_A",)

    def check_spec(self, spec: AdapterSpec) -> None:
        super().check_spec(spec)
        from lorakit.core import registry
        from lorakit.core.spec import build_args

        cls = registry.get("form", spec.form)
        if not getattr(build_args(cls.Args, spec.form_args, owner=spec.form), "freeze_A", False):
            raise AggregationError(f"aggregator 'ffa' needs A frozen: use form 'ffa' (or 'lora' with "
                                   f"freeze_A=true), got form {spec.form!r}")

    def combine(self, state: GlobalState, states: list[AdapterState], p: torch.Tensor) -> AggregationResult:
        avg = ffa_states(states, p)
        # A0 is copied from the global adapter, never averaged (bit-for-bit the seed's A0).
        cls = avg.form_class()
        tensors = {k: (state.adapter.tensors[k] if cls.split_key(k)[1] == "lora_A" else t)
                   for k, t in avg.tensors.items()} if state.adapter is not None else avg.tensors
        new = GlobalState(adapter=with_tensors(state.adapter or avg, tensors), base_delta=dict(state.base_delta),
                          round=state.round, spec=state.spec)
        return AggregationResult(new)
