"""SMoRA: Single-ranked Mixture of Experts LoRA — every rank of one LoRA is an expert.

Paper: "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task
Learning", Ziyu Zhao, Yixiao Zhou, Zhi Zhang, Didi Zhu, Tao Shen, Zexi Li, Jinluan Yang, Xuwu Wang,
Jing Su, Kun Kuang, Zhongyu Wei, Fei Wu, Yu Cheng — arXiv 2501.15103 (2025; KDD 2026). Official code
(found after METHODS.md was written): github.com/StyxXuan/smora, PEFT tuner
``packages/peft/src/peft/tuners/srmole/layer.py`` (``SRMoLELinear``), configs
``scripts/traing_configs/config_flan/*/..._srmole*.yaml``.

The paper's unified view: a multi-LoRA MoE equals one LoRA with block-wise gating,
h = W0 x + s·B G(x) A x with a diagonal gate G(x); SMoRA takes blocks of size one (rank-wise
experts) and a routed top-k gate G(x) = TopK(W_g x + b) with a trainable router W_g ∈ R^{r×n} and a
load-balancing bias b that is not trained by gradient (auxiliary-loss-free balancing). Per token:

    z = W_g x,   σ = sigmoid(z) + b,   S(x) = TopK_k(σ)
    g_i = k · σ_i / Σ_{j∈S} σ_j  for i ∈ S(x), else 0               (gate="sigmoid")
    h = W0 x + (α/k) · B (g ⊙ A x)
    after the step:  b ← b + u · sign(mean(c) − c),  c = tokens per rank in the batch

What is verified where (the paper's full text could not be read here, only its abstract and
third-party summaries that state G(x) = TopK(W_g x + b) with a load-deviation bias update):

* READ in the official code: sigmoid router scores (``torch.sigmoid(lora_router(x))``), the bias is
  added before top-k *and* stays in the gate values, gates are the selected scores normalised to sum
  1 and multiplied by k, scale α/k (``lora_alpha / activate_r``, not α/r), the update
  b += u·sign(mean(c) − c) in training forwards only, u = 1e-5 (the layer default; the configs do
  not set it), A Kaiming-uniform, B = 0, router = nn.Linear default init (Kaiming-uniform, no bias).
* Configs (Llama-2 7B/13B, Qwen2.5-7B, FLAN and multi-domain mixes): r = 64, k = 8 (``activate_r``),
  α = 16, all linear layers, lr 1e-4, 3 epochs, dropout 0 (LLaMA-Factory default). These are the
  defaults here.
* INFERRED / options: ``gate="softmax"`` (the classic Softmax(TopK(z)) of MoE papers, ×k, bias used
  for selection only) and ``gate="binary"`` (g_i = 1, a pure mask; then the router gets no gradient
  and stays at its init, so only the load-balancing bias moves the selection). If the paper's gate
  differs from the code, switch here; the code's variant is the default because it is the one that
  produced the reported numbers.

Not mergeable (the gate depends on the input): no MERGEABLE capability, ``merge`` refuses and
``delta_weight`` raises. B = 0 at init, so the output equals the base at init.
Trainable per layer: A (r·n) + B (m·r) + router (r·n) = r(2n + m). The bias ``expert_bias`` is a
saved buffer, so save/load is exact.

Pitfalls: the code's gate keeps the bias inside the gate values (DeepSeek-V3 uses it for selection
only); with gradient checkpointing the bias moves twice per step; under DDP each replica balances on
its own batch; the code's ``forward`` returns inside its adapter loop (only the first active adapter
is applied) — not reproduced here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.forms.base import Form
from lorakit.forms.flylora import BIAS_UPDATES, balance_bias, should_update

GATES = ("sigmoid", "softmax", "binary")


@dataclass(frozen=True)
class SMoRAArgs:
    r: int = 64  # ranks = experts; srmole configs lora_rank 64
    k: int = 8  # ranks active per token; srmole configs activate_r 8
    alpha: float = 16.0  # scale α/k (code: lora_alpha / activate_r); configs lora_alpha 16
    bias_u: float = 1e-5  # load-balancing step u; SRMoLELinear default bias_update_rate
    gate: str = "sigmoid"  # "sigmoid" (code) | "softmax" | "binary"
    bias_update: str = "train"  # "train" (code) | "always" | "never"
    dropout: float = 0.0  # on x before router and A; LLaMA-Factory default

    def __post_init__(self) -> None:
        if self.r < 1 or not 1 <= self.k <= self.r:
            raise ValueError(f"smora: need r >= 1 and 1 <= k <= r, got r={self.r}, k={self.k}")
        if self.gate not in GATES:
            raise ValueError(f"smora: gate must be one of {GATES}, got {self.gate!r}")
        if self.bias_update not in BIAS_UPDATES:
            raise ValueError(f"smora: bias_update must be one of {BIAS_UPDATES}, got {self.bias_update!r}")
        if self.bias_u < 0:
            raise ValueError(f"smora: bias_u must be >= 0, got {self.bias_u}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"smora: dropout must be in [0, 1), got {self.dropout}")


class SMoRA(Form):
    name = "smora"
    Args = SMoRAArgs
    caps = Cap.ROUTED | Cap.CONV1D_OK | Cap.IDENTITY_AT_INIT
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)

    def __init__(self, base_layer: nn.Module, args: SMoRAArgs) -> None:
        super().__init__(base_layer, args)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(args.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, args.r, device=device))
        self.lora_router = nn.Parameter(torch.empty(args.r, self.in_features, device=device))
        self.register_buffer("expert_bias", torch.zeros(args.r, device=device))
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.args.alpha / self.args.k

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))
        with torch.no_grad():
            self.expert_bias.zero_()

    # -- routing ---------------------------------------------------------------------------
    def gates(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates (..., r) with exactly k non-zeros per token, selected indices (..., k))."""
        z = h @ self.lora_router.T
        biased = torch.sigmoid(z) + self.expert_bias.to(z.dtype)
        with torch.no_grad():
            selected = biased.topk(self.args.k, dim=-1).indices
        k = self.args.k
        if self.args.gate == "sigmoid":
            chosen = biased.gather(-1, selected)
            values = k * chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-12)
        elif self.args.gate == "softmax":
            values = k * torch.softmax(z.gather(-1, selected), dim=-1)
        else:
            values = torch.ones(selected.shape, dtype=z.dtype, device=z.device)
        return torch.zeros_like(z).scatter(-1, selected, values), selected

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x)
        gates, selected = self.gates(h)
        out = base_out + (((h @ self.lora_A.T) * gates) @ self.lora_B.T) * self.scaling
        if should_update(self.args.bias_update, self.training):
            balance_bias(self.expert_bias, selected, self.args.bias_u)
        return out

    # -- semantics -------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        raise ValueError(f"form {self.name!r} gates its ranks per token (top-{self.args.k} of a learned "
                         "router): its ΔW depends on the input, so there is no fixed ΔW (not MERGEABLE); "
                         "use apply()")

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: SMoRAArgs) -> int:
        return args.r * (2 * in_features + out_features)

    @classmethod
    def examples(cls) -> list[SMoRAArgs]:
        return [SMoRAArgs(r=8, k=2, alpha=4.0),
                SMoRAArgs(r=4, k=2, alpha=2.0, gate="softmax", dropout=0.1)]
