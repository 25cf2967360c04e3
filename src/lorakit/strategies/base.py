"""The Strategy hook interface the trainer calls; every hook is optional and strategies stack."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.spec import NoArgs, build_args

if TYPE_CHECKING:
    from lorakit.train.context import TrainingContext


class Strategy:
    """Base class: a no-op at every hook.

    Order per optimizer step: ``on_step_start`` → (forward, ``on_loss``, backward) × accumulation →
    ``on_after_backward`` → gradient clipping → ``on_before_optimizer_step`` → optimizer and
    scheduler step → ``on_step_end``. ``param_groups`` and ``wrap_optimizer`` run once at set-up.
    Hooks receive a ``TrainingContext`` (``lorakit.train.context``): the model, optimizer and param groups,
    step and total steps, config, run dir, and the only changes a strategy makes to the run
    (``add_param_group`` with its lr multiplier, ``drop_optimizer_state``, ``log``), never the Trainer.
    ``requires`` lists form capabilities the strategy relies on and ``excludes`` those it cannot work with
    (e.g. a frozen A); ``exclusive_with`` names strategies it cannot be stacked with (checked before
    training starts). ``resumable = False`` declares that a run cannot resume from a checkpoint (the
    trainer refuses a resume up front instead of failing on mismatched tensors).

    ``Args`` is the strategy's frozen dataclass of settings (defaults from the paper; values are checked
    in its ``__post_init__``); ``Strategy(**kwargs)`` builds ``self.args`` from it, naming unknown keys.
    Subclasses with per-run state override ``__init__`` and call ``super().__init__(**kwargs)`` first.
    """

    name: ClassVar[str] = ""
    Args: ClassVar[type] = NoArgs
    requires: ClassVar[Cap] = Cap.NONE
    excludes: ClassVar[Cap] = Cap.NONE
    caps: ClassVar[Cap] = Cap.NONE  # QUANTIZED_OK, LOW_PRECISION_OK: where the strategy works (the Trainer checks)
    exclusive_with: ClassVar[frozenset[str]] = frozenset()
    resumable: ClassVar[bool] = True

    def __init__(self, **kwargs: Any) -> None:
        self.args = build_args(type(self).Args, kwargs, owner=f"strategy {self.name!r}")

    def param_groups(self, model: nn.Module, params: list[nn.Parameter]) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups, or None to keep the default single group."""
        return None

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def on_train_start(self, ctx: TrainingContext) -> None: ...

    def on_step_start(self, ctx: TrainingContext, step: int) -> None: ...

    def on_loss(self, ctx: TrainingContext, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        return loss

    def on_after_backward(self, ctx: TrainingContext, step: int) -> None: ...

    def on_before_optimizer_step(self, ctx: TrainingContext, step: int) -> None: ...

    def on_step_end(self, ctx: TrainingContext, step: int, logs: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """State needed for exact resume (saved with each checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def restore_structure(self, ctx: TrainingContext, state: dict[str, Any]) -> None:
        """On resume, before the checkpoint's tensors, optimizer and scheduler state are loaded: rebuild
        what the strategy changed during training (new parameters, optimizer groups, scheduler lambdas)
        from its saved ``state`` (what ``state_dict`` returned), so that those loads find the saved shapes
        and groups. ``load_state_dict`` runs afterwards, as before."""


def check_stack(strategies: list[Strategy]) -> None:
    """Refuse stacks whose members declare each other exclusive."""
    names = [s.name for s in strategies]
    if len(set(names)) != len(names):
        raise ValueError(f"strategy listed twice in {names}")
    for s in strategies:
        clash = s.exclusive_with & set(names)
        if clash:
            raise ValueError(f"strategy {s.name!r} cannot be combined with {sorted(clash)}")


def check_forms(strategies: list[Strategy], model: nn.Module) -> None:
    """Refuse, before training, a model whose adapter forms a strategy cannot work with: none has the
    capabilities it ``requires``, or one has a capability it ``excludes``."""
    from lorakit.core import registry
    from lorakit.core.caps import describe
    from lorakit.forms.base import Form

    forms = {type(m) for m in model.modules() if isinstance(m, Form)}
    for s in strategies:
        if s.requires != Cap.NONE and forms and not any(s.requires in f.caps for f in forms):
            able = [e.name for e in registry.entries("form") if s.requires in registry.get("form", e.name).caps]
            raise ValueError(f"strategy {s.name!r} needs an adapter form with capabilities [{describe(s.requires)}] "
                             f"(catalog forms that have them: {', '.join(repr(n) for n in able)}); the model's "
                             f"forms {sorted(f.name for f in forms)} have none")
        bad = sorted(f.name for f in forms if f.caps & s.excludes)
        if bad:
            raise ValueError(f"strategy {s.name!r} cannot train form(s) {bad}: they have [{describe(s.excludes)}]")
