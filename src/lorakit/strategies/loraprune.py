"""LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning (Zhang et al., Findings of
ACL 2024, arXiv 2305.18403), Sec. 3.2-3.3; official code aim-uofa/LoRAPrune (``loraprune/utils.py``).

LoRA-guided importance without gradients of the frozen W (Eq. 8-10 of the paper): the gradient of the
merged weight is estimated from the LoRA gradients alone,

    Ĝ = g_B·A + B·g_A − g_B·g_A          ( = BA − (B − g_B)(A − g_A) ),

and an element's importance is I = |Ĝ ⊙ (W + s·B·A)|. A group's importance is the sum of its
elements' importance over every module it spans; each module's group vector is L2-normalised first and
then summed over the modules that share the group (official ``compute_sensitivity(norm=True)``):
attention groups span the head rows of q/k/v and the head columns of o; MLP channels span the rows of
gate/up and the columns of down. Scores are smoothed by an EMA, s ← β·s + (1−β)·s_t with β=0.9
(``update_sensitivity_dict``; the paper's Eq. 11 writes the same moving average). Ĝ omits the scale s
as the code does; after the per-module L2 normalisation this changes nothing.

Schedule (cubic, Zhu & Gupta 2017, the code's ``schedule_sparsity_ratio``):
p(t) = p_f + (p_0 − p_f)·(1 − (t − t_w)/(T − t_w − t_c))³ for t_w ≤ t ≤ T − t_c; 0 before t_w and p_f
after, with t_w = t_c = 10% of the steps (code defaults ``warmup_iters=0.1``, ``cooldown_iters=0.1``).
Every ``prune_freq`` = 10 steps the lowest-scoring groups of each prunable layer are masked up to
p(t) (local, per-layer ranking, as the code's ``local_prune``); masked groups stay masked. Masks
multiply the outputs of q/k/v (a head's rows) and gate/up (a channel), as the code's
``result *= lora_mask``. The first 10% of the blocks and the last block are not pruned (code).
Defaults: ratio p_f = 0.5, LoRA r=8, α=16 (``script/prune.sh``).

Grouped-query attention: the unit pruned is one key/value group (one k/v head and its q heads), so
the pruned model stays a valid GQA model; with as many kv heads as q heads this is the paper's
per-head pruning (the official code hard-codes 32 heads and does not handle GQA).

At the last step (``physical=True``) the masked heads and channels are physically removed from W
and from lora_A/lora_B (``prune_groups``): the pruned model has fewer parameters and its output
equals the masked model's. Per-layer sizes then differ from ``model.config``; the pruned model runs
and its adapter is saved for it (not loadable on the unpruned base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_fields
from lorakit.core.layer import AdaptedLayer
from lorakit.strategies.base import Strategy

if TYPE_CHECKING:
    from lorakit.train.context import TrainingContext

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ROW_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # groups are output rows
COL_MODULES = ("o_proj", "down_proj")  # groups are input columns


@dataclass
class Block:
    """One transformer block's prunable parts: its attention and MLP modules and group sizes."""

    index: int
    path: str
    attn: nn.Module | None
    mlp: nn.Module | None
    head_dim: int = 0
    n_heads: int = 0
    n_kv: int = 0
    n_channels: int = 0
    keep_kv: torch.Tensor | None = field(default=None, repr=False)
    keep_ch: torch.Tensor | None = field(default=None, repr=False)

    @property
    def rep(self) -> int:
        return self.n_heads // self.n_kv if self.n_kv else 0


def base_linear(module: nn.Module) -> nn.Linear:
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def find_blocks(model: nn.Module) -> list[Block]:
    """Llama-style blocks: modules holding ``self_attn`` (q/k/v/o_proj) and/or ``mlp`` (gate/up/down_proj)."""
    blocks: list[Block] = []
    for path, m in model.named_modules():
        attn, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
        attn = attn if attn is not None and all(hasattr(attn, n) for n in ATTN) else None
        mlp = mlp if mlp is not None and all(hasattr(mlp, n) for n in MLP) else None
        if attn is None and mlp is None:
            continue
        b = Block(index=len(blocks), path=path, attn=attn, mlp=mlp)
        if attn is not None:
            b.head_dim = int(attn.head_dim)
            b.n_heads = base_linear(attn.q_proj).weight.shape[0] // b.head_dim
            b.n_kv = base_linear(attn.k_proj).weight.shape[0] // b.head_dim
        if mlp is not None:
            b.n_channels = base_linear(mlp.up_proj).weight.shape[0]
        blocks.append(b)
    if not blocks:
        raise ValueError("found no Llama-style blocks (self_attn with q/k/v/o_proj, mlp with gate/up/down_proj)")
    return blocks


def _lora_forms(module: nn.Module) -> list[Any]:
    if not isinstance(module, AdaptedLayer):
        return []
    return [f for f in module.adapters.values() if Cap.FACTORED_AB in f.caps]


def element_importance(weight: torch.Tensor, form: Any) -> torch.Tensor:
    """I = |Ĝ ⊙ (W + s·B·A)| with Ĝ = g_B·A + B·g_A − g_B·g_A (LoRAPrune Eq. 8-10); (out, in) layout."""
    A, B = form.lora_A, form.lora_B
    gA = A.grad if A.grad is not None else torch.zeros_like(A)
    gB = B.grad if B.grad is not None else torch.zeros_like(B)
    A, B, gA, gB = A.detach().float(), B.detach().float(), gA.float(), gB.float()
    g_hat = gB @ A + B @ gA - gB @ gA
    return (g_hat * (B @ A * form.scaling + weight.detach().float())).abs()


def _module_group_vector(module: nn.Module, name: str, block: Block) -> torch.Tensor | None:
    """Per-group importance of one module (None without a LoRA adapter): kv groups or MLP channels."""
    forms = _lora_forms(module)
    if not forms:
        return None
    w = base_linear(module).weight
    imp = sum(element_importance(w, f) for f in forms)
    per = imp.sum(1) if name in ROW_MODULES else imp.sum(0)  # per output row / input column
    if name in ("gate_proj", "up_proj", "down_proj"):
        return per
    if name in ("q_proj", "o_proj"):  # q heads -> their kv group
        return per.view(block.n_kv, block.rep * block.head_dim).sum(1)
    return per.view(block.n_kv, block.head_dim).sum(1)


def group_scores(block: Block, normalize: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(kv-group scores, MLP channel scores) of one block from the current LoRA gradients."""
    out: list[torch.Tensor | None] = []
    for parent, names in ((block.attn, ATTN), (block.mlp, MLP)):
        total = None
        for n in names if parent is not None else ():
            v = _module_group_vector(getattr(parent, n), n, block)
            if v is None:
                continue
            if normalize:
                v = v / v.norm().clamp_min(1e-12)
            total = v if total is None else total + v
        out.append(total)
    return out[0], out[1]


def cubic_sparsity(step: int, total: int, final: float, initial: float = 0.0, warmup: int = 0,
                   cooldown: int = 0) -> float:
    """p(t) = p_f + (p_0 − p_f)(1 − (t − t_w)/(T − t_w − t_c))³ (Zhu & Gupta 2017; LoRAPrune code)."""
    if step < warmup:
        return 0.0
    span = total - warmup - cooldown
    if span <= 0 or step >= total - cooldown:
        return final
    return final + (initial - final) * (1.0 - (step - warmup) / span) ** 3


# -- masks and physical removal ------------------------------------------------------------------
def _row_mask(block: Block, name: str) -> torch.Tensor | None:
    if name in ("gate_proj", "up_proj"):
        return None if block.keep_ch is None else _dense(block.keep_ch, block.n_channels)
    if block.keep_kv is None:
        return None
    kv = _dense(block.keep_kv, block.n_kv)
    per = block.rep * block.head_dim if name == "q_proj" else block.head_dim
    return kv.repeat_interleave(per)


def _dense(keep: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(n)
    m[keep] = 1.0
    return m


def install_masks(blocks: list[Block]) -> list[Any]:
    """Forward hooks multiplying q/k/v and gate/up outputs by the blocks' keep masks (live: read each call)."""
    handles = []
    for b in blocks:
        for parent, names in ((b.attn, ("q_proj", "k_proj", "v_proj")), (b.mlp, ("gate_proj", "up_proj"))):
            for n in names if parent is not None else ():
                def hook(_mod, _inp, out, b=b, n=n):
                    m = _row_mask(b, n)
                    return out if m is None else out * m.to(out.device, out.dtype)
                handles.append(getattr(parent, n).register_forward_hook(hook))
    return handles


def slice_linear(module: nn.Module, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (dim 0) or columns (dim 1) ``idx`` of a Linear or AdaptedLayer and its LoRA factors,
    in place (parameter objects are kept, so optimizers still hold them)."""
    lin = base_linear(module)
    idx = idx.to(lin.weight.device)
    lin.weight.data = lin.weight.data.index_select(dim, idx).contiguous()
    if dim == 0:
        if lin.bias is not None:
            lin.bias.data = lin.bias.data[idx].contiguous()
        lin.out_features = len(idx)
    else:
        lin.in_features = len(idx)
    if not isinstance(module, AdaptedLayer):
        return
    for name, form in module.adapters.items():
        if Cap.FACTORED_AB not in form.caps:
            raise NotImplementedError(f"structured pruning of adapter {name!r}: form {form.name!r} is not a "
                                      "factored B·A form")
        if dim == 0:
            form.lora_B.data = form.lora_B.data.index_select(0, idx).contiguous()
            if getattr(form, "lora_bias", None) is not None:
                form.lora_bias.data = form.lora_bias.data[idx].contiguous()
            form.out_features = len(idx)
        else:
            form.lora_A.data = form.lora_A.data.index_select(1, idx).contiguous()
            form.in_features = len(idx)


def kept_rows(block: Block, name: str) -> torch.Tensor:
    """Indices into the unpruned module's rows (q/k/v/gate/up) or columns (o/down) that are kept."""
    if name in MLP:
        return block.keep_ch if block.keep_ch is not None else torch.arange(block.n_channels)
    kv = block.keep_kv if block.keep_kv is not None else torch.arange(block.n_kv)
    per = block.rep * block.head_dim if name in ("q_proj", "o_proj") else block.head_dim
    return (kv[:, None] * per + torch.arange(per)[None, :]).reshape(-1)


def prune_groups(blocks: list[Block]) -> None:
    """Physically remove the unkept kv groups (q/k/v rows, o columns) and MLP channels (gate/up rows,
    down columns) of every block, in place. Block sizes are updated to the pruned ones."""
    for b in blocks:
        if b.attn is not None and b.keep_kv is not None and len(b.keep_kv) < b.n_kv:
            for n in ATTN:
                slice_linear(getattr(b.attn, n), kept_rows(b, n), 0 if n in ROW_MODULES else 1)
            b.n_heads, b.n_kv = len(b.keep_kv) * b.rep, len(b.keep_kv)
            for attr in ("num_heads", "num_key_value_heads"):  # older transformers read these
                if hasattr(b.attn, attr):
                    setattr(b.attn, attr, b.n_heads if attr == "num_heads" else b.n_kv)
        if b.mlp is not None and b.keep_ch is not None and len(b.keep_ch) < b.n_channels:
            for n in MLP:
                slice_linear(getattr(b.mlp, n), kept_rows(b, n), 0 if n in ROW_MODULES else 1)
            b.n_channels = len(b.keep_ch)
        b.keep_kv = b.keep_ch = None


def default_prunable(n_blocks: int) -> list[int]:
    """Blocks the official code prunes: all but the first 10% and the last."""
    return list(range(int(0.1 * n_blocks), n_blocks - 1))


def layer_list(layers: list[int] | str | None) -> list[int] | None:
    """Block indices from a list or a ``"0,1"`` / ``"0;1"`` string (None: the default prunable blocks)."""
    if isinstance(layers, str):
        return [int(x) for x in layers.replace(";", ",").split(",") if x.strip()]
    return None if layers is None else [int(x) for x in layers]


@dataclass(frozen=True)
class LoRAPruneArgs:
    ratio: float = 0.5  # final sparsity p_f of each prunable layer's groups
    prune_freq: int = 10  # steps between mask updates
    warmup_ratio: float = 0.1  # t_w as a fraction of the steps
    cooldown_ratio: float = 0.1  # t_c as a fraction of the steps
    ema: float = 0.9  # β of the score moving average
    initial_ratio: float = 0.0  # p_0
    layers: list[int] | str | None = None  # prunable blocks; None: all but the first 10% and the last
    prune_attn: bool = True
    prune_mlp: bool = True
    physical: bool = True  # remove the masked groups at the last step
    normalize: bool = True  # L2-normalise each module's group vector before summing

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"loraprune: ratio must be in [0, 1), got {self.ratio}")
        if not 0.0 <= self.initial_ratio <= self.ratio:
            raise ValueError(f"loraprune: need 0 <= initial_ratio <= ratio, got {self.initial_ratio} and {self.ratio}")
        check_fields("loraprune", self, at_least={"prune_freq": 1})


class LoRAPrune(Strategy):
    """Train LoRA while pruning heads/channels by LoRA-guided importance; remove them at the end."""

    name = "loraprune"
    caps = Cap.LOW_PRECISION_OK  # hardware: bf16/fp16; writes or trains base weights: no quantized base
    Args = LoRAPruneArgs
    requires = Cap.FACTORED_AB
    exclusive_with = frozenset({"lisa", "loram"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        a = self.args
        self.ratio, self.prune_freq, self.initial = float(a.ratio), int(a.prune_freq), float(a.initial_ratio)
        self.warmup_ratio, self.cooldown_ratio, self.ema = float(a.warmup_ratio), float(a.cooldown_ratio), float(a.ema)
        self.layers, self.prune_attn, self.prune_mlp = layer_list(a.layers), bool(a.prune_attn), bool(a.prune_mlp)
        self.physical, self.normalize = bool(a.physical), bool(a.normalize)
        self.blocks: list[Block] = []
        self.scores: dict[tuple[int, str], torch.Tensor] = {}
        self.handles: list[Any] = []
        self.total_steps = 0
        self.sparsity = 0.0
        self.pruned = False
        self._pending_keep: dict[int, tuple[Any, Any]] = {}

    def prunable(self) -> list[Block]:
        idx = self.layers if self.layers is not None else default_prunable(len(self.blocks))
        return [self.blocks[i] for i in idx]

    def attach(self, model: nn.Module, total_steps: int) -> None:
        self.blocks = find_blocks(model)
        self.total_steps = int(total_steps)
        self.handles = install_masks(self.blocks)

    def accumulate(self) -> None:
        """EMA of the group scores from the current LoRA gradients (masked groups stay at 0)."""
        for b in self.prunable():
            kv, ch = group_scores(b, self.normalize)
            for key, s, keep, n in (("kv", kv, b.keep_kv, b.n_kv), ("ch", ch, b.keep_ch, b.n_channels)):
                if s is None:
                    continue
                if keep is not None:
                    s = s * _dense(keep, n).to(s.device)
                old = self.scores.get((b.index, key))
                self.scores[(b.index, key)] = s if old is None else self.ema * old + (1 - self.ema) * s

    def update_masks(self, sparsity: float) -> None:
        """Per block, keep the top (1 − p) groups by score; masked groups never come back."""
        for b in self.prunable():
            for key, n, on in (("kv", b.n_kv, self.prune_attn), ("ch", b.n_channels, self.prune_mlp)):
                s = self.scores.get((b.index, key))
                if not on or s is None or n == 0:
                    continue
                keep_n = max(1, n - int(math.floor(sparsity * n)))
                prev = b.keep_kv if key == "kv" else b.keep_ch
                s = s.clone()
                if prev is not None:
                    s[_dense(prev, n).to(s.device) == 0] = -math.inf
                keep = torch.sort(torch.topk(s, keep_n).indices.cpu()).values
                if key == "kv":
                    b.keep_kv = keep
                else:
                    b.keep_ch = keep

    def finalize(self) -> None:
        """Remove the mask hooks and physically prune the masked groups."""
        for h in self.handles:
            h.remove()
        self.handles = []
        prune_groups(self.blocks)
        self.pruned = True

    # -- trainer hooks -----------------------------------------------------------------------
    def on_train_start(self, ctx: TrainingContext) -> None:
        self.attach(ctx.model, ctx.total_steps)
        for b in self.blocks:  # masks of a resumed run
            b.keep_kv, b.keep_ch = self._pending_keep.get(b.index, (None, None))
        if not any(_lora_forms(getattr(p, n)) for b in self.prunable()
                   for p, names in ((b.attn, ATTN), (b.mlp, MLP)) if p is not None for n in names):
            raise ValueError("strategy 'loraprune' needs a LoRA (B·A) adapter on the attention and/or MLP "
                             "projections of the pruned blocks; none found")

    def on_after_backward(self, ctx: TrainingContext, step: int) -> None:
        self.accumulate()
        T = self.total_steps
        warm, cool = int(self.warmup_ratio * T), int(self.cooldown_ratio * T)
        if step % self.prune_freq == 0 or step == T - 1:
            self.sparsity = cubic_sparsity(step, T, self.ratio, self.initial, warm, cool)
            if step == T - 1:
                self.sparsity = self.ratio
            if self.sparsity > 0:
                self.update_masks(self.sparsity)

    def on_step_end(self, ctx: TrainingContext, step: int, logs: dict[str, Any]) -> None:
        logs["loraprune_sparsity"] = self.sparsity
        if step >= self.total_steps and self.physical and not self.pruned:
            self.finalize()
            logs["loraprune_params"] = sum(p.numel() for p in ctx.model.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"scores": {f"{i}.{k}": v for (i, k), v in self.scores.items()},
                "keep": {b.index: (b.keep_kv, b.keep_ch) for b in self.blocks}, "sparsity": self.sparsity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.scores = {(int(k.split(".")[0]), k.split(".")[1]): v for k, v in state["scores"].items()}
        self._pending_keep = state["keep"]
        self.sparsity = float(state["sparsity"])
