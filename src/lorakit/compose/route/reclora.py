"""RecLoRA: a per-user soft mixture of meta-LoRAs, weighted from a user representation.

Paper: "Lifelong Personalized Low-Rank Adaptation of Large Language Models for Recommendation",
Jiachen Zhu, Jianghao Lin, Xinyi Dai, Bo Chen, Rong Shan, Jieming Zhu, Ruiming Tang, Yong Yu, Weinan
Zhang (arXiv 2408.03533, 2024). Official code: Gebro13/RecLoRA (``modeling_lorec_trash_v1.py::
Loreclayer, Lorec``; ``finetune_lorec.py``), read as summarised in METHODS.md (Part "Initializations",
§13).

Per target projection a bank of K meta-LoRAs (A_k, B_k). From the user representation h_u (the
embedding a pre-trained conventional recommender gives the user) a gate MLP gives

    α = softmax(MLP(h_u) / T),   MLP = LayerNorm → Linear(d, 60) → ReLU → Dropout(0.1) → Linear(60, K)

and the personalised adapter of sample u is applied to every token of that sample, in every layer:

    mix="factors" (official code): A_u = Σ_k α_k A_k, B_u = Σ_k α_k s_k B_k,  y = W0 x + B_u A_u x
    mix="delta":                   y = W0 x + Σ_k α_k s_k B_k A_k x

The official code mixes the factors (a product of weighted sums, with cross terms B_j A_k); the
paper's text describes the personalised LoRA as a soft combination of the meta-LoRAs without settling
this; we follow the code by default (METHODS.md warns that ``Σα_k B_k A_k`` is not what the code
does) and offer the weighted sum of ΔW as ``mix="delta"``. Both agree for one-hot α.

Options from the code: ``top_k`` (hard top-2 routing there; 0 = soft, the default), ``sqrt`` (√ after the
softmax). One gate shared by all layers (``per_layer_gate=False``, default: the brief's "applied to all
layers"); ``per_layer_gate=True`` gives each projection its own MLP, as ``Loreclayer`` holds one.
Defaults: K = 8 meta-LoRAs (``lora_assemble_num``), hidden 60, dropout 0.1, T = 1 (code); r = 8,
α = 2r, A Kaiming, B = 0 for fresh meta-LoRAs (code; :func:`fresh_meta_loras`).

Per-sample adapters cannot be merged into W0; export is the router folder (meta-LoRAs + gate), or
one plain adapter materialised per user (:meth:`RecLoRA.user_adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.compose.route.base import ExpertTensors, LoRABank, RoutedLinear, RoutedModel, RouterError, fresh_bank


@dataclass(frozen=True)
class RecLoRAArgs:
    user_dim: int = 64  # dimension of h_u (the CRM's user embedding); set to yours
    hidden: int = 60  # code
    dropout: float = 0.1  # code
    temperature: float = 1.0
    top_k: int = 0  # 0: soft over all K; code option: hard top-2
    sqrt: bool = False  # code option: √ of the softmax weights
    mix: str = "factors"  # official code; "delta": Σ α_k ΔW_k
    per_layer_gate: bool = False
    train_experts: bool = True  # the meta-LoRAs are trained jointly with the gate in the paper
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mix not in ("factors", "delta"):
            raise ValueError(f"RecLoRA: mix must be 'factors' or 'delta', got {self.mix!r}")
        if self.user_dim < 1 or self.hidden < 1 or self.top_k < 0 or not self.temperature > 0:
            raise ValueError("RecLoRA: user_dim, hidden ≥ 1, top_k ≥ 0 and temperature > 0 required")


def gate_mlp(user_dim: int, hidden: int, k: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(user_dim), nn.Linear(user_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, k))


class RecLoRA(RoutedModel):
    name = "reclora"
    Args = RecLoRAArgs
    side_inputs = ("user",)

    @property
    def mix(self) -> str:  # type: ignore[override]
        return self.args.mix

    def make_gate(self, t: ExpertTensors, path: str) -> nn.Module | None:
        if not self.args.per_layer_gate:
            return None
        torch.manual_seed(self.args.seed + sum(map(ord, path)))
        return gate_mlp(self.args.user_dim, self.args.hidden, t.A.shape[0], self.args.dropout)

    def build(self) -> None:
        torch.manual_seed(self.args.seed)
        self.user_gate = None if self.args.per_layer_gate else \
            gate_mlp(self.args.user_dim, self.args.hidden, self.num_experts, self.args.dropout)
        self._weights: torch.Tensor | dict[str, torch.Tensor] | None = None

    def trains_experts(self) -> bool:
        return self.args.train_experts

    def router_modules(self) -> nn.Module:
        return self.user_gate if self.user_gate is not None else nn.Module()

    def weights_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        a = self.args
        w = torch.softmax(logits / a.temperature, dim=-1)
        if a.top_k:
            v, idx = w.topk(min(a.top_k, w.shape[-1]), dim=-1)
            w = torch.zeros_like(w).scatter(-1, idx, v / v.sum(-1, keepdim=True))
        return w.sqrt() if a.sqrt else w

    def user_weights(self, user: torch.Tensor, gate: nn.Module | None = None) -> torch.Tensor:
        """α [batch, K] for user representations [batch, user_dim]."""
        user = torch.as_tensor(user, dtype=torch.float32)
        if user.dim() != 2 or user.shape[1] != self.args.user_dim:
            raise RouterError(f"user must be [batch, {self.args.user_dim}], got {tuple(user.shape)}")
        gate = gate if gate is not None else self.user_gate
        return self.weights_from_logits(gate(user.to(next(gate.parameters()).device)))

    def prepare(self, context: dict[str, Any]) -> None:
        user = context.get("user")
        if user is None:
            self._weights = None
        elif self.user_gate is not None:
            self._weights = self.user_weights(user)
        else:
            self._weights = {p: self.user_weights(user, la.gate) for p, la in self.layers.items()}

    def compute_weights(self, layer: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
        if self._weights is None:
            raise RouterError("RecLoRA needs the user representation: call model(..., user=h_u) with h_u "
                              f"[batch, {self.args.user_dim}] (or set_weights for a fixed mixture)")
        w = self._weights[layer.path] if isinstance(self._weights, dict) else self._weights
        if w.shape[0] != x.shape[0]:
            raise RouterError(f"user batch {w.shape[0]} ≠ input batch {x.shape[0]}")
        layer.last = {"weights": w}
        if self.mix == "delta":
            return w.reshape(w.shape[0], *([1] * (x.dim() - 2)), w.shape[-1])
        return w

    def user_adapter(self, user: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One user's personalised adapter per module as scale-folded factors (B_u, A_u) (``factors``
        mix, rank r_max) or its ΔW as (ΔW, I) (``delta`` mix): a plain LoRA for that user."""
        self.prepare({"user": torch.as_tensor(user, dtype=torch.float32).reshape(1, -1)})
        out = {}
        with torch.no_grad():
            for p, la in self.layers.items():
                w = (self._weights[p] if isinstance(self._weights, dict) else self._weights)[0]
                s = la.stack
                if self.mix == "factors":
                    out[p] = (torch.einsum("e,eor->or", w * s.scale, s.B), torch.einsum("e,eri->ri", w, s.A))
                else:
                    dw = sum(w[e] * s.expert_delta(e) for e in range(s.num_experts))
                    out[p] = (dw, torch.eye(dw.shape[1]))
        self._weights = None
        return out



def fresh_meta_loras(model: nn.Module, targets: list[str], k: int = 8, r: int = 8, alpha: float | None = None,
                     seed: int = 0) -> LoRABank:
    """K untrained meta-LoRAs on ``targets`` (module paths): A Kaiming-uniform, B = 0, s = α/r, α = 2r (code)."""
    return fresh_bank(model, targets, k, r, alpha, seed, names=[f"meta_{i}" for i in range(k)])


__all__ = ["RecLoRA", "RecLoRAArgs", "fresh_meta_loras"]
