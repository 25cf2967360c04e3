"""MeteoRA: per-linear top-k gates over a bank of frozen LoRAs, trained with a gate cross-entropy.

Paper: "MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models", Jingwei Xu, Junyu Lai,
Yunpeng Huang (arXiv 2405.13053, 2024; ICLR 2025). Official code: NJUDeepEngine/meteora
(``MoELoRA/layer.py::MoELinear.forward``, ``modeling_llama_meteor.py::lora_gate_loss_func``).

Per gated Linear (every adapted projection), with N LoRAs and a gate G ∈ R^{N×in} (no bias), per token x:

    l = G x;   (v, idx) = TopK(l, k);   w = softmax(v / T);   y = W0 x + Σ_{j∈idx} w_j s_j B_j A_j x

(``gate_order="topk_softmax"``, the accelerated path of the official code and the paper's equation).
The code's non-accelerated path computes softmax(l / T) → top-k → renormalise; that variant is
``gate_order="softmax_topk"`` (identical for T=1 up to renormalisation; both are offered).

Training (:meth:`MeteoRA.gate_loss`): cross-entropy of every gate's logits l against the token's task
id (the index of its adapter in the bank), averaged over gated modules and labelled tokens
(label −100 = ignore), times ``aux_coef`` (50 in ``meteora_train.py``: ``moe_aux_loss_coef``). The
official script adds the LM loss and also tunes the LoRAs; here the LoRAs are frozen by default
(``train_experts=True`` makes them trainable, as the script).

Defaults: k = 2 and T = 1 (code defaults; the README uses T = 15/20/30 for composite-3/5/10 tasks),
aux_coef = 50 (code). Gates initialised N(0, 0.02) (our choice; the code uses nn.Linear's init).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.compose.route.base import ExpertTensors, RoutedLinear, RoutedModel, RouterError, broadcast_labels

GATE_ORDERS = ("topk_softmax", "softmax_topk")


@dataclass(frozen=True)
class MeteoRAArgs:
    top_k: int = 2  # code default
    temperature: float = 1.0  # code default; README: 15/20/30 for composite-3/5/10
    gate_order: str = "topk_softmax"  # paper / accelerated code path; "softmax_topk": non-accelerated path
    aux_coef: float = 50.0  # meteora_train.py moe_aux_loss_coef
    gate_init_std: float = 0.02
    train_experts: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"MeteoRA: top_k must be ≥ 1, got {self.top_k}")
        if not self.temperature > 0:
            raise ValueError(f"MeteoRA: temperature must be > 0, got {self.temperature}")
        if self.gate_order not in GATE_ORDERS:
            raise ValueError(f"MeteoRA: gate_order must be one of {GATE_ORDERS}, got {self.gate_order!r}")


def topk_weights(logits: torch.Tensor, k: int, temperature: float, order: str) -> torch.Tensor:
    """Dense [..., E] weights, zero outside the top-k (shared with LoRA-Mixer's sparse inference)."""
    k = min(k, logits.shape[-1])
    if order == "topk_softmax":
        v, idx = logits.topk(k, dim=-1)
        w = torch.softmax(v / temperature, dim=-1)
    else:
        p = torch.softmax(logits / temperature, dim=-1)
        w, idx = p.topk(k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
    return torch.zeros_like(logits).scatter(-1, idx, w)


class MeteoRA(RoutedModel):
    name = "meteora"
    Args = MeteoRAArgs
    mix = "delta"
    side_inputs = ("task_ids",)  # labels for the gate loss only; routing never reads them

    def make_gate(self, t: ExpertTensors, path: str) -> nn.Module:
        g = torch.Generator().manual_seed(self.args.seed + len(self.__dict__.get("_gates_made", [])))
        self.__dict__.setdefault("_gates_made", []).append(path)
        gate = nn.Linear(t.A.shape[2], t.A.shape[0], bias=False)
        with torch.no_grad():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * self.args.gate_init_std)
        return gate

    def trains_experts(self) -> bool:
        return self.args.train_experts

    def compute_weights(self, layer: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
        logits = layer.gate(x.to(layer.gate.weight.dtype))
        layer.last = {"logits": logits}
        return topk_weights(logits, self.args.top_k, self.args.temperature, self.args.gate_order)

    def gate_logits(self) -> dict[str, torch.Tensor]:
        """The gate logits [..., E] of every gated module from the last forward."""
        return {p: la.last["logits"] for p, la in self.layers.items() if "logits" in la.last}

    def gate_loss(self, task_ids: torch.Tensor, *, coef: float | None = None) -> torch.Tensor:
        """aux_coef · mean over gated modules and labelled tokens of CE(l, task id) (call after forward).

        ``task_ids``: [batch] (one task per sequence) or [batch, seq] (per token; −100 ignored)."""
        logits = self.gate_logits()
        if not logits:
            raise RouterError("no gate logits recorded: run a forward pass (with routing on) first")
        flat_l, flat_t = [], []
        for lg in logits.values():
            t = broadcast_labels(task_ids, lg[..., :1].expand(*lg.shape[:-1], 1))
            flat_l.append(lg.reshape(-1, lg.shape[-1]))
            flat_t.append(t.reshape(-1))
        loss = F.cross_entropy(torch.cat(flat_l), torch.cat(flat_t), ignore_index=-100)
        return (self.args.aux_coef if coef is None else coef) * loss

    def aux_loss(self) -> torch.Tensor:
        """The gate loss of the last forward against its ``task_ids`` (0 when it had none): the Trainer
        adds it to the task loss (``route.train_router``)."""
        task_ids = self.last_context.get("task_ids")
        if task_ids is None or not self.gate_logits():
            return torch.zeros(())
        return self.gate_loss(task_ids)

    def gate_accuracy(self, task_ids: torch.Tensor) -> float:
        """Share of labelled (module, token) pairs whose top gate is the token's task (after forward)."""
        hits = total = 0
        for lg in self.gate_logits().values():
            t = broadcast_labels(task_ids, lg[..., :1].expand(*lg.shape[:-1], 1))
            keep = t != -100
            hits += int((lg.argmax(-1) == t)[keep].sum())
            total += int(keep.sum())
        return hits / max(total, 1)

    def train_gates(self, batches: Any, *, steps: int = 100, lr: float = 5e-4, lm_loss: bool = False,
                    progress: bool = False) -> list[float]:
        """Gate training: AdamW on the gates (and experts if train_experts) with the gate CE (+ LM loss).

        ``batches``: an iterable (cycled) of dicts with ``input_ids`` and ``task_ids`` (and ``labels``
        when ``lm_loss``). lr 5e-4 is the official script's. Returns the loss per step."""
        from itertools import cycle

        from tqdm.auto import tqdm

        params = self.gate_parameters() + [p for la in self.layers.values() for p in la.stack.expert_parameters()
                                           if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.train()
        losses = []
        it = cycle(batches)
        for _ in tqdm(range(steps), desc="meteora gates", disable=not progress, leave=False):
            batch = dict(next(it))
            task_ids = batch.pop("task_ids")
            out = self(**batch)
            loss = self.gate_loss(task_ids)
            if lm_loss:
                loss = loss + out.loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        self.eval()
        return losses
