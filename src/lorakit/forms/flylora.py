"""FlyLoRA: an implicit rank-wise mixture of experts with a frozen sparse random down-projection.

Paper: "FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via Implicit Rank-Wise
Mixture-of-Experts", Heming Zou, Yunliang Zang, Wutong Xu, Yao Zhu, Xiangyang Ji — NeurIPS 2025,
arXiv 2510.08396. Official code: github.com/gfyddha/FlyLoRA (minimal ``flylora.py`` and a PEFT fork,
``peft/src/peft/tuners/lora/layer.py``, lines marked ``# modified``).

The update for one token x (the paper's Sec. 3 forward pass, written here per token):

    y = A x                        A ∈ R^{r×n} frozen, sparse, random
    S(x) = TopK_k(y + d)           the k ranks ("experts") this token activates
    h = W0 x + (α/r) · B (m(x) ⊙ y),   m(x)_i = 1 if i ∈ S(x) else 0,   B ∈ R^{m×r}, B = 0 at init

* A: each row has exactly p = ⌊n·ρ⌋ non-zeros (default sparsity ratio ρ = p/n = k/r, the minimal
  code's default; the fork's n // (r // k) is the same number when k divides r), at positions drawn
  uniformly without replacement, values ~ N(0, 1/r²). A is never trained; it is stored with the
  adapter (a buffer) so a reload is exact whatever the RNG.
* d ∈ R^r, the expert bias, is not trained by gradient: after every routing step it moves by the
  loss-free load-balancing rule d ← d + u · sign(mean(c) − c), c = how many tokens of the batch chose
  each rank (auxiliary-loss-free balancing, Wang et al. 2024 / DeepSeek-V3). d only changes which
  ranks are selected, never the output magnitude. It is a saved buffer (``expert_bias``).
* Only B trains: m·r parameters per layer. ΔW(x) = (α/r) B diag(m(x)) A depends on the input, so the
  form is **not mergeable** (no MERGEABLE capability; ``merge`` refuses; ``delta_weight`` raises).
  ``dense_delta_weight()`` gives (α/r)·B·A with every rank on — what the fork's get_delta_weight
  returns and what its multi-task merging averages — but it is not this form's output.

Defaults (scripts/run_mmlu.sh, Llama-3.1-8B MMLU): r = 32, α = 64, k = 8, u = 1e-3 (``bias_u``; the
fork's config default is 0.01), dropout 0.

Where the paper, the minimal code and the fork disagree (paper followed, the others are options):

* top-k on the signed y + d (paper equation, and the fork used for the paper's runs) vs on |y + d|
  (minimal ``flylora.py``): ``topk_abs=True``.
* when d moves: during training forwards (``bias_update="train"``, as the paper's load balancing and
  the minimal code) vs on every forward including evaluation (fork: ``"always"``; eval outputs then
  drift from call to call) or never (``"never"``, a frozen router).
* the fork computes A x under ``torch.no_grad()``, so no gradient reaches x through the adapter; the
  paper's math lets it flow (A is frozen either way): ``detach_input=True`` gives the fork's behaviour.

Pitfalls handled or documented: the bias update happens once per forward, so gradient checkpointing
(which re-runs the forward) updates d twice per step, and under DDP each replica balances on its own
batch (d may then differ across replicas, as in the fork); the minimal code's ``update_bias`` compares
raw counts with k/r frequencies and is never called, so it is not followed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_choice, check_common, check_min
from lorakit.forms.base import Form

BIAS_UPDATES = ("train", "always", "never")


@dataclass(frozen=True)
class FlyLoRAArgs:
    r: int = 32  # total ranks (experts); run_mmlu.sh
    k: int = 8  # ranks active per token; run_mmlu.sh --top_k 8
    alpha: float = 64.0  # scale α/r; run_mmlu.sh --lora_alpha 64
    bias_u: float = 1e-3  # load-balancing step u; run_mmlu.sh --bias_u 0.001
    density: float | None = None  # ρ = p/n non-zeros per row of A; None = k/r (paper/code default)
    topk_abs: bool = False  # True: top-k on |y + d| (minimal flylora.py)
    bias_update: str = "train"  # "train" | "always" (fork) | "never"
    detach_input: bool = False  # True: no gradient to x through the adapter (fork's no_grad)
    dropout: float = 0.0  # on x before A (as LoRA / the fork); run_mmlu.sh uses 0

    def __post_init__(self) -> None:
        if self.r < 1 or not 1 <= self.k <= self.r:
            raise ValueError(f"flylora: need r >= 1 and 1 <= k <= r, got r={self.r}, k={self.k}")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"flylora: density (non-zeros per row / in_features) must be in (0, 1], "
                             f"got {self.density}")
        check_choice("flylora", "bias_update", self.bias_update, BIAS_UPDATES)
        check_min("flylora", "bias_u", self.bias_u, 0)
        check_common("flylora", self)


def balance_bias(bias: torch.Tensor, selected: torch.Tensor, step: float) -> torch.Tensor:
    """Loss-free load balancing: ``bias += step · sign(mean(c) − c)``; c = selections per rank.

    ``selected`` holds the chosen rank indices (any shape). Returns the counts c. In place, no grad.
    """
    with torch.no_grad():
        counts = torch.bincount(selected.reshape(-1), minlength=bias.numel()).to(bias.dtype)
        bias.add_(torch.sign(counts.mean() - counts), alpha=step)
    return counts


def should_update(mode: str, training: bool) -> bool:
    return mode == "always" or (mode == "train" and training)


class FlyLoRA(Form):
    name = "flylora"
    Args = FlyLoRAArgs
    caps = Cap.ROUTED | Cap.CONV1D_OK | Cap.IDENTITY_AT_INIT
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)

    def __init__(self, base_layer: nn.Module, args: FlyLoRAArgs) -> None:
        super().__init__(base_layer, args)
        device = base_layer.weight.device
        self.register_buffer("lora_A", torch.zeros(args.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, args.r, device=device))
        self.register_buffer("expert_bias", torch.zeros(args.r, device=device))
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.args.alpha / self.args.r

    @property
    def nonzeros_per_row(self) -> int:
        density = self.args.density if self.args.density is not None else self.args.k / self.args.r
        return max(1, min(self.in_features, int(self.in_features * density + 1e-9)))

    def reset_parameters(self) -> None:
        r, n, p = self.args.r, self.in_features, self.nonzeros_per_row
        with torch.no_grad():
            # a uniformly random p-subset of the columns for each row, values ~ N(0, 1/r²)
            cols = torch.rand(r, n).argsort(dim=1)[:, :p]
            values = torch.randn(r, p) / r
            a = torch.zeros(r, n).scatter_(1, cols, values)
            self.lora_A.copy_(a)
            self.lora_B.zero_()
            self.expert_bias.zero_()

    # -- routing ---------------------------------------------------------------------------
    def scores(self, y: torch.Tensor) -> torch.Tensor:
        """Routing scores for projections y = A x: y + d (or |y + d| with ``topk_abs``)."""
        s = y + self.expert_bias.to(y.dtype)
        return s.abs() if self.args.topk_abs else s

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Indices (..., k) of the ranks each token activates (no bias update)."""
        with torch.no_grad():
            return self.scores(x @ self.lora_A.T).topk(self.args.k, dim=-1).indices

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x)
        if self.args.detach_input:
            h = h.detach()
        y = h @ self.lora_A.T
        with torch.no_grad():
            selected = self.scores(y).topk(self.args.k, dim=-1).indices
        mask = torch.zeros_like(y).scatter_(-1, selected, 1.0)
        out = base_out + ((y * mask) @ self.lora_B.T) * self.scaling
        if should_update(self.args.bias_update, self.training):
            balance_bias(self.expert_bias, selected, self.args.bias_u)
        return out

    # -- semantics -------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        raise ValueError(f"form {self.name!r} routes every token to its own top-{self.args.k} ranks: its ΔW "
                         "depends on the input, so there is no fixed ΔW (not MERGEABLE); use apply(), or "
                         "dense_delta_weight() for the all-ranks-on (α/r)·B·A")

    def dense_delta_weight(self) -> torch.Tensor:
        """(α/r)·B·A with every rank active (the fork's get_delta_weight); not the routed output."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: FlyLoRAArgs) -> int:
        return out_features * args.r

    @classmethod
    def examples(cls) -> list[FlyLoRAArgs]:
        return [FlyLoRAArgs(r=8, k=2, alpha=16.0),
                FlyLoRAArgs(r=4, k=1, alpha=8.0, density=0.5, topk_abs=True, detach_input=True, dropout=0.1)]

