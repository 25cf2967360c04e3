"""DyLoRA rank sampling (Valipour et al., EACL 2023, arXiv 2210.07558, Sec. 3 / Algorithm 1).

Each optimizer step draws one rank b ~ Uniform{r_min..r_max} and trains every rank-mutable module of
the model at that b (one rank model-wide, as the official code's ``model.set_rank(randint(...))``;
the kohya-style per-module draw is not this method). A module whose own r_max is smaller than b runs
at its r_max. The draw comes from a seeded generator whose state is part of ``state_dict``, so a
resumed run draws the same ranks as an uninterrupted one. Between steps (evaluation, checkpoints,
after training) every module is back at the rank it had before the step: its serving rank.

Modules are found by capability (``Cap.NESTED_RANKS`` forms: ``set_rank``), never by name.
``frozen`` (None: each form's own setting) switches the paper's "only the b-th component trains" rule.
The sampled rank is logged as ``dylora_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.forms.base import Form
from lorakit.strategies.base import Strategy

if TYPE_CHECKING:
    from lorakit.train.context import TrainingContext


def rank_mutable_forms(model: nn.Module) -> list[Form]:
    """Every form in ``model`` that can serve at a chosen rank: ``Cap.NESTED_RANKS`` forms
    (``set_rank(rank, frozen=None)``, ``rank`` and ``r_max``)."""
    return [m for m in model.modules()
            if isinstance(m, Form) and Cap.NESTED_RANKS in m.caps]


@dataclass(frozen=True)
class DyLoRAArgs:
    seed: int = 0
    r_min: int = 1  # b ~ U{r_min..r_max}
    r_max: int | None = None  # None: the largest r_max of the model's rank-mutable forms
    frozen: bool | None = None  # only the b-th component trains; None: each form's own setting

    def __post_init__(self) -> None:
        if self.r_min < 1 or (self.r_max is not None and self.r_max < self.r_min):
            raise ValueError(f"dylora strategy: need 1 <= r_min <= r_max, got r_min={self.r_min}, "
                             f"r_max={self.r_max}")


class DyLoRARankSampling(Strategy):
    name = "dylora"
    caps = Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    Args = DyLoRAArgs
    requires = Cap.NESTED_RANKS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        a = self.args
        self.seed, self.r_min, self.r_max, self.frozen = int(a.seed), int(a.r_min), a.r_max, a.frozen
        self.generator = torch.Generator().manual_seed(self.seed)
        self.draws = 0
        self.last_rank: int | None = None
        self._saved: list[tuple[Any, int, bool | None]] = []

    def _forms(self, model: nn.Module) -> list[Any]:
        forms = rank_mutable_forms(model)
        if not forms:
            raise ValueError("strategy 'dylora' needs a rank-mutable form (e.g. form 'dylora'); "
                             "the model has none")
        return forms

    def sample(self, r_max: int) -> int:
        """The next rank of the seeded stream, in r_min..r_max."""
        hi = self.r_max if self.r_max is not None else r_max
        if hi < self.r_min:
            raise ValueError(f"dylora strategy: r_min={self.r_min} exceeds the largest rank {hi}")
        b = int(torch.randint(self.r_min, hi + 1, (1,), generator=self.generator).item())
        self.draws += 1
        self.last_rank = b
        return b

    def set_step_rank(self, model: nn.Module) -> int:
        """Draw b, remember each module's serving rank, and put every module at b."""
        forms = self._forms(model)
        b = self.sample(max(f.r_max for f in forms))
        self._saved = [(f, f.rank, getattr(f, "frozen_mode", None)) for f in forms]
        for f in forms:
            f.set_rank(min(b, f.r_max), frozen=self.frozen)
        return b

    def restore(self) -> None:
        """Put every module back at its serving rank (and its own frozen setting)."""
        for f, rank, frozen in self._saved:
            f.set_rank(rank, frozen=frozen)
        self._saved = []

    # -- trainer hooks -----------------------------------------------------------------------
    def on_train_start(self, ctx: TrainingContext) -> None:
        self._forms(ctx.model)  # fail before the first step, with a clear message

    def on_step_start(self, ctx: TrainingContext, step: int) -> None:
        self.set_step_rank(ctx.model)

    def on_step_end(self, ctx: TrainingContext, step: int, logs: dict[str, Any]) -> None:
        self.restore()
        logs["dylora_rank"] = self.last_rank

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "draws": self.draws, "generator": self.generator.get_state(),
                "last_rank": self.last_rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if int(state["seed"]) != self.seed:
            raise ValueError(f"dylora strategy: checkpoint was written with seed {state['seed']}, "
                             f"this run uses seed {self.seed}")
        self.generator.set_state(state["generator"])
        self.draws = int(state["draws"])
        self.last_rank = state.get("last_rank")
