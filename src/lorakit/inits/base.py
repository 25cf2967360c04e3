"""The Init interface and the one driver that runs any init over a model's adapted layers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from lorakit.core.caps import Cap, describe
from lorakit.core.spec import NoArgs, build_args
from lorakit.forms.base import Form


class Init:
    """Sets a form's tensors. ``needs`` says whether it reads data or gradients; ``requires`` lists
    the form capabilities it relies on (checked once, before any work).

    ``Args`` is the init's frozen dataclass of settings (defaults from the paper; values are checked in
    its ``__post_init__``); ``Init(**kwargs)`` builds ``self.args`` from it, naming unknown keys.
    Subclasses that keep per-run state override ``__init__`` and call ``super().__init__(**kwargs)``.
    """

    name: ClassVar[str] = ""
    Args: ClassVar[type] = NoArgs
    needs: ClassVar[Cap] = Cap.NONE  # NEEDS_DATA, NEEDS_GRAD, REWRITES_BASE
    requires: ClassVar[Cap] = Cap.NONE
    caps: ClassVar[Cap] = Cap.NONE  # QUANTIZED_OK, LOW_PRECISION_OK: where the init works (checked by initialize)
    loss_fn: Any = None  # set by initialize(): loss_fn(model, batch) for gradient passes
    forms: dict[str, Form] | None = None  # set by initialize(): the adapter's forms by module path

    def __init__(self, **kwargs: Any) -> None:
        self.args = build_args(type(self).Args, kwargs, owner=f"init {self.name!r}")

    # what the init does with the capabilities it requires, for the refusal message
    purpose: ClassVar[str] = ""

    @classmethod
    def check_form(cls, form_cls: type[Form]) -> None:
        """Refuse a form lacking ``requires``, naming what is missing and the catalog forms that have it."""
        from lorakit.core import registry

        missing = cls.requires & ~form_cls.caps
        if missing:
            able = [e.name for e in registry.entries("form") if cls.requires in registry.get("form", e.name).caps]
            why = f" ({cls.purpose})" if cls.purpose else ""
            raise ValueError(f"init {cls.name!r}{why} needs form capabilities [{describe(missing)}] that form "
                             f"{form_cls.name!r} lacks (it has [{describe(form_cls.caps)}]); forms that have "
                             f"them: {', '.join(repr(n) for n in able) or 'none'}")

    def collect(self, model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any] | None) -> Any:
        """Gather statistics (activations, gradients) for ``apply``; data-free inits return None."""
        return None

    def module_overrides(self, stats: Any) -> dict[str, dict[str, Any] | None]:
        """Per-module form-arg changes decided from the statistics (e.g. a data-driven rank), applied
        before ``apply``: ``{path: {arg: value}}`` rebuilds that module's form with those args, and
        ``{path: None}`` removes the adapter from that module. Default: no change."""
        return {}

    def apply(self, form: Form, base_layer: nn.Module, stats: Any) -> None:
        raise NotImplementedError(f"init {self.name!r} must implement apply()")


def _check_hardware(init: Init, bases: list[nn.Module]) -> None:
    """Refuse, before any work, an init that does not declare it works on these base layers."""
    from lorakit.core.caps import require
    from lorakit.core.quant import is_quantized

    if any(is_quantized(b) for b in bases):
        require([("init", init)], "quantized")
    elif any(getattr(b, "weight", None) is not None and b.weight.dtype in (torch.bfloat16, torch.float16)
             for b in bases):
        require([("init", init)], "low_precision")


def initialize(model: nn.Module, adapter_name: str, init: Init,
               batches: Iterable[Any] | None = None, *, loss_fn: Any = None) -> None:
    """Run ``init`` on every layer that holds ``adapter_name``.

    Data-driven inits read ``batches`` (and ``loss_fn(model, batch)`` for gradients; default: the
    causal-LM loss). Inits declaring ``Cap.REWRITES_BASE`` leave the model's output unchanged by
    rewriting the base weight W ← W − ΔW0; the initial tensors are recorded so that saving exports an
    adapter for the ORIGINAL base, and loading onto the original base redoes the rewrite.
    """
    from lorakit.core.inject import adapted_layers
    from lorakit.core.layer import set_initial_tensors

    layers = {path: layer for path, layer in adapted_layers(model) if adapter_name in layer.adapters}
    _check_hardware(init, [layer.base_layer for layer in layers.values()])
    if init.needs & (Cap.NEEDS_DATA | Cap.NEEDS_GRAD) and batches is None:
        raise ValueError(f"init {init.name!r} needs calibration batches; pass batches=...")
    init.loss_fn = loss_fn
    init.forms = {p: layer.adapters[adapter_name] for p, layer in layers.items()}
    stats = init.collect(model, {p: layer.base_layer for p, layer in layers.items()}, batches)
    overrides = init.module_overrides(stats)
    if overrides:  # rebuild/remove forms; the spec records the per-module args (save/load, PEFT patterns)
        from lorakit.core.inject import override_modules

        override_modules(model, adapter_name, overrides)
        layers = {path: layer for path, layer in adapted_layers(model) if adapter_name in layer.adapters}
    for path, layer in layers.items():
        form = layer.adapters[adapter_name]
        init.apply(form, layer.base_layer, None if stats is None else stats.get(path))
        if Cap.REWRITES_BASE in init.needs:
            set_initial_tensors(form)
            layer.rewrite_base(form)
