"""LoRA-Pro: Are Low-Rank Adapters Properly Optimized? (Wang & Liang, ICLR 2025, arXiv 2407.18242).

With ΔW = s·B·A (B ∈ R^{m×r}, A ∈ R^{r×n}) and G = ∂L/∂W, LoRA's gradients are g_A = s·Bᵀ·G and
g_B = s·G·Aᵀ, and one SGD step on (A, B) moves W along the *equivalent gradient*
g̃ = s·(B·g_A' + g_B'·A). LoRA-Pro replaces (g_A, g_B) by the (g_A', g_B') that minimise ‖g̃ − G‖_F
(Theorem 2.1), using only g_A, g_B, A and B:

    g_A' = s⁻²·(BᵀB)⁻¹·g_A + X·A
    g_B' = s⁻²·[I − B(BᵀB)⁻¹Bᵀ]·g_B·(AAᵀ)⁻¹ − B·X

so that g̃ = P_B·G + G·P_A − P_B·G·P_A, the orthogonal projection of G onto the tangent space of the
rank-r matrices at BA (P_B = B(BᵀB)⁻¹Bᵀ, P_A = Aᵀ(AAᵀ)⁻¹A); g̃ does not depend on X. X is the one
that minimises ‖g_A' − g_A‖² + ‖g_B' − g_B‖² (Theorem 2.2), the solution of the Sylvester equation

    BᵀB·X + X·AAᵀ = −s⁻²·(BᵀB)⁻¹·g_A·Aᵀ

(solved here in closed form by eigendecomposing the two symmetric r×r matrices, in float64).

Modes (``mode``):

- ``"adjust"`` (the paper's Algorithm 1 with the trainer's optimizer): the adjusted gradients replace
  p.grad after clipping, and the trainer's AdamW steps on them.
- ``"adam"`` (default; the official code mrflogs/LoRA-Pro, ``lorapro_full_adjustment`` in its patched
  DeepSpeed, the path used by its Llama-2 scripts, and the paper's Algorithm 2): per layer, full m×n
  Adam moments are kept on g̃ (X = 0), ĝ = m̂/(√v̂ + ε) is mapped back to g_A = s·Bᵀĝ, g_B = s·ĝAᵀ, these
  are adjusted again with the Sylvester X, and a plain SGD step θ ← θ − lr·g' is taken with the
  trainer's current learning rate (scheduler included); the trainer's AdamW then skips A and B (their
  .grad is cleared). Costs two m×n state matrices per adapted layer (full-FT-sized Adam memory).
  Weight decay (AdamW's decoupled form, with the param group's value) is applied to A and B as in
  the trainer's AdamW; the official scripts set it to 0.

First step of a layer (B = 0, BᵀB singular): g_A' = g_A, g_B' = s⁻²·g_B·(AAᵀ + δI)⁺, δ = 1e-8, as the
official code. Inverses are pseudo-inverses of (M + δI), as the official code. Differences from the
official code, on purpose: s is read from each form (the code hard-codes 16/8); the second moment is
kept in fp32 (the code updates it in bf16). Betas/eps default to the trainer's (0.9, 0.999) and 1e-8.

Modules by capability (``Cap.FACTORED_AB`` forms with ``scaling``); both A and B must train.
Logs ``lorapro_adjust``: the mean over layers of ‖g_A' − g_A‖/‖g_A‖.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.forms.base import Form
from lorakit.strategies.base import Strategy

if TYPE_CHECKING:
    from lorakit.train.context import TrainingContext

JITTER = 1e-8


def solve_sylvester_sym(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with P·X + X·Q = C for symmetric P, Q (eigendecomposition; float64 inside)."""
    dt = C.dtype
    lp, U = torch.linalg.eigh(P.double())
    lq, V = torch.linalg.eigh(Q.double())
    F = U.T @ C.double() @ V
    return (U @ (F / (lp[:, None] + lq[None, :])) @ V.T).to(dt)


def _pinv(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(M.double() + JITTER * torch.eye(M.shape[0], dtype=torch.float64, device=M.device))


def adjust(A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float, *,
           first: bool = False, return_X: bool = False):
    """LoRA-Pro's adjusted gradients (g_A', g_B') (and X) from g_A, g_B, A, B and the scale s."""
    dt = gA.dtype
    A64, B64, gA64, gB64 = A.double(), B.double(), gA.double(), gB.double()
    AAt_inv = _pinv(A64 @ A64.T)
    if first:
        X = torch.zeros(A.shape[0], A.shape[0], dtype=torch.float64, device=A.device)
        nA, nB = gA64, gB64 @ AAt_inv / s ** 2
    else:
        BtB = B64.T @ B64
        BtB_inv = _pinv(BtB)
        X = solve_sylvester_sym(BtB, A64 @ A64.T, -(BtB_inv @ gA64 @ A64.T) / s ** 2)
        proj = torch.eye(B.shape[0], dtype=torch.float64, device=B.device) - B64 @ BtB_inv @ B64.T
        nA = BtB_inv @ gA64 / s ** 2 + X @ A64
        nB = proj @ gB64 @ AAt_inv / s ** 2 - B64 @ X
    out = (nA.to(dt), nB.to(dt))
    return (*out, X) if return_X else out


def equivalent_gradient(A, B, gA, gB, s: float) -> torch.Tensor:
    """g̃ = s·(B·g_A + g_B·A): the full-weight direction of an SGD step on (A, B)."""
    return s * (B @ gA + gB @ A)


@dataclass(frozen=True)
class LoRAProArgs:
    mode: str = "adam"  # adam (official code, Algorithm 2) | adjust (Algorithm 1 + the trainer's AdamW)
    betas: tuple[float, float] | None = None  # None: the trainer's betas
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.mode not in ("adam", "adjust"):
            raise ValueError(f"lora_pro: mode must be 'adam' (official code) or 'adjust' (paper + trainer's "
                             f"optimizer), got {self.mode!r}")


class LoRAPro(Strategy):
    name = "lora_pro"
    caps = Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    Args = LoRAProArgs
    requires = Cap.FACTORED_AB
    excludes = Cap.FROZEN_A  # the adjusted A gradient needs a trainable A
    exclusive_with = frozenset({"allora"})  # both rewrite the A/B update

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        a = self.args
        # betas: filled from the trainer's config at train start when None (mutable run state, not an arg)
        self.mode, self.betas, self.eps = a.mode, a.betas, float(a.eps)
        self.forms: list[Form] = []
        self.state: dict[int, dict[str, Any]] = {}  # per form index: step, m, v
        self.last_adjust: float | None = None

    def _forms(self, model: nn.Module) -> list[Form]:
        forms = [m for m in model.modules() if isinstance(m, Form) and Cap.FACTORED_AB in m.caps
                 and m.lora_B.requires_grad]
        if not forms:
            raise ValueError("strategy 'lora_pro' needs a trainable factored adapter (form 'lora' or another "
                             "Cap.FACTORED_AB form); the model has none")
        frozen = [f for f in forms if not f.lora_A.requires_grad]
        if frozen:
            raise ValueError("strategy 'lora_pro' adjusts the gradients of both A and B; an adapter has A frozen "
                             "(FFA-LoRA); use a form with trainable A")
        return forms

    def on_train_start(self, ctx: TrainingContext) -> None:
        self.forms = self._forms(ctx.model)
        if self.betas is None:
            self.betas = tuple(ctx.config.betas)

    def _group_of(self, optimizer: torch.optim.Optimizer, p: nn.Parameter) -> dict[str, Any]:
        for g in optimizer.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise ValueError("lora_pro: an adapter tensor is not in the optimizer")

    @torch.no_grad()
    def on_before_optimizer_step(self, ctx: TrainingContext, step: int) -> None:
        if not self.forms:
            self.on_train_start(ctx)
        rel = []
        for i, f in enumerate(self.forms):
            A, B = f.lora_A, f.lora_B
            if A.grad is None or B.grad is None:
                continue
            s = float(f.scaling)
            st = self.state.setdefault(i, {"step": 0})
            first = st["step"] == 0
            if self.mode == "adjust":
                nA, nB = adjust(A.detach(), B.detach(), A.grad, B.grad, s, first=first)
                rel.append(float((nA - A.grad).norm() / A.grad.norm().clamp_min(1e-30)))
                A.grad.copy_(nA)
                B.grad.copy_(nB)
                st["step"] += 1
                continue
            b1, b2 = self.betas
            gA0, gB0 = adjust(A.detach(), B.detach(), A.grad, B.grad, s, first=first)
            g_eq = equivalent_gradient(A.detach(), B.detach(), gA0, gB0, s).float()
            if "m" not in st:
                st["m"], st["v"] = torch.zeros_like(g_eq), torch.zeros_like(g_eq)
            st["m"].lerp_(g_eq, 1 - b1)
            st["v"].mul_(b2).addcmul_(g_eq, g_eq, value=1 - b2)
            t = st["step"] + 1
            g_hat = (st["m"] / (1 - b1 ** t)) / ((st["v"] / (1 - b2 ** t)).sqrt() + self.eps)
            g_hat = g_hat.to(A.dtype)
            nA, nB = adjust(A.detach(), B.detach(), s * B.detach().T @ g_hat, s * g_hat @ A.detach().T, s,
                            first=first)
            rel.append(float((nA - A.grad).norm() / A.grad.norm().clamp_min(1e-30)))
            for p, g in ((A, nA), (B, nB)):
                group = self._group_of(ctx.optimizer, p)
                lr, wd = group["lr"], group.get("weight_decay", 0.0)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(g, alpha=-lr)
                p.grad = None  # the trainer's AdamW skips it
            st["step"] = t
        self.last_adjust = sum(rel) / len(rel) if rel else None

    def on_step_end(self, ctx: TrainingContext, step: int, logs: dict[str, Any]) -> None:
        if self.last_adjust is not None and math.isfinite(self.last_adjust):
            logs["lorapro_adjust"] = self.last_adjust

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "state": {str(k): dict(v) for k, v in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("mode") != self.mode:
            raise ValueError(f"lora_pro: checkpoint was written in mode {state.get('mode')!r}, this run uses "
                             f"{self.mode!r}")
        self.state = {int(k): dict(v) for k, v in state["state"].items()}
