"""LoRAM: Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language Models (Zhang et al.,
ICLR 2025, arXiv 2502.13533), Sec. 3 (Eq. 4-7); official code junzhang-zj/LoRAM.

Pipeline: (1) prune the base W₀ to W₀ᴾ = W₀ ∘ Mᴾ (structured: whole attention heads / kv groups and MLP
intermediate channels); (2) optionally align Wᴾ by a short full-rank continual pre-training (publisher
side; ``align``); (3) train LoRA B·A on the pruned model; (4) recover the full-size adapter
(Eq. 6): B·A are scattered back into the original shapes with the pruned positions set to zero, so
ΔW = s·B*·A* equals the trained pruned ΔW on kept coordinates and is 0 on pruned ones — rows of
lora_B for q/k/v/gate/up, columns of lora_A for o/down (the code's ``zeroA``; ``fill='norm'`` fills
pruned lora_A columns with N(0, 1/r), the code's ``normA`` variant); (5) infer with W₀ + ΔW* on the
ORIGINAL model. The recovered adapter is a plain LoRA adapter (PEFT loads it).

Pruning: the paper's LoRAM-Stru uses LLM-Pruner's structured masks; here ``method='magnitude'`` ranks
groups by the ℓ2 norm of their weights (each module's group vector normalised, then summed; a simple
structured criterion) and ``method='random'`` is the paper's LoRAM-Rand. ``loraprune`` importance can
be used by passing ``keep`` computed with :mod:`lorakit.strategies.loraprune`. Units and physical
removal are shared with LoRAPrune (kv groups, so grouped-query attention stays valid; MLP channels).
Defaults: ratio 0.5 (the paper's CPU-scale experiment in METHODS.md; LLaMA-3.1-70B uses 0.85), layers:
all but the first 10% and the last block (LoRAPrune code convention; the 70B run prunes layers 4..77
of 80), LoRA r=8, α=16 (paper's training settings).

As a strategy: at train start the model (with its LoRA adapter) is pruned in place and the removed
weights are kept on CPU; LoRA trains on the small model; at the last step the base weights are
restored and the adapter recovered, so evaluation after training (and ``lorakit.save``) sees the
original model plus the recovered adapter. ``recovered_adapter/`` is written to the run directory.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_fields
from lorakit.core.layer import AdaptedLayer
from lorakit.strategies.base import Strategy
from lorakit.strategies.loraprune import (
    ATTN,
    MLP,
    ROW_MODULES,
    Block,
    base_linear,
    default_prunable,
    find_blocks,
    kept_rows,
    layer_list,
    prune_groups,
)

if TYPE_CHECKING:
    from lorakit.train.context import TrainingContext

Keep = dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]  # block index -> (kv groups, channels)
IndexMap = dict[str, tuple[int, torch.Tensor, int]]  # module path -> (dim, kept indices, full size)


def structured_keep(model: nn.Module, ratio: float = 0.5, layers: Sequence[int] | None = None,
                    method: str = "magnitude", attn: bool = True, mlp: bool = True, seed: int = 0) -> Keep:
    """Which kv groups and MLP channels each pruned block keeps (sorted indices)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"loram: ratio must be in [0, 1), got {ratio}")
    if method not in ("magnitude", "random"):
        raise ValueError(f"loram: unknown pruning method {method!r}; known: magnitude, random")
    blocks = find_blocks(model)
    idx = list(layers) if layers is not None else default_prunable(len(blocks))
    g = torch.Generator().manual_seed(seed)
    keep: Keep = {}
    for i in idx:
        b = blocks[i]
        out: list[torch.Tensor | None] = []
        for parent, names, n, on in ((b.attn, ATTN, b.n_kv, attn), (b.mlp, MLP, b.n_channels, mlp)):
            if parent is None or not on or n == 0:
                out.append(None)
                continue
            k = max(1, n - int(math.floor(ratio * n)))
            if method == "random":
                out.append(torch.sort(torch.randperm(n, generator=g)[:k]).values)
                continue
            score = torch.zeros(n)
            for name in names:
                w = base_linear(getattr(parent, name)).weight.detach().float().cpu()
                per = (w.pow(2).sum(1) if name in ROW_MODULES else w.pow(2).sum(0))
                per = per.view(n, -1).sum(1).sqrt()
                score += per / per.norm().clamp_min(1e-12)
            out.append(torch.sort(torch.topk(score, k).indices).values)
        keep[i] = (out[0], out[1])
    return keep


def index_map(blocks: list[Block], keep: Keep) -> IndexMap:
    """For every pruned module, which rows (q/k/v/gate/up) or columns (o/down) survive: the index file
    recovery needs (sorted positions in the original module)."""
    out: IndexMap = {}
    for b in blocks:
        kv, ch = keep.get(b.index, (None, None))
        b.keep_kv, b.keep_ch = kv, ch
        for parent, names, k, n in ((b.attn, ATTN, kv, b.n_kv), (b.mlp, MLP, ch, b.n_channels)):
            if parent is None or k is None or len(k) == n:
                continue
            for name in names:
                module = getattr(parent, name)
                path = f"{b.path}.{'self_attn' if name in ATTN else 'mlp'}.{name}"
                dim = 0 if name in ROW_MODULES else 1
                out[path] = (dim, kept_rows(b, name), base_linear(module).weight.shape[dim])
    return out


def prune_model(model: nn.Module, keep: Keep) -> IndexMap:
    """Physically prune ``model`` in place (base weights and any LoRA factors); returns the index map."""
    blocks = find_blocks(model)
    imap = index_map(blocks, keep)
    prune_groups(blocks)
    return imap


def recover_factors(A: torch.Tensor, B: torch.Tensor, dim: int, idx: torch.Tensor, full: int,
                    fill: str = "zero", generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter pruned factors back to full size (LoRAM Eq. 6): B rows (dim 0) or A columns (dim 1)."""
    idx = idx.to(A.device)
    if dim == 0:
        Bf = B.new_zeros(full, B.shape[1])
        Bf[idx] = B
        return A.clone(), Bf
    if fill == "norm":
        r = A.shape[0]
        Af = torch.randn(r, full, generator=generator).to(A) / math.sqrt(r)
    elif fill == "zero":
        Af = A.new_zeros(A.shape[0], full)
    else:
        raise ValueError(f"loram: fill must be 'zero' or 'norm', got {fill!r}")
    Af[:, idx] = A
    return Af, B.clone()


def recover(pruned: nn.Module, original: nn.Module, imap: IndexMap, name: str = "default", *,
            fill: str = "zero", seed: int = 0) -> nn.Module:
    """Attach adapter ``name`` of ``pruned`` to ``original`` (in place) as the full-size recovered adapter."""
    import lorakit
    from lorakit.core.inject import adapter_modules, specs

    spec = copy.deepcopy(specs(pruned)[name])
    forms = adapter_modules(pruned, name)
    bad = [p for p, f in forms.items() if Cap.FACTORED_AB not in f.caps]
    if bad:
        raise ValueError(f"loram: recovery needs a factored B·A adapter; {bad[:3]} are not")
    spec.targets = sorted(forms)  # full module paths match exactly
    spec.init, spec.init_args = "default", {}
    lorakit.attach(original, spec, name, trainable=False)
    g = torch.Generator().manual_seed(seed)
    full_forms = adapter_modules(original, name)
    with torch.no_grad():
        for path, f in forms.items():
            A, B = f.lora_A.detach(), f.lora_B.detach()
            if path in imap:
                dim, idx, full = imap[path]
                A, B = recover_factors(A, B, dim, idx, full, fill, g)
            full_forms[path].lora_A.copy_(A)
            full_forms[path].lora_B.copy_(B)
            if getattr(f, "lora_bias", None) is not None:
                bias = f.lora_bias.detach()
                if path in imap and imap[path][0] == 0:
                    dim, idx, full = imap[path]
                    bias = bias.new_zeros(full).index_copy(0, idx.to(bias.device), bias)
                full_forms[path].lora_bias.copy_(bias)
    return original


def align(model: nn.Module, batches: Sequence[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor], *,
          steps: int = 100, lr: float = 5e-5, freeze_head: bool = True) -> list[float]:
    """LoRAM's optional alignment: full-rank continual pre-training of the pruned model (lm_head frozen;
    paper: lr 5e-5, 1 epoch). Trains every base parameter except the output head; returns the losses."""
    head = model.get_output_embeddings() if freeze_head and hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    adapter_ids = {id(p) for m in model.modules() if isinstance(m, AdaptedLayer)
                   for p in m.adapters.parameters()}
    params = [p for p in model.parameters() if id(p) not in head_ids and id(p) not in adapter_ids]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    model.train()
    try:
        for step in range(steps):
            loss = loss_fn(model, batches[step % len(batches)])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return losses


@dataclass(frozen=True)
class LoRAMArgs:
    ratio: float = 0.5  # fraction of the prunable heads/channels removed
    method: str = "magnitude"  # magnitude (ℓ2 of the groups) | random (LoRAM-Rand)
    layers: list[int] | str | None = None  # prunable blocks; None: all but the first 10% and the last
    prune_attn: bool = True
    prune_mlp: bool = True
    fill: str = "zero"  # pruned lora_A columns at recovery: zero (zeroA) | norm (normA, N(0, 1/r))
    seed: int = 0
    adapter: str = "default"

    def __post_init__(self) -> None:
        check_fields("loram", self, choices={"fill": ("zero", "norm")})


class LoRAM(Strategy):
    """Train the adapter on a structurally pruned copy; recover a full-size adapter at the end."""

    name = "loram"
    caps = Cap.LOW_PRECISION_OK  # hardware: bf16/fp16; writes or trains base weights: no quantized base
    resumable = False  # the pruned model is built from the full one at step 0 (not saved per checkpoint)
    Args = LoRAMArgs
    requires = Cap.FACTORED_AB
    exclusive_with = frozenset({"lisa", "loraprune"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        a = self.args
        self.ratio, self.method, self.fill, self.seed = float(a.ratio), a.method, a.fill, int(a.seed)
        self.layers = layer_list(a.layers)
        self.prune_attn, self.prune_mlp, self.adapter = bool(a.prune_attn), bool(a.prune_mlp), a.adapter
        self.imap: IndexMap = {}
        self.saved: dict[str, torch.Tensor] = {}
        self.params_full = self.params_pruned = 0
        self.recovered = False

    def on_train_start(self, ctx: TrainingContext) -> None:
        model = ctx.model
        if ctx.step > 0:
            raise ValueError("strategy 'loram' cannot resume a run (the pruned model is built at step 0)")
        keep = structured_keep(model, self.ratio, self.layers, self.method, self.prune_attn, self.prune_mlp,
                               self.seed)
        self.params_full = sum(p.numel() for p in model.parameters())
        blocks = find_blocks(model)
        imap = index_map(blocks, keep)
        for path in imap:  # the publisher keeps W₀; here: a CPU copy of each pruned module's weight
            lin = base_linear(model.get_submodule(path))
            self.saved[path] = lin.weight.detach().cpu().clone()
            if lin.bias is not None:
                self.saved[path + ".bias"] = lin.bias.detach().cpu().clone()
        prune_groups(blocks)
        self.imap = imap
        self.params_pruned = sum(p.numel() for p in model.parameters())

    def recover_in_place(self, model: nn.Module) -> None:
        """Restore the original base weights and scatter every LoRA adapter to full size."""
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for path, (dim, idx, full) in self.imap.items():
                module = model.get_submodule(path)
                lin = base_linear(module)
                lin.weight.data = self.saved[path].to(lin.weight.device, lin.weight.dtype)
                if path + ".bias" in self.saved:
                    lin.bias.data = self.saved[path + ".bias"].to(lin.bias.device, lin.bias.dtype)
                if dim == 0:
                    lin.out_features = full
                else:
                    lin.in_features = full
                for form in (module.adapters.values() if isinstance(module, AdaptedLayer) else ()):
                    A, B = recover_factors(form.lora_A.data, form.lora_B.data, dim, idx, full, self.fill, g)
                    form.lora_A.data, form.lora_B.data = A, B
                    if dim == 0 and getattr(form, "lora_bias", None) is not None:
                        b = form.lora_bias.data
                        form.lora_bias.data = b.new_zeros(full).index_copy(0, idx.to(b.device), b)
                    if dim == 0:
                        form.out_features = full
                    else:
                        form.in_features = full
        for b in find_blocks(model):  # attention head counts of older transformers
            if b.attn is not None:
                for attr, n in (("num_heads", b.n_heads), ("num_key_value_heads", b.n_kv)):
                    if hasattr(b.attn, attr):
                        setattr(b.attn, attr, n)
        self.saved = {}
        self.recovered = True

    def on_step_end(self, ctx: TrainingContext, step: int, logs: dict[str, Any]) -> None:
        if step < ctx.total_steps or self.recovered:
            return
        logs["loram_params_pruned"], logs["loram_params_full"] = self.params_pruned, self.params_full
        self.recover_in_place(ctx.model)
        if ctx.out_dir is not None and ctx.is_main:
            import lorakit

            lorakit.save(ctx.model, ctx.out_dir / "recovered_adapter", name=self.adapter)
