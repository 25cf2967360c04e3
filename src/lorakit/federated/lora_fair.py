"""LoRA-FAIR: server-side residual correction (Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA
Fine-Tuning with Aggregation and Initialization Refinement", ICCV 2025, arXiv 2411.14961).

Per module the server averages Ā = Σ p_k A_k and B̄ = Σ p_k B_k (as FedIT), forms the ideal update
ΔW = Σ_k p_k·s·B_k·A_k and solves for a residual ΔB on B only:
    ΔB = argmin_ΔB  S(ΔW, s·(B̄ + ΔB)·Ā) + λ·‖ΔB‖_F,     S = 1 − cosine similarity (flattened),
with λ = 0.01 (the paper's default), solved iteratively on the server (here: Adam from ΔB = 0, 200
steps, step size 0.05·RMS(B̄) per module; the iterate with the lowest objective is kept). It sends
(Ā, B̄' = B̄ + ΔB) back, and clients start the next round from them ("Avg-Initial"); W0 is
unchanged and the traffic equals FedIT's. Homogeneous ranks only (as the paper).

The paper's code was not available (METHODS.md), so the solver details are ours. ``solver="l2"``
is a closed-form variant, argmin ‖ΔW/s − (B̄+ΔB)Ā‖² + λ·μ·‖ΔB‖² with μ = tr(ĀĀᵀ)/r (so λ is
scale-free): B̄' = (ΔW/s·Āᵀ + λμ·B̄)(ĀĀᵀ + λμ·I)⁻¹. It never has a larger Frobenius gap than FedAvg.
Neither variant can be exact: s·B̄'·Ā has rank ≤ r while ΔW has rank up to K·r.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lorakit.core.state import AdapterState
from lorakit.federated.base import (
    AggregationError,
    AggregationResult,
    Aggregator,
    GlobalState,
    key,
    module_tensors,
    normalize_weights,
    with_tensors,
)
from lorakit.federated.fedavg import fedavg_states

SOLVERS = ("cosine", "l2")


@dataclass(frozen=True)
class _Pair:
    """Raw averaged factors of one module (ΔW/s = B·A)."""

    A: torch.Tensor
    B: torch.Tensor


@dataclass(frozen=True)
class LoRAFAIRArgs:
    """LoRA-FAIR's server-side solve; λ = 0.01 is the paper's default, the solver details are ours."""

    lam: float = 0.01  # λ, the weight of the ‖ΔB‖ regularizer
    solver: str = "cosine"  # "cosine" (the paper's S) or "l2" (closed form)
    steps: int = 200  # optimizer steps of the cosine solve
    lr: float = 0.05  # Adam step size, relative to RMS(B̄)

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"lora_fair: solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.lam < 0 or self.steps < 0 or self.lr <= 0:
            raise ValueError("lora_fair: lam and steps must be >= 0 and lr > 0")


def _cosine_solve(targets: list[torch.Tensor], Bs: list[torch.Tensor], As: list[torch.Tensor],
                  args: LoRAFAIRArgs) -> list[torch.Tensor]:
    """ΔB_m minimizing 1 − cos(T_m, (B_m+ΔB_m)A_m) + λ‖ΔB_m‖_F for each module m (float64, deterministic).

    Modules are independent; those of one shape are solved together as a batch. ΔB_m = ρ_m·U_m with
    ρ_m = RMS(B̄_m), and Adam on U uses step size ``lr``, i.e. a step relative to each module's B̄.
    """
    out: list[torch.Tensor | None] = [None] * len(Bs)
    groups: dict[tuple, list[int]] = {}
    for i, (B, A) in enumerate(zip(Bs, As)):
        groups.setdefault((tuple(B.shape), tuple(A.shape)), []).append(i)
    for idx in groups.values():
        T = torch.stack([targets[i].double() for i in idx])
        B = torch.stack([Bs[i].double() for i in idx])
        A = torch.stack([As[i].double() for i in idx])
        rho = B.square().mean(dim=(1, 2)).sqrt()
        for j, i in enumerate(idx):  # B̄ = 0: step relative to the least-squares B instead
            if float(rho[j]) == 0.0:
                ls = targets[i].double() @ torch.linalg.pinv(As[i].double())
                rho[j] = float(ls.square().mean().sqrt()) or 1.0
        tn = T.flatten(1).norm(dim=1)
        best = _solve_group(T, B, A, rho.view(-1, 1, 1), tn, args)
        for j, i in enumerate(idx):
            out[i] = torch.zeros_like(Bs[i]) if float(tn[j]) == 0.0 else best[j].float()
    return out  # type: ignore[return-value]


def _solve_group(T: torch.Tensor, B: torch.Tensor, A: torch.Tensor, rho: torch.Tensor, tn: torch.Tensor,
                 args: LoRAFAIRArgs) -> torch.Tensor:
    """Batched Adam on U (ΔB = ρ·U) for modules of one shape; the best ΔB seen per module."""
    U = torch.zeros_like(B, requires_grad=True)
    opt = torch.optim.Adam([U], lr=args.lr)
    eps = 1e-12 * rho.flatten()

    def objective(U: torch.Tensor) -> torch.Tensor:  # one value per module
        delta = rho * U
        cand = ((B + delta) @ A).flatten(1)
        cos = (T.flatten(1) * cand).sum(1) / (tn * cand.norm(dim=1)).clamp_min(1e-300)
        reg = torch.sqrt(delta.flatten(1).square().sum(1) + eps * eps) - eps  # ‖ΔB‖_F, smooth at 0
        return 1.0 - cos + args.lam * reg

    with torch.no_grad():
        best_val = objective(U)
    best = torch.zeros_like(B)
    with torch.enable_grad():
        for _ in range(args.steps):
            opt.zero_grad()
            objective(U).sum().backward()
            opt.step()
            with torch.no_grad():
                val = objective(U)
                better = val < best_val
                best[better] = (rho * U)[better]
                best_val = torch.where(better, val, best_val)
    return best


def _l2_solve(target: torch.Tensor, B: torch.Tensor, A: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔB of the closed-form variant (see the module docstring)."""
    T, B, A = target.double(), B.double(), A.double()
    gram = A @ A.T
    mu = float(torch.trace(gram)) / A.shape[0]
    reg = lam * mu if mu > 0 else lam
    eye = torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    rhs = T @ A.T + reg * B
    X = torch.linalg.solve(gram + reg * eye, rhs.T).T  # X = rhs·(gram + reg·I)^-1 (gram is symmetric)
    return (X - B).float()


def lora_fair_states(states: Sequence[AdapterState], weights: Sequence[float] | torch.Tensor,
                     args: LoRAFAIRArgs | None = None) -> tuple[AdapterState, dict[str, float]]:
    """(Ā, B̄ + ΔB) as an adapter, and per-round diagnostics (mean cosine before/after, ‖ΔB‖/‖B̄‖)."""
    args = args or LoRAFAIRArgs()
    p = normalize_weights(weights)
    avg = fedavg_states(states, p)  # checks one rank and one scale for everyone
    # raw (unscaled) factors: fedavg_states checked that s is one per module, and both objectives
    # are written in units of ΔW/s (the cosine one is scale-free anyway)
    raw = [module_tensors(s, f"update {i}") for i, s in enumerate(states)]
    tensors = dict(avg.tensors)
    cos_before, cos_after, rel = [], [], []
    averaged = {path: _Pair(A=t["lora_A"], B=t["lora_B"]) for path, t in module_tensors(avg, "average").items()}
    targets = {}
    for path, fa in averaged.items():
        target = torch.zeros(fa.B.shape[0], fa.A.shape[1], dtype=torch.float64, device=fa.B.device)
        for ts, w in zip(raw, p):
            target += float(w) * (ts[path]["lora_B"].double() @ ts[path]["lora_A"].double())  # Σ p_k B_k A_k
        targets[path] = target
    paths = list(averaged)
    with _one_thread():  # hundreds of small ops: extra threads only spin-wait (30x slower on a busy box)
        deltas = _solve(paths, targets, averaged, args)
    for path, delta in zip(paths, deltas):
        fa, target = averaged[path], targets[path]
        new_B = fa.B + delta
        tensors[key(path, "lora_B", avg)] = new_B.contiguous()
        cos_before.append(_cos(target, fa.B.double() @ fa.A.double()))
        cos_after.append(_cos(target, new_B.double() @ fa.A.double()))
        rel.append(float(delta.norm() / fa.B.norm()) if float(fa.B.norm()) > 0 else 0.0)
    info = {"fair_cos_before": _mean(cos_before), "fair_cos_after": _mean(cos_after),
            "fair_rel_delta_B": _mean(rel)}
    return with_tensors(avg, tensors), info


def _solve(paths: list[str], targets: dict, averaged: dict, args: LoRAFAIRArgs) -> list[torch.Tensor]:
    if args.solver == "l2":
        return [_l2_solve(targets[m], averaged[m].B, averaged[m].A, args.lam) for m in paths]
    return _cosine_solve([targets[m] for m in paths], [averaged[m].B for m in paths],
                         [averaged[m].A for m in paths], args)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(torch.dot(a.flatten(), b.flatten())) / (na * nb) if na > 0 and nb > 0 else math.nan


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


class LoRAFAIR(Aggregator):
    """LoRA-FAIR: FedAvg plus a server-side residual ΔB on B̄; clients start from (Ā, B̄')."""

    name = "lora_fair"
    Args = LoRAFAIRArgs
    # the FedConfig fields of earlier releases (`-o fair_lambda=...`, Flower apps written by them)
    legacy_options = {"fair_lambda": "lam", "fair_solver": "solver", "fair_steps": "steps"}

    @classmethod
    def examples(cls) -> list[LoRAFAIRArgs]:
        return [LoRAFAIRArgs(steps=20), LoRAFAIRArgs(solver="l2", lam=0.1)]

    def combine(self, state: GlobalState, states: list[AdapterState], p: torch.Tensor) -> AggregationResult:
        # a bias (lora_bias) is averaged as in FedAvg (linear, so exact); only B is corrected
        refined, info = lora_fair_states(states, p, self.args)
        if state.adapter is None:
            raise AggregationError("lora_fair: the global state has no adapter")
        new = GlobalState(adapter=with_tensors(state.adapter, refined.tensors), base_delta=dict(state.base_delta),
                          round=state.round, spec=state.spec)
        return AggregationResult(new, info=info)
