"""LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning (Pan et al., NeurIPS 2024,
arXiv 2403.17919), Algorithm 1.

Full-parameter AdamW training (no adapter) in which, every K optimizer steps (at steps 0, K, 2K, ...),
all N_L transformer blocks are frozen and γ of them, drawn uniformly without replacement, are
unfrozen; the embedding, the final norm and the LM head (every parameter outside the blocks) are
always trained (sampling probability 1; the middle layers get γ/N_L). Defaults γ=2, K=20 (official
code OptimalScale/LMFlow ``lisa_activated_layers``/``lisa_interval_steps`` defaults; its README
example uses γ=1).

Memory: when a block is frozen its gradients are dropped and its AdamW state (exp_avg, exp_avg_sq,
step) is **released** (``optimizer.state`` entries deleted), so Adam memory is that of the active
blocks plus embedding/head/norm. A re-activated block starts with fresh moments (the paper reloads
the model each interval, so its moments also restart; LMFlow keeps stale state and never frees it —
``keep_frozen_state=True`` reproduces that, without the memory saving). Blocks switch only at
optimizer-step boundaries. Sampling uses a torch generator seeded with ``seed`` (LMFlow uses
``np.random.choice``); its state is saved with checkpoints, so resume is exact.

Blocks: the largest ``nn.ModuleList`` of same-type modules (``model.layers`` in Llama, ``h`` in GPT-2),
or the module path given as ``layers``. Adapters attached to the model (the CLI always attaches one)
are frozen and stay at their init: LISA trains the base weights; every other base parameter is
made trainable at set-up (``param_groups`` runs when the Trainer is built, so the optimizer holds all
of them; the trainer clips and checkpoints what its optimizer holds).

Output: a **full checkpoint**. At the last step the trained model is written to
``<out_dir>/full_model`` (``save_pretrained`` for a plain HF model; for a model with adapter
wrappers, the base weights under the original HF names as ``model.safetensors`` plus ``config.json``),
loadable with ``AutoModelForCausalLM.from_pretrained``. ``save_full_model(model, dir)`` does the same.
Logs ``lisa_layers`` (active block indices) and ``lisa_opt_bytes`` (optimizer-state bytes).
Not for DDP (requires_grad changes under a DistributedDataParallel wrapper).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.forms.base import Form
from lorakit.strategies.base import Strategy

if TYPE_CHECKING:
    from lorakit.train.context import TrainingContext


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the module at ``path`` or the largest ModuleList of same-type modules."""
    if path:
        blocks = model.get_submodule(path)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"lisa: {path!r} is a {type(blocks).__name__}, not a ModuleList of blocks")
        return path, blocks
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1 \
                and not isinstance(m[0], Form) and (best is None or len(m) > len(best[1])):
            best = (name, m)
    if best is None:
        raise ValueError("lisa: found no list of transformer blocks; pass layers='<path of the ModuleList>'")
    return best


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if torch.is_tensor(v))


def _is_adapter_param(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, Form) for p in m.parameters()}


def save_full_model(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the full trained model (base weights, adapter wrappers removed) loadable by HF."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter_ids = _is_adapter_param(model)
    if not adapter_ids and hasattr(model, "save_pretrained"):
        model.save_pretrained(out, safe_serialization=True)
        return out
    nonzero = [n for n, m in model.named_modules() if isinstance(m, Form)
               and float(m.delta_weight().detach().abs().max()) > 0]
    if nonzero:
        warnings.warn(f"lisa: {len(nonzero)} attached adapter module(s) have a nonzero update (e.g. {nonzero[0]}); "
                      "the full checkpoint holds the base weights only (the adapter is saved separately)",
                      stacklevel=2)
    tensors = {}
    for name, t in model.state_dict().items():
        if ".adapters." in name:
            continue
        tensors[name.replace(".base_layer.", ".")] = t.detach().to("cpu").clone().contiguous()
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    if hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        model.config.save_pretrained(out)
    return out


@dataclass(frozen=True)
class LISAArgs:
    gamma: int = 2  # γ blocks unfrozen per interval (LMFlow lisa_activated_layers)
    interval: int = 20  # K optimizer steps between re-sampling (LMFlow lisa_interval_steps)
    seed: int = 0
    layers: str | None = None  # module path of the blocks' ModuleList; None: found automatically
    keep_frozen_state: bool = False  # keep AdamW state of frozen blocks (LMFlow) instead of releasing it
    save_full: bool = True  # write <out_dir>/full_model at the last step

    def __post_init__(self) -> None:
        if int(self.gamma) < 1 or int(self.interval) < 1:
            raise ValueError(f"lisa: need gamma >= 1 and interval >= 1, got gamma={self.gamma}, "
                             f"interval={self.interval}")


class LISA(Strategy):
    name = "lisa"
    caps = Cap.LOW_PRECISION_OK  # hardware: bf16/fp16; writes or trains base weights: no quantized base
    Args = LISAArgs

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        a = self.args
        self.gamma, self.interval, self.seed = int(a.gamma), int(a.interval), int(a.seed)
        self.layers, self.keep_frozen_state, self.save_full = a.layers, bool(a.keep_frozen_state), bool(a.save_full)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.active: list[int] | None = None
        self.history: list[tuple[int, list[int]]] = []  # (step, active blocks)
        self.blocks: nn.ModuleList | None = None
        self._applied = False

    # -- sampling ----------------------------------------------------------------------------
    def sample(self, n_blocks: int) -> list[int]:
        """γ distinct block indices, uniformly without replacement, from the seeded stream."""
        if self.gamma > n_blocks:
            raise ValueError(f"lisa: gamma={self.gamma} exceeds the number of blocks ({n_blocks})")
        return sorted(torch.randperm(n_blocks, generator=self.generator)[: self.gamma].tolist())

    # -- set-up ------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        """Make every base parameter trainable (adapters frozen) and give them all to the optimizer."""
        _, self.blocks = find_blocks(model, self.layers)
        adapter_ids = _is_adapter_param(model)
        if any(p.requires_grad for p in model.parameters() if id(p) in adapter_ids):
            warnings.warn("lisa trains the base model's weights (full-parameter); the attached adapter is frozen "
                          "at its init", stacklevel=2)
        base = []
        for p in model.parameters():
            p.requires_grad_(id(p) not in adapter_ids)
            if id(p) not in adapter_ids:
                base.append(p)
        return [{"params": base}]  # weight decay: set from the trainer's config in on_train_start

    def _apply(self, ctx: TrainingContext) -> None:
        assert self.blocks is not None and self.active is not None
        frozen = [p for i, b in enumerate(self.blocks) if i not in self.active for p in b.parameters()]
        for i, b in enumerate(self.blocks):
            for p in b.parameters():
                p.requires_grad_(i in self.active)
        for p in frozen:
            p.grad = None
        if not self.keep_frozen_state:
            ctx.drop_optimizer_state(frozen)
        self._applied = True

    # -- hooks -------------------------------------------------------------------------------
    def on_train_start(self, ctx: TrainingContext) -> None:
        if self.blocks is None:
            _, self.blocks = find_blocks(ctx.model, self.layers)
        if self.gamma > len(self.blocks):
            raise ValueError(f"lisa: gamma={self.gamma} exceeds the number of blocks ({len(self.blocks)})")
        for group in ctx.param_groups:
            group["weight_decay"] = ctx.config.weight_decay

    def on_step_start(self, ctx: TrainingContext, step: int) -> None:
        if step % self.interval == 0 or self.active is None:
            self.active = self.sample(len(self.blocks))
            self.history.append((step, list(self.active)))
            self._applied = False
        if not self._applied:
            self._apply(ctx)

    def on_step_end(self, ctx: TrainingContext, step: int, logs: dict[str, Any]) -> None:
        logs["lisa_layers"] = list(self.active or [])
        logs["lisa_opt_bytes"] = optimizer_state_bytes(ctx.optimizer)
        if self.save_full and step == ctx.total_steps and ctx.out_dir is not None and ctx.is_main:
            save_full_model(ctx.model, ctx.out_dir / "full_model")

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self.generator.get_state(), "active": self.active,
                "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if int(state["seed"]) != self.seed:
            raise ValueError(f"lisa: checkpoint was written with seed {state['seed']}, this run uses {self.seed}")
        self.generator.set_state(state["generator"])
        self.active = state["active"]
        self.history = [tuple(h) for h in state["history"]]
        self._applied = False
