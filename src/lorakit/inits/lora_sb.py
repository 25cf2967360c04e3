"""LoRA-SB: "Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank
Fine-Tuning" (Ponkshe, Singhal, Gorbunov, Tumanov, Horvath, Vepakomma; arXiv 2411.19557, 2024), Sec. 4
(update approximation; optimal initialization of the LoRA-XS form).

Form: LoRA-XS, ΔW = s·B·R·A with A, B frozen and only R ∈ R^{r×r} trained (``lorakit.forms.lora_xs``;
any form with capability FACTORED_BMA is accepted, the theory assumes A and B frozen, as in forms
``lora_xs`` and ``inttune``). Init:

1. Calibration: sum the gradients of the target base weights over the calibration batches,
   G_Σ = Σ_b ∂L_b/∂W (official ``estimate_and_process_grads_torch``: 50 samples, batch 3).
2. Update approximation, the first step of full fine-tuning:
   ``update="sign"`` (default; official code): ΔW₁ = −η₁·sign(G_Σ), Adam's first step (m̂/√v̂ = sign g);
   ``update="grad"``: ΔW₁ = −η₁·Ḡ (an SGD step on the mean gradient Ḡ = G_Σ / #batches).
   η₁ = lr / warmup_steps, the learning rate of the first step under linear warmup (official:
   ``eff_lr = lr / (warmup_ratio · total_steps)``).
3. Truncated SVD ΔW₁ ≈ U_r Σ_r V_rᵀ and
       B = U_r,   A = V_rᵀ,   R = Σ_r / s          (so s·B·R·A = [ΔW₁]_r, the best rank-r approximation).
   Normalization: the official code sets R = Σ_r with α = r (s = 1), which is the same; dividing by s
   keeps s·B·R·A = [ΔW₁]_r for any α. A and B have orthonormal rows/columns, so a training step of R moves
   ΔW by s·B·δR·A, within span(B) × span(A): an SGD step gives δ(ΔW) = −η s² B Bᵀ G AᵀA, the projection
   of the full fine-tuning step onto the two subspaces (the paper's "preserves update directions").

Base weight (an honest choice): the paper and the official code do NOT offset the base: the model starts
at W + [ΔW₁]_r, i.e. as if the first (low-rank) step of full fine-tuning had been taken (so the output
is NOT the base output at init). That is the default here. ``residual=True`` writes W ← W − [ΔW₁]_r
instead (output unchanged at init, like PiSSA/LoRA-GA); only then does the instance declare
``Cap.REWRITES_BASE`` (the driver reads ``needs`` on the instance), so saving exports relative to the
ORIGINAL base.

SVD: the paper's truncated SVD, exact (``svd="exact"``, default). ``svd="lowrank"`` is the official code's
``torch.svd_lowrank(ΔW₁ᵀ, q=r, niter=10)`` after ``torch.manual_seed(42)`` (lorakit seeds without
touching the global RNG). The official code then casts U, S, V to bf16; lorakit keeps fp32.

Defaults (official ``train_arithmetic.py``, Mistral-7B MetaMathQA): lr 1e-4, warmup_ratio 0.02 of the
total steps (pass the resulting ``warmup_steps``; the default 1 makes η₁ = lr), 50 calibration samples
(``max_batches`` caps the batches), form r = 96, α = r.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_fields
from lorakit.forms.base import Form
from lorakit.inits.base import Init
from lorakit.inits.calibration import weight_gradients

UPDATES = ("sign", "grad")
SVDS = ("exact", "lowrank")


def update_approximation(grad: torch.Tensor, eta: float, update: str = "sign") -> torch.Tensor:
    """ΔW₁ from the accumulated gradient: −η·sign(G) or −η·G."""
    if update not in UPDATES:
        raise ValueError(f"lora_sb: update must be one of {UPDATES}, got {update!r}")
    g = grad.detach().float()
    return -eta * (torch.sign(g) if update == "sign" else g)


def truncated_svd(delta: torch.Tensor, r: int, svd: str = "exact", niter: int = 10,
                  seed: int = 42) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, V_rᵀ) of an (out, in) matrix: exact, or the official randomized one (q = r)."""
    if svd == "exact":
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    devices = [delta.device] if delta.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        # the official code factors ΔW₁ᵀ (in, out): ΔW₁ᵀ ≈ U' S V'ᵀ  ⇒  ΔW₁ ≈ V' S U'ᵀ
        u_t, s, v_t = torch.svd_lowrank(delta.T, q=r, niter=niter)
    return v_t, s, u_t.T


@dataclass(frozen=True)
class LoRASBArgs:
    lr: float = 1e-4  # η of the simulated full fine-tuning step(s): ΔW ≈ −(lr / warmup_steps)·update(G)
    warmup_steps: int = 1
    update: str = "sign"  # "sign" (official code: Adam's first step) or "grad" (module docstring)
    residual: bool = False  # also rewrite the base W ← W − s·B·R·A (output unchanged at init)
    svd: str = "exact"  # exact | lowrank
    niter: int = 10  # subspace iterations of the low-rank SVD
    seed: int = 42
    max_batches: int | None = None  # None: every calibration batch

    def __post_init__(self) -> None:
        check_fields("init 'lora_sb'", self, choices={"update": UPDATES, "svd": SVDS},
                     at_least={"warmup_steps": 1, "max_batches": 1}, positive=("lr",))


class LoRASBInit(Init):
    """LoRA-SB init of a three-factor form (ΔW = s·B·R·A); see the module docstring."""

    name = "lora_sb"
    caps = Cap.LOW_PRECISION_OK  # hardware: bf16/fp16; rewrites W or needs its gradient: no quantized base
    Args = LoRASBArgs
    needs = Cap.NEEDS_DATA | Cap.NEEDS_GRAD
    requires = Cap.FACTORED_BMA
    purpose = "sets ΔW = s·B·R·A: frozen A and B and a trainable r×r middle matrix R"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eta = self.args.lr / self.args.warmup_steps
        if self.args.residual:  # only this variant rewrites the base (the driver reads `needs` on the instance)
            self.needs = Cap.NEEDS_DATA | Cap.NEEDS_GRAD | Cap.REWRITES_BASE

    def collect(self, model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any] | None) -> Any:
        reduce = "sum" if self.args.update == "sign" else "mean"
        return weight_gradients(model, layers, batches, reduce=reduce, loss_fn=self.loss_fn,
                                max_batches=self.args.max_batches, desc="lora_sb gradients")

    def apply(self, form: Form, base_layer: nn.Module, stats: Any) -> None:
        if stats is None:
            raise ValueError("init 'lora_sb': no gradient for a layer (collect() not run?)")
        if not {"lora_A", "lora_B"} <= form.frozen:
            warnings.warn(f"init 'lora_sb' on form {form.name!r}, which trains A and B: LoRA-SB's guarantees "
                          "assume only the middle matrix trains (form 'lora_xs')", stacklevel=2)
        middle = getattr(form, form.middle_name)
        r = middle.shape[0]
        delta = update_approximation(stats, self.eta, self.args.update)
        if r > min(delta.shape):
            raise ValueError(f"init 'lora_sb': rank r={r} exceeds min(out, in) = {min(delta.shape)}")
        u, s, vh = truncated_svd(delta, r, self.args.svd, self.args.niter, self.args.seed)
        scale = float(getattr(form, "scaling", 1.0))
        with torch.no_grad():
            form.lora_B.copy_(u)
            form.lora_A.copy_(vh)
            middle.copy_(torch.diag(s / scale))
