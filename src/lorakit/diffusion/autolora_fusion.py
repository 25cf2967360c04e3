"""AutoLoRA gated fusion (Li et al., "AutoLoRA: Automatic LoRA Retrieval and Fine-Grained Gated Fusion for
Text-to-Image Generation", arXiv 2508.02107; official code lzws/AutoLoRA ``train_merger.py``: LoraMergerNobase,
LoraPatcher), chained with lorakit's AutoLoRA retriever (``compose.retrieve.autolora``).

Per patched Linear with base output h = W x and the frozen LoRAs' outputs o_i = s_i·B_i A_i x (the retrieved
LoRAs plus one "global" LoRA):

    gate_i = σ( w_l ⊙ LN(o_i) + w_c ⊙ (LN(h) ⊙ LN(o_i)) + b )        (per output channel)
    y      = h + Σ_i w_out ⊙ gate_i ⊙ o_i,                           w_out initialised to 0.512,

LN without affine parameters; w_l, w_c, b (initialised 0) and w_out are per layer, shared by the LoRAs (as
the formula writes them). The timestep enters only through the activations. Only the gates train; the LoRAs
stay frozen. Objective (paper/code, flow matching there; here the DDPM ε-MSE of this testbed):
L = MSE(ε_θ(z_t¹, t, c₁), ε) + max(0, m − MSE(ε_θ(z_t¹, t, c₂), ε)), m = 0.5: LoRA-1's image is denoised
with its own prompt c₁ and must not be with LoRA-2's prompt c₂; prompts are dropped (to "") with
probability 0.3; AdamW, lr 1e-4.

The global LoRA: the official code builds it by a joint decomposition of the LoRAs
(``utils.LoRA_State_dicts_Decomposition``, absent from the repository); here it is the best rank-r
approximation of the mean ΔW of the fused LoRAs (``compose.merge.linear`` with k = r; lorakit's choice).
The fusion is a ``core.sources.DeltaSource`` inside the unified runtime (Linear layers only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.context import AdapterContext
from lorakit.core.sources import DeltaSource, add_source, remove_source, sources
from lorakit.core.state import AdapterState

KEY = "autolora_fusion"
W_OUT_INIT = 0.512  # official init of the output weight


class GatedFusion(DeltaSource):
    """The gated sum of E frozen LoRA outputs in one Linear layer (see the module docstring)."""

    def __init__(self, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], out_features: int) -> None:
        super().__init__()
        if not A or len(A) != len(B):
            raise ValueError("gated fusion needs one (A, B) pair per LoRA")
        r = max(a.shape[0] for a in A)
        pad_a = [F.pad(a.float(), (0, 0, 0, r - a.shape[0])) for a in A]
        pad_b = [F.pad(b.float(), (0, r - b.shape[1])) for b in B]
        self.register_buffer("A", torch.stack(pad_a))  # [E, r, in]  (zero-padded ranks are exact)
        self.register_buffer("B", torch.stack(pad_b))  # [E, out, r], scale folded in
        self.w_l = nn.Parameter(torch.zeros(out_features))
        self.w_c = nn.Parameter(torch.zeros(out_features))
        self.b = nn.Parameter(torch.zeros(out_features))
        self.w_out = nn.Parameter(torch.full((out_features,), W_OUT_INIT))

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """o_i = B_i A_i x for every LoRA: [..., E, out]."""
        xa = torch.einsum("...i,eri->...er", x.float(), self.A)
        return torch.einsum("...er,eor->...eo", xa, self.B)

    def gates(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        d = o.shape[-1]
        ln_o = F.layer_norm(o, (d,))
        ln_h = F.layer_norm(h.float(), (d,))[..., None, :]
        return torch.sigmoid(self.w_l * ln_o + self.w_c * (ln_h * ln_o) + self.b)

    def add_delta(self, x: torch.Tensor, out: torch.Tensor, ctx: AdapterContext | None) -> torch.Tensor:
        o = self.outputs(x)
        return out + (self.w_out * self.gates(out, o) * o).sum(-2).to(out.dtype)


def _factors(states: Sequence[AdapterState]) -> tuple[list[str], list[dict[str, Any]]]:
    from lorakit.compose.merge.parts import gather, load_inputs

    st, labels = load_inputs(list(states))
    return gather(st, labels)


def global_lora(states: Sequence[AdapterState], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """path -> (A, B) of the best rank-``rank`` approximation of the mean ΔW of ``states``."""
    from lorakit.compose.merge import merge
    from lorakit.core.factors import state_factors

    n = len(states)
    merged = merge(list(states), "linear", [1.0 / n] * n, k=rank)
    return {p: (f.A, f.B) for p, f in state_factors(merged).items()}


def install_fusion(model: nn.Module, states: Sequence[AdapterState], *, global_rank: int | None = 8,
                   key: str = KEY) -> list[nn.Parameter]:
    """Put a :class:`GatedFusion` of ``states`` (+ the global LoRA unless ``global_rank`` is None) into every
    module the LoRAs adapt; returns the gate parameters (the only trainable ones)."""
    paths, factors = _factors(states)
    extra = global_lora(states, global_rank) if global_rank else {}
    params = []
    for path in paths:
        layer = model.get_submodule(path)
        base = getattr(layer, "base_layer", layer)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"gated fusion patches Linear layers; {path} is a {type(base).__name__}")
        A = [f[path].A for f in factors] + ([extra[path][0]] if extra else [])
        B = [f[path].B for f in factors] + ([extra[path][1]] if extra else [])
        fusion = GatedFusion(A, B, base.out_features).to(base.weight.device)
        add_source(model, path, key, fusion)
        params += list(fusion.parameters())
    return params


def remove_fusion(model: nn.Module, key: str = KEY) -> None:
    for path in [p for p, _, _ in sources(model, key)]:
        remove_source(model, path, key)


def fuse_retrieved(model: nn.Module, retriever: Any, query: str, k: int = 2, **kwargs: Any) -> list[str]:
    """AutoLoRA's chain: retrieve the top-``k`` LoRAs for ``query`` and install their gated fusion; returns
    the retrieved names."""
    hits = retriever.query(query, k)
    install_fusion(model, retriever.states(hits), **kwargs)
    return [h.name for h in hits]


@dataclass(frozen=True)
class FusionLossArgs:
    margin: float = 0.5
    prompt_drop: float = 0.3


def fusion_loss(scheduler: Any, uncond: torch.Tensor, args: FusionLossArgs = FusionLossArgs()) -> Any:
    """loss_fn(model, batch) for the Trainer; batch = {"latent": LoRA-1 images' x0, "text": c₁, "other": c₂}."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        x0, c1, c2 = batch["latent"].to(device), batch["text"].to(device), batch["other"].to(device)
        n = x0.shape[0]
        drop = (torch.rand(n, device=device) < args.prompt_drop)[:, None, None]
        c1 = torch.where(drop, uncond.to(device).expand_as(c1), c1)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), device=device)
        xt = scheduler.add_noise(x0, noise, t)
        own = F.mse_loss(model(xt, t, encoder_hidden_states=c1).sample, noise)
        other = F.mse_loss(model(xt, t, encoder_hidden_states=c2).sample, noise)
        return own + torch.clamp(args.margin - other, min=0.0)

    return loss


def train_fusion(model: nn.Module, data: Sequence[Any], collate: Any, scheduler: Any, uncond: torch.Tensor, *,
                 steps: int = 400, batch_size: int = 8, lr: float = 1e-4, seed: int = 0, out_dir: str | None = None,
                 key: str = KEY, progress: bool = False, args: FusionLossArgs = FusionLossArgs(),
                 device: str = "auto") -> list[float]:
    """Train only the gates of the installed fusion ``key`` with lorakit's Trainer (AdamW, the loss above);
    ``collate`` turns items into {"latent", "text", "other"}. Returns the losses."""
    from lorakit.train.trainer import TrainConfig, Trainer

    model.requires_grad_(False)
    gates = [p for _, _, src in sources(model, key) for p in src.parameters()]
    if not gates:
        raise ValueError(f"no gated fusion {key!r} installed (install_fusion first)")
    for p in gates:
        p.requires_grad_(True)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, out_dir=out_dir, progress=progress,
                         eval_at_start=False, device=device, schedule="constant", warmup_steps=0, max_grad_norm=None)
    trainer = Trainer(model, data, collate, fusion_loss(scheduler, uncond, args), config)
    result = trainer.train(resume=out_dir is not None)
    for p in gates:
        p.requires_grad_(False)
    return result.losses
