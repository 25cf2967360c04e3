"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang, Yu & Li, NeurIPS 2024, arXiv 2407.05000),
Sec. 3.2 (gradient approximation, Eq. (8)–(9)), Sec. 3.3 (stable scale) and Sec. 3.4 (base offset).

Calibration: Ḡ = the gradient of the loss w.r.t. each target base weight W (out, in), averaged over the
calibration batches (the official ``estimate_gradient``: sum over batches / number of batches). With the
SVD Ḡ = U S Vᵀ (singular values in decreasing order) the factors are, for rank r,

    A0 = c·V[:, :r]ᵀ,      B0 = c·U[:, r:2r],      c = m^{1/4} / √γ,   m = out features, γ = 16,

and the base becomes W_res = W − s·B0·A0 (output unchanged at init; ``Cap.REWRITES_BASE``: lorakit
records (A0, B0), and ``lorakit.save`` writes the rank-2r PEFT adapter for the ORIGINAL base).

Why (Sec. 3.2): after one plain SGD step of size η on A and B, with G the gradient w.r.t. the effective
weight (= Ḡ when the step's batch is the calibration data, since the output is unchanged at init),

    ΔW_1 − ΔW_0 = −η s² (G A0ᵀA0 + B0B0ᵀ G) + η² s³ G A0ᵀ B0ᵀ G                    (exact)
                = −η s² c² · U_{2r} S_{2r} V_{2r}ᵀ + O(η²),

because G V_r V_rᵀ = U_r S_r V_rᵀ and U_{r:2r} U_{r:2r}ᵀ G = U_{r:2r} S_{r:2r} V_{r:2r}ᵀ: the first-order
step is proportional to the best rank-2r approximation of G (Eckart–Young), i.e. to the first step of
full fine-tuning restricted to rank 2r. The stable scale (Sec. 3.3, Theorem 3.1) keeps the adapter's
output O(1) as widths grow; the paper pairs it with rsLoRA, s = α/√r (the official reproduction uses
``init.weight=stable`` with ``use_rslora=True``): attach it with ``form_args={"rslora": True}``.

SVD (official ``lora_ga_init``): ``torch.svd_lowrank(Ḡ, q=min(4r, min(m, n)), niter=4)``; lorakit seeds
it (``seed``, the global RNG is untouched) so the init is reproducible; ``svd="exact"`` uses
``torch.linalg.svd`` (exact top-2r vectors). The SVD and the offset are done in fp32.

``variant="peft"``: PEFT's ``init_lora_weights="lora_ga"`` (``tuners/lora/layer.py::lora_ga_init``,
direction "ArB2r", scale "stable"), which differs from the official code:

    A0 = V[:, :r]ᵀ,   B0 = c·U[:, r:2r]·diag(S[r:2r]),   c = m^{1/4}/√γ with m = ``weight.shape[0]``

(the singular values sit in B and the stable factor only on B; the scale s is whatever the form uses,
α/r unless rsLoRA). m is the layer's output width (PEFT ≥ 0.22 reads ``out_features``; PEFT 0.21.2 read the
first dimension of the STORED weight, the input width of a GPT-2 Conv1D: lorakit follows the current
PEFT, which dev installs as the test oracle). With it the first step is
∝ U_r S_r V_rᵀ + c² U_{r:2r} S³_{r:2r} V_{r:2r}ᵀ, no longer the rank-2r approximation.
PEFT's svd_lowrank is unseeded; lorakit's is seeded as above.

Defaults: r and α come from the form (the official example examples/float_llama2-7b_metamath.py uses
r = 32, α = 8, rsLoRA, lr 2e-5, cosine schedule, warmup 0.03, batch 128, 1 epoch); γ = 16 (official
``stable_gamma``, PEFT's default); q = 4r, niter = 4 (official and PEFT). Calibration size: the official
default is 2 × 64 samples (bsz 2, iters 64); pass that many batches (``max_batches`` caps them).
Not implemented: the official ``norm_clip`` (clip the offset to the weight's max magnitude, for bf16)
and the non-default directions/scales (ArBr, A2rBr, random; gd, unit, weightS).
"""

from __future__ import annotations

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

VARIANTS = ("official", "peft")
SVDS = ("lowrank", "exact")


def gradient_svd(grad: torch.Tensor, r: int, svd: str = "lowrank", niter: int = 4, seed: int = 0,
                 oversample: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vᵀ) of an (out, in) gradient, at least 2r components: randomized (``torch.svd_lowrank``
    with q = min(oversample·r, min(out, in)), seeded without touching the global RNG) or exact."""
    g = grad.detach().float()
    if svd == "exact":
        return torch.linalg.svd(g, full_matrices=False)
    devices = [g.device] if g.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(g, q=min(oversample * r, min(g.shape)), niter=niter)
    return u, s, v.T


def lora_ga_factors(grad: torch.Tensor, r: int, *, variant: str = "official", gamma: float = 16.0,
                    svd: str = "lowrank", niter: int = 4, seed: int = 0,
                    m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) from the averaged gradient (out, in); see the module docstring. ``m`` overrides the
    width in the stable factor (default: out features)."""
    if variant not in VARIANTS:
        raise ValueError(f"lora_ga: variant must be one of {VARIANTS}, got {variant!r}")
    out_f, in_f = grad.shape
    if 2 * r > min(out_f, in_f):
        raise ValueError(f"lora_ga: needs 2r = {2 * r} singular vectors of a {out_f}x{in_f} gradient, which has "
                         f"only {min(out_f, in_f)}; use r <= {min(out_f, in_f) // 2} on this layer")
    u, s, vh = gradient_svd(grad, r, svd, niter, seed)
    c = (out_f if m is None else m) ** 0.25 / gamma ** 0.5
    a0 = vh[:r]
    b0 = u[:, r:2 * r]
    if variant == "official":
        return c * a0, c * b0
    return a0.clone(), c * (b0 * s[r:2 * r])


@dataclass(frozen=True)
class LoRAGAArgs:
    variant: str = "official"  # "official" code or "peft": how the factors are scaled (module docstring)
    gamma: float = 16.0  # the stable-scale γ (module docstring)
    svd: str = "lowrank"  # exact | lowrank SVD of the gradient
    niter: int = 4  # subspace iterations of the low-rank SVD
    seed: int = 0
    max_batches: int | None = None  # None: every calibration batch

    def __post_init__(self) -> None:
        check_fields("init 'lora_ga'", self, choices={"variant": VARIANTS, "svd": SVDS},
                     at_least={"niter": 0, "max_batches": 1}, positive=("gamma",))


class LoRAGAInit(Init):
    """LoRA-GA init of a factored form (ΔW = s·B·A); see the module docstring."""

    name = "lora_ga"
    caps = Cap.LOW_PRECISION_OK  # hardware: bf16/fp16; rewrites W or needs its gradient: no quantized base
    Args = LoRAGAArgs
    needs = Cap.NEEDS_DATA | Cap.NEEDS_GRAD | Cap.REWRITES_BASE
    requires = Cap.FACTORED_AB
    purpose = "sets the two trainable factors of ΔW = s·B·A from the gradient's singular vectors"

    def collect(self, model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any] | None) -> Any:
        return weight_gradients(model, layers, batches, reduce="mean", loss_fn=self.loss_fn,
                                max_batches=self.args.max_batches, desc="lora_ga gradients")

    def apply(self, form: Form, base_layer: nn.Module, stats: Any) -> None:
        if stats is None:
            raise ValueError("init 'lora_ga': no gradient for a layer (collect() not run?)")
        r = form.lora_A.shape[0]
        a0, b0 = lora_ga_factors(stats, r, variant=self.args.variant, gamma=self.args.gamma, svd=self.args.svd,
                                 niter=self.args.niter, seed=self.args.seed)
        with torch.no_grad():
            form.lora_A.copy_(a0)
            form.lora_B.copy_(b0)
