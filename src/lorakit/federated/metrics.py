"""Aggregation gap and traffic of one round.

Aggregation gap (METHODS.md): ‖aggregated ΔW − Σ_k p_k ΔW_k‖_F / ‖Σ_k p_k ΔW_k‖_F, where every ΔW
is measured from the round's starting base weights: a client's ΔW_k is its adapter's s·B_k·A_k;
the aggregated ΔW is the new global adapter's s·B·A plus what the round merged into the base.
Norms run over all adapted modules together; ``max_module`` is the worst single module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.core.state import AdapterState
from lorakit.federated.base import (
    GlobalState,
    base_delta_weights,
    delta_weights,
    normalize_weights,
    tensor_bytes,
)


def global_delta(state: GlobalState) -> dict[str, torch.Tensor]:
    """module path -> ΔW of the global model over the original base (adapter + merged delta)."""
    out = {p: d.double() for p, d in base_delta_weights(state.base_delta).items()}
    if state.adapter is not None:
        for p, d in delta_weights(state.adapter).items():
            out[p] = out.get(p, 0) + d.double()
    return out


def aggregation_gap(before: GlobalState, after: GlobalState, states: Sequence[AdapterState],
                    weights: Sequence[float] | torch.Tensor) -> dict[str, float]:
    """The relative gap of one round (see the module docstring) over the completed client states."""
    p = normalize_weights(weights)
    start = {k: v.double() for k, v in base_delta_weights(before.base_delta).items()}
    end = {k: v.double() for k, v in base_delta_weights(after.base_delta).items()}
    agg = {m: end.get(m, 0) - start.get(m, 0) for m in set(start) | set(end)}
    if after.adapter is not None:
        for m, d in delta_weights(after.adapter).items():
            agg[m] = agg.get(m, 0) + d.double()
    ideal: dict[str, torch.Tensor] = {}
    for st, w in zip(states, p):
        for m, d in delta_weights(st).items():
            ideal[m] = ideal.get(m, 0) + float(w) * d.double()
    num = den = 0.0
    worst = 0.0
    for m, target in ideal.items():
        got = agg.get(m, torch.zeros_like(target))
        if not isinstance(got, torch.Tensor):
            got = torch.zeros_like(target)
        err, ref = float((got - target).norm()) ** 2, float(target.norm()) ** 2
        num, den = num + err, den + ref
        if ref > 0:
            worst = max(worst, (err / ref) ** 0.5)
    rel = (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))
    return {"relative": rel, "max_module": worst, "ideal_norm": den ** 0.5}


def traffic(download: dict[str, torch.Tensor], uploads: Sequence[dict[str, torch.Tensor]],
            n_sent: int) -> dict[str, int]:
    """Bytes of one round: the download sent to ``n_sent`` clients and every upload received."""
    down = tensor_bytes(download)
    ups = [tensor_bytes(u) for u in uploads]
    return {"down_bytes_per_client": down, "down_bytes": down * n_sent,
            "up_bytes_per_client": max(ups) if ups else 0, "up_bytes": sum(ups),
            "total_bytes": down * n_sent + sum(ups)}
