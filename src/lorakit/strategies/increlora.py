"""IncreLoRA rank growth (Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning", arXiv 2308.12043, Sec. 3 / Algorithm 1; official code
FeiyuZhang98/IncreLoRA ``loralib/increlora.py::RankAllocator, compute_orth_regu`` and
``NLU/src/transformers/optimization.py::Multi_LambdaLR``). Use with form ``increlora``.

- **Importance** (Eq. 5-7): per module S = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW) (a gradient hook on the
  materialized ΔW, summed over the micro-batches of a step; the code keeps the last one, the same at
  grad_accum=1), smoothed Ī ← β₁Ī + (1−β₁)S, Ū ← β₂Ū + (1−β₂)|S − Ī|, score = Ī·Ū; β₁ = β₂ = 0.85.
- **Schedule**: after each optimizer step t (1-based) with t > ``init_warmup`` and t % ``interval`` == 0,
  while the total rank is below the budget (``target_rank`` × #modules, or ``target_total_rank``),
  the k = min(top_h, ⌈remaining/add_r⌉) highest-scoring modules grow by add_r (form ``grow()``: the
  reserve's e becomes trainable and a fresh reserve is appended). The code takes every module whose
  score reaches the k-th score (ties may add more) and uses min(top_h, remaining) — the same at
  add_r = 1; here exactly k modules are taken, so the budget is never exceeded.
- **New optimizer groups**: each growth's new tensors (the new e's and the new reserves' a, b) go into a
  new AdamW param group with the trainer's lr and weight decay and their own schedule (the code's
  "restart warmup"): linear warmup over ``group_warmup`` steps (default: the trainer's warmup steps)
  from the growth step, then linear decay to 0 at the last step.
- **Budget met**: tracking stops (ΔW is no longer materialized) and every reserve e is set to 0, as
  the code.
- **Loss** (Eq. 8): L + ``orth_reg`` · mean over tensors of ‖AAᵀ − I‖_F (each A chunk) and ‖BᵀB − I‖_F
  (each B chunk), reserves included, as ``compute_orth_regu`` (0.1). The code's chunks are single
  rank-1 vectors, so it only normalises each vector (METHODS.md pitfall); here chunks are the
  growth units (add_r ranks, r for the first), which equals the code at r = add_r = 1.
- **Saved spec**: after a growth each module's ``growths`` is recorded in the adapter spec
  (exact-path ``module_args``), so ``lorakit.save``/``load`` rebuild the grown shapes exactly.
- **Rank trajectory**: logged as ``increlora_total_rank``; at the last step ``increlora_ranks.png``
  (rank per module against the step) and ``increlora_ranks.json`` are written to the run dir.

Defaults from the NLU scripts (DeBERTaV3-base, CoLA): target_rank 2, top_h 2, init_warmup = interval
= 100, β 0.85, orth_reg 0.1.

**Resume**: the checkpoint's strategy state records each growth (step, modules, warmup); on resume
``restore_structure`` replays them on the freshly built model (same spec as the run's start) before the
trainer loads the tensors, optimizer and scheduler state, so a killed run resumes bit-identically even
after growths (tests/strategies/test_increlora_resume.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.strategies.base import Strategy

if TYPE_CHECKING:
    from lorakit.train.context import TrainingContext


def growable_forms(model: nn.Module) -> dict[tuple[str, str], Any]:
    """(module path, adapter name) -> form, for forms that can grow (``Cap.RANK_GROWTH``: ``grow``
    and importance tracking)."""
    from lorakit.core.inject import adapted_layers

    out = {}
    for path, layer in adapted_layers(model):
        for name, form in layer.adapters.items():
            if Cap.RANK_GROWTH in form.caps:
                out[(path, name)] = form
    return out


class RestartWarmup:
    """LR multiplier of a group created at step ``start``: linear warmup over ``warmup`` steps, then
    linear decay to 0 at ``total`` (the official ``Multi_LambdaLR`` per-group schedule)."""

    def __init__(self, start: int, warmup: int, total: int) -> None:
        self.start, self.warmup, self.total = start, warmup, total

    def __call__(self, step: int) -> float:
        local = step - self.start
        if self.warmup > 0 and local < self.warmup:
            return (local + 1) / self.warmup
        return max(0.0, (self.total - step) / max(1, self.total - self.start - self.warmup))


@dataclass(frozen=True)
class IncreLoRAArgs:
    target_rank: float = 2  # average final rank per module (the budget, unless target_total_rank)
    target_total_rank: int | None = None  # total rank budget over all modules
    top_h: int = 2  # modules grown per allocation
    init_warmup: int = 100  # steps before the first allocation
    interval: int = 100  # steps between allocations
    beta1: float = 0.85  # EMA of the importance score
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg: float = 0.1  # weight of the orthogonality regularizer
    group_warmup: int | None = None  # LR warmup of the optimizer group of new ranks
    plot: bool = True  # write increlora_ranks.png

    def __post_init__(self) -> None:
        if int(self.top_h) < 1 or int(self.interval) < 1 or int(self.init_warmup) < 0:
            raise ValueError("increlora: need top_h >= 1, interval >= 1, init_warmup >= 0")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"increlora: betas must be in (0, 1), got {self.beta1}, {self.beta2}")


class IncreLoRARankGrowth(Strategy):
    name = "increlora"
    caps = Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    Args = IncreLoRAArgs
    requires = Cap.RANK_GROWTH
    exclusive_with = frozenset({"dylora"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        a = self.args
        self.target_rank, self.target_total_rank = float(a.target_rank), a.target_total_rank
        self.top_h, self.init_warmup, self.interval = int(a.top_h), int(a.init_warmup), int(a.interval)
        self.beta1, self.beta2, self.orth_reg = float(a.beta1), float(a.beta2), float(a.orth_reg)
        self.group_warmup, self.plot = a.group_warmup, bool(a.plot)
        self.forms: dict[tuple[str, str], Any] = {}
        self.ipt: dict[str, float] = {}
        self.unc: dict[str, float] = {}
        self.budget = 0
        self.done = False
        self.groups: list[dict[str, Any]] = []  # added optimizer groups: start step, base lr
        self.history: list[dict[str, Any]] = []  # {"step", "ranks": {module: rank}, "grown": [...]}
        self.last_scores: dict[str, float] = {}

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _key(path: str, name: str) -> str:
        return path if name == "default" else f"{name}:{path}"

    def ranks(self) -> dict[str, int]:
        return {self._key(*k): f.rank for k, f in self.forms.items()}

    def total_rank(self) -> int:
        return sum(f.rank for f in self.forms.values())

    def scores(self) -> dict[str, float]:
        return {k: self.ipt.get(k, 0.0) * self.unc.get(k, 0.0) for k in self.ranks()}

    def _track(self, on: bool) -> None:
        for f in self.forms.values():
            f.track_importance = on

    # -- hooks -------------------------------------------------------------------------------
    def on_train_start(self, ctx: TrainingContext) -> None:
        self.forms = growable_forms(ctx.model)
        if not self.forms:
            raise ValueError("strategy 'increlora' needs an adapter of form 'increlora' (a growable "
                             "RANK_GROWTH form); the model has none")
        add = {f.args.add_r for f in self.forms.values()}
        self.budget = int(self.target_total_rank if self.target_total_rank is not None
                          else round(self.target_rank * len(self.forms)))
        if self.budget < self.total_rank():
            raise ValueError(f"increlora: budget {self.budget} is below the current total rank {self.total_rank()}")
        self.add_r = max(add)
        self.done = self.total_rank() >= self.budget
        self._track(not self.done)
        if not self.history:
            self.history.append({"step": ctx.step, "ranks": self.ranks(), "grown": []})

    def on_step_start(self, ctx: TrainingContext, step: int) -> None:
        for f in self.forms.values():
            f.importance = 0.0

    def orth_penalty(self) -> torch.Tensor:
        terms = []
        for f in self.forms.values():
            for name, p in f.named_parameters():
                if not p.requires_grad or not name.startswith(("lora_A", "lora_B")):
                    continue
                cov = p @ p.T if name.startswith("lora_A") else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device,
                                                                      dtype=cov.dtype)))
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def on_loss(self, ctx: TrainingContext, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        return loss + self.orth_reg * self.orth_penalty() if self.orth_reg else loss

    def on_step_end(self, ctx: TrainingContext, step: int, logs: dict[str, Any]) -> None:
        if not self.done:
            for (path, name), f in self.forms.items():
                k = self._key(path, name)
                s = f.importance
                self.ipt[k] = self.beta1 * self.ipt.get(k, 0.0) + (1 - self.beta1) * s
                self.unc[k] = self.beta2 * self.unc.get(k, 0.0) + (1 - self.beta2) * abs(s - self.ipt[k])
            if step > self.init_warmup and step % self.interval == 0:
                self.grow(ctx, step)
        logs["increlora_total_rank"] = self.total_rank()
        if step == ctx.total_steps:
            self._track(False)  # serve with the factored path
            if ctx.out_dir is not None and ctx.is_main:
                self.write_trajectory(ctx.out_dir)

    def grow(self, ctx: TrainingContext, step: int) -> list[str]:
        """One allocation round: grow the top-k modules by add_r and give the new tensors a new group."""
        scores = self.scores()
        self.last_scores = dict(scores)
        remaining = self.budget - self.total_rank()
        k = min(self.top_h, math.ceil(remaining / self.add_r))
        chosen = sorted(scores, key=lambda m: (-scores[m], m))[:k]
        grown, total = [], self.total_rank()
        for (path, name), f in self.forms.items():
            if self._key(path, name) in chosen and total + f.args.add_r <= self.budget:
                grown.append(self._key(path, name))
                total += f.args.add_r
        warmup = ctx.config.warmup if self.group_warmup is None else int(self.group_warmup)
        self._grow_modules(ctx, step, grown, warmup)
        if self.total_rank() >= self.budget:
            self._finish()
        self.history.append({"step": step, "ranks": self.ranks(), "grown": chosen})
        return chosen

    def _grow_modules(self, ctx: TrainingContext, step: int, keys: list[str], warmup: int) -> None:
        """Grow the modules ``keys`` (in ``self.forms`` order), record their growths in the adapter spec and
        put the new tensors in a new optimizer group with its own schedule. Deterministic in ``keys`` and
        ``step``: a resume replays it to rebuild the same tensors and groups."""
        from lorakit.core.inject import specs

        new_params: list[nn.Parameter] = []
        for (path, name), f in self.forms.items():
            if self._key(path, name) not in keys:
                continue
            new_params += f.grow()
            spec = specs(ctx.model)[name]
            spec.module_args[re.escape(path)] = {**spec.module_args.get(re.escape(path), {}),
                                                  "growths": f.args.growths}
        if not new_params:
            return
        c = ctx.config
        sched = RestartWarmup(step, warmup, ctx.total_steps)
        # the group's lr at `step` is c.lr · sched(step); the trainer's scheduler drives it from then on
        index = ctx.add_param_group({"params": new_params, "weight_decay": c.weight_decay}, lr_lambda=sched)
        self.groups.append({"index": index, "start": step, "base_lr": c.lr, "warmup": warmup,
                            "modules": list(keys)})

    def _finish(self) -> None:
        """Budget met: stop tracking, switch every reserve off (e = 0), as the official code."""
        self.done = True
        self._track(False)
        with torch.no_grad():
            for f in self.forms.values():
                f.lora_E_res.zero_()

    def write_trajectory(self, out_dir: Path) -> Path:
        """increlora_ranks.json and increlora_ranks.png (rank of each module against the step)."""
        from lorakit.core import atomic

        out_dir = Path(out_dir)
        atomic.write_json(out_dir / "increlora_ranks.json", {"budget": self.budget, "history": self.history})
        if not self.plot:
            return out_dir / "increlora_ranks.json"
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [h["step"] for h in self.history]
        for m in self.history[0]["ranks"]:
            ax.step(steps, [h["ranks"][m] for h in self.history], where="post", label=m, lw=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("rank")
        ax.set_title(f"IncreLoRA rank trajectory (budget {self.budget})")
        if len(self.history[0]["ranks"]) <= 12:
            ax.legend(fontsize=6, loc="upper left")
        fig.tight_layout()
        path = out_dir / "increlora_ranks.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"ipt": self.ipt, "unc": self.unc, "history": self.history, "groups": self.groups,
                "done": self.done, "last_scores": self.last_scores}

    def restore_structure(self, ctx: TrainingContext, state: dict[str, Any]) -> None:
        """Replay the saved growths on the freshly built model (whose adapter has the run's initial spec):
        the same tensors grow in the same order and the same optimizer groups and scheduler lambdas are
        added, so the checkpoint's tensors, optimizer and scheduler state load into matching structure."""
        if not state:
            return
        if state.get("grown") and "groups" not in state:
            raise ValueError("increlora: this checkpoint was written by an older lorakit that did not record its "
                             "growths; restart the run or resume from a checkpoint written before any growth")
        self.forms = growable_forms(ctx.model)
        if self.groups:
            raise ValueError("increlora: restore_structure called on a strategy that has already grown ranks")
        for g in state.get("groups", []):
            unknown = set(g["modules"]) - {self._key(*k) for k in self.forms}
            if unknown:
                raise ValueError(f"increlora: the checkpoint grew modules the model lacks: {sorted(unknown)[:3]}")
            self._grow_modules(ctx, int(g["start"]), list(g["modules"]), int(g["warmup"]))
            if self.groups[-1]["index"] != g["index"]:
                raise ValueError(f"increlora: the replayed growth at step {g['start']} made optimizer group "
                                 f"{self.groups[-1]['index']}, the checkpoint's was {g['index']}; resume with the "
                                 "same strategies in the same order")
        if state.get("done"):
            self._finish()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.ipt, self.unc, self.history = dict(state["ipt"]), dict(state["unc"]), list(state["history"])
        self.last_scores = dict(state.get("last_scores", {}))
