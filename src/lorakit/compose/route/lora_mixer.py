"""LoRA-Mixer: serial routing of LoRA experts inside the projections, hard-soft routing, and the
specialization balance loss.

Paper: "LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing", Wenbing Li et
al. (arXiv 2507.00029, 2025; ICLR 2026). The official repository (hustcselwb/LoRA-Mixer) holds no code
yet; this follows the paper text as summarised in METHODS.md §2 (abstract, reviews, a detailed blog).

Forward (serial: the experts sit inside each projection that feeds attention/SSM, e.g. q, k, v, o):
with router p(x) = softmax(W_r x) per token (W_r ∈ R^{E×in}, no bias),

    y = W0 x + Σ_{e∈TopK(p)} p̃_e(x) · s_e B_e A_e x,      p̃ = p renormalised over the top-k.

Training uses dense soft fusion (all experts, differentiable: ``dense_in_training``); inference is
top-k sparse (k = 3, blog). "Hard-soft" routing (v2: "a differentiable hard–soft top-k routing
scheme"; the exact construction is not in the sources we could read, this is our reading): tokens
whose task label is known (``task_ids=`` in forward or in the training batch; −1/−100 = unlabelled)
are routed hard to their task's expert, so each expert specialises on its task; in training the
hard weight is a straight-through estimator, value one-hot(task), gradient that of the soft p, so the
router still learns from the task loss; unlabelled tokens are routed softly (training) or top-k
(inference). ``label_coef`` > 0 (ours, off by default) adds a router cross-entropy on the labelled
tokens, MeteoRA-style, for faster router convergence in the joint regime.

Routing specialization loss (Eq. 3; v1 "Specialization Balance Loss", v2 "RSL"):

    L_RSL = α Σ_i p̄_i f̄_i  +  sign · λ · E_x[H(p(x))]

with p̄_i = mean soft score of expert i and f̄_i = E[1(i = argmax p(x))] (``f_def="argmax"``, Eq. 3)
or the share of top-k slots (``f_def="topk"``, text elsewhere). The paper writes −λ·E[H] (sign = −1,
``entropy_sign=-1``, the default: minimising it *maximises* entropy), while its stated intent is
peaked routing (sign = +1); reviewers flagged this, so the sign is configurable. The full objective is
L_task + L_RSL + β Σ_i ‖θ_i − θ_i^(0)‖² (expert preservation for reused experts, joint regime only).

Regimes: ``regime="router_only"`` (frozen public LoRAs, only W_r trains; default) and ``"joint"``
(experts trainable, with the β preservation term against their values when the router was built; start
from PEFT files or from fresh experts, ``route.fresh_bank``). Those reference values θ^(0) are saved
with the router (``_reference.<path>.<A|B|bias>`` in router.safetensors, joint regime with β ≠ 0
only) and restored on load, so training resumed from a saved router keeps pulling toward θ^(0).
Both train with the generic Trainer through
``route.train_router``: the task loss from your ``loss_fn`` plus :meth:`LoRAMixer.aux_loss` (L_RSL, β
term, label term), which the Trainer adds because the model exposes ``aux_loss()``.

    routed = route(model, ["peft/a", "peft/b", "peft/c"], "lora_mixer")          # regime (ii)
    routed = route(model, fresh_bank(model, paths, k=3, r=8), "lora_mixer",
                   regime="joint", preserve_coef=0.0)                            # regime (i)
    train_router(routed, data, collate, loss_fn, TrainConfig(steps=200, lr=1e-2))

Defaults: top_k = 3 (blog); α = 0.01 and λ = 0.01 and β = 0.01 are ours (the sources we could read
give no values; α = 0.01 is the Switch-Transformer balance default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.compose.route.base import ExpertTensors, RoutedLinear, RoutedModel, RouterError, broadcast_labels
from lorakit.compose.route.meteora import topk_weights

REGIMES = ("router_only", "joint")
REFERENCE = "_reference"  # router-file key prefix of θ^(0) (joint regime with β ≠ 0)
F_DEFS = ("argmax", "topk")


@dataclass(frozen=True)
class LoRAMixerArgs:
    top_k: int = 3  # sparse inference (blog)
    dense_in_training: bool = True  # soft fusion of all experts while training
    hard_soft: bool = True  # labelled tokens routed to their expert when task_ids are given
    regime: str = "router_only"
    balance_coef: float = 0.01  # α (ours: Switch default)
    entropy_coef: float = 0.01  # λ (ours)
    entropy_sign: float = -1.0  # paper as written (−λH); +1 penalises entropy (peaked routing)
    f_def: str = "argmax"  # Eq. 3; "topk": share of top-k slots
    preserve_coef: float = 0.01  # β (ours), joint regime
    label_coef: float = 0.0  # ours, off by default: router CE against task labels on labelled tokens
    gate_init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"LoRA-Mixer: regime must be one of {REGIMES}, got {self.regime!r}")
        if self.f_def not in F_DEFS:
            raise ValueError(f"LoRA-Mixer: f_def must be one of {F_DEFS}, got {self.f_def!r}")
        if self.entropy_sign not in (-1.0, 1.0):
            raise ValueError(f"LoRA-Mixer: entropy_sign must be -1 or +1, got {self.entropy_sign}")
        if self.top_k < 1:
            raise ValueError(f"LoRA-Mixer: top_k must be ≥ 1, got {self.top_k}")


def rsl_loss(probs: torch.Tensor, *, balance_coef: float, entropy_coef: float, entropy_sign: float = -1.0,
             f_def: str = "argmax", top_k: int = 1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """α Σ_i p̄_i f̄_i + sign·λ·mean_x H(p(x)) for router probabilities ``probs`` [..., E] (Eq. 3).

    f̄ is not differentiable (an indicator), as in the Switch balance loss; p̄ and H carry the gradient."""
    p = probs.reshape(-1, probs.shape[-1])
    if mask is not None:
        p = p[mask.reshape(-1)]
    n, E = p.shape
    if n == 0:
        return probs.sum() * 0
    p_bar = p.mean(0)
    if f_def == "argmax":
        f_bar = torch.zeros(E, dtype=p.dtype, device=p.device).index_add_(
            0, p.argmax(-1), torch.ones(n, dtype=p.dtype, device=p.device)) / n
    else:
        k = min(top_k, E)
        idx = p.topk(k, dim=-1).indices.reshape(-1)
        f_bar = torch.zeros(E, dtype=p.dtype, device=p.device).index_add_(
            0, idx, torch.ones(idx.numel(), dtype=p.dtype, device=p.device)) / (n * k)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    return balance_coef * (p_bar * f_bar.detach()).sum() + entropy_sign * entropy_coef * entropy


class LoRAMixer(RoutedModel):
    name = "lora_mixer"
    Args = LoRAMixerArgs
    mix = "delta"
    side_inputs = ("task_ids",)

    def make_gate(self, t: ExpertTensors, path: str) -> nn.Module:
        g = torch.Generator().manual_seed(self.args.seed * 100003 + sum(map(ord, path)))
        gate = nn.Linear(t.A.shape[2], t.A.shape[0], bias=False)
        with torch.no_grad():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * self.args.gate_init_std)
        return gate

    def trains_experts(self) -> bool:
        return self.args.regime == "joint"

    def build(self) -> None:
        # θ^(0): the experts as the router was built on them, for the preservation term of the joint regime
        # (saved with the router: after a load the bank holds the trained θ, not θ^(0))
        uses = self.args.regime == "joint" and self.args.preserve_coef != 0
        self._initial = {p: {n: t.detach().clone() for n, t in la.stack.expert_named_parameters()}
                         for p, la in self.layers.items()} if uses else {}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"{REFERENCE}.{p}.{n}": t for p, ts in self._initial.items() for n, t in ts.items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        for p, ts in self._initial.items():
            for n, t in ts.items():
                saved = state[f"{REFERENCE}.{p}.{n}"]
                if saved.shape != t.shape:
                    raise RouterError(f"{REFERENCE}.{p}.{n}: shape {tuple(saved.shape)}, expected {tuple(t.shape)}")
                t.copy_(saved)

    def compute_weights(self, layer: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
        logits = layer.gate(x.to(layer.gate.weight.dtype))
        probs = torch.softmax(logits, dim=-1)
        layer.last = {"probs": probs, "logits": logits}
        if self.training and self.args.dense_in_training:
            w = probs
        else:
            w = topk_weights(torch.log(probs.clamp_min(1e-30)), self.args.top_k, 1.0, "topk_softmax")
        task_ids = self.context.get("task_ids")
        if task_ids is not None and self.args.hard_soft:
            t = broadcast_labels(task_ids, x)
            labelled = t >= 0
            if bool(((t >= self.num_experts) & labelled).any()):
                raise RouterError(f"task id out of range for {self.num_experts} experts")
            hard = torch.nn.functional.one_hot(t.clamp_min(0), self.num_experts).to(w.dtype)
            if self.training:  # straight-through: the value is the hard one-hot, the gradient the soft p
                hard = hard + probs - probs.detach()
            w = torch.where(labelled[..., None], hard, w)
        return w

    def router_probs(self) -> dict[str, torch.Tensor]:
        return {p: la.last["probs"] for p, la in self.layers.items() if "probs" in la.last}

    def aux_loss(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over routed modules of L_RSL (+ β‖θ − θ0‖² in the joint regime); call after forward."""
        probs = self.router_probs()
        if not probs:
            raise RouterError("no router probabilities recorded: run a forward pass first")
        a = self.args
        loss = sum(rsl_loss(p, balance_coef=a.balance_coef, entropy_coef=a.entropy_coef,
                            entropy_sign=a.entropy_sign, f_def=a.f_def, top_k=a.top_k, mask=mask)
                   for p in probs.values()) / len(probs)
        task_ids = self.last_context.get("task_ids")
        if a.label_coef and task_ids is not None:  # ours: router CE on the labelled tokens (MeteoRA-style)
            flat_l, flat_t = [], []
            for la in self.layers.values():
                lg = la.last["logits"]
                flat_l.append(lg.reshape(-1, lg.shape[-1]))
                flat_t.append(broadcast_labels(task_ids, lg).reshape(-1))
            t = torch.cat(flat_t)
            loss = loss + a.label_coef * torch.nn.functional.cross_entropy(
                torch.cat(flat_l), t.masked_fill(t < 0, -100), ignore_index=-100)
        if self._initial:
            loss = loss + a.preserve_coef * sum(((t - self._initial[p][n].to(t)) ** 2).sum()
                                                for p, la in self.layers.items()
                                                for n, t in la.stack.expert_named_parameters())
        return loss

    def routing_accuracy(self, task_ids: torch.Tensor) -> float:
        hits = total = 0
        for p in self.router_probs().values():
            t = broadcast_labels(task_ids, p)
            keep = t >= 0
            hits += int((p.argmax(-1) == t)[keep].sum())
            total += int(keep.sum())
        return hits / max(total, 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.gate_parameters() + [p for la in self.layers.values() for p in la.stack.expert_parameters()
                                         if p.requires_grad]
