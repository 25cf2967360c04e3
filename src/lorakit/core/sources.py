"""Delta sources: stacked or paged banks of adapters that live inside an ``AdaptedLayer``.

An :class:`~lorakit.core.layer.AdaptedLayer` adds, after its base output, the updates of its own
per-adapter forms and then of each of its sources:

    out = base(x) + Σ_forms Δ_form(x) + Σ_sources source.add_delta(x, out, context)

A source reads what it needs from the per-forward :class:`~lorakit.core.context.AdapterContext`
(ids, weights, extras, the caller's plan). Two kinds exist:

- :class:`StackedLoRA` (here): E LoRA adapters stacked per layer (routers' experts, FLoRA-style
  stacks, ensembles), through the one batched-delta op ``core.batched.stacked_delta``; its weights
  come from an optional gate module (a router's, which computes them from the layer input) or from
  the context;
- the serving bank's paged pools (``lorakit.serving.engine.PagedSource``), through the ``paged`` op.

:func:`add_source` / :func:`remove_source` are the one way to put a source into a model: they use the
same wrapping as adapters (``core.inject``), so a layer can hold forms, a router and a serving bank
at once, and the original module comes back when nothing is left on it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lorakit.core.batched import stacked_delta
from lorakit.core.context import AdapterContext


class DeltaSource(nn.Module):
    """A bank of adapter updates inside an AdaptedLayer (see the module docstring). ``key`` is the name
    it is installed under (``add_source``); a context with ``target == key`` addresses it."""

    key: str | None = None

    def add_delta(self, x: torch.Tensor, out: torch.Tensor, ctx: AdapterContext | None) -> torch.Tensor:
        """``out`` plus this source's update of ``x`` for the current context (may be ``out`` itself)."""
        raise NotImplementedError(f"{type(self).__name__} must implement add_delta()")


class StackedLoRA(DeltaSource):
    """E LoRA adapters of one layer as stacked tensors: A [E, r, in], B [E, out, r], scale [E], bias [E, out].

    ΔW_e = s_e·B_e·A_e (zero-padded ranks are exact). Weights per position come from ``gate(x, ctx)``
    when a gate module is set (None from the gate: no update), else from the context
    (``AdapterContext.mixing_weights``: weights, or one-hot ids) when the context targets this source's
    key. ``mode`` is "delta" (Σ_e w_e ΔW_e x)
    or "factors" ((Σ w_e s_e B_e)(Σ w_e A_e) x); see ``core.batched``.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, ranks: list[int] | None = None, *, trainable: bool = False,
                 gate: nn.Module | None = None, mode: str = "delta") -> None:
        super().__init__()
        if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
            raise ValueError(f"stacked LoRA needs A [E, r, in] and B [E, out, r], got {tuple(A.shape)} and "
                             f"{tuple(B.shape)}")
        self.A = nn.Parameter(A.detach().clone().float(), requires_grad=trainable)
        self.B = nn.Parameter(B.detach().clone().float(), requires_grad=trainable)
        ones = torch.ones(A.shape[0], device=A.device)
        self.register_buffer("scale", (ones if scale is None else scale.detach().clone()).float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float(), requires_grad=trainable)
        self.ranks = list(ranks) if ranks is not None else [A.shape[1]] * A.shape[0]
        self.gate = gate
        self.mode = mode

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]

    def expert_delta(self, e: int) -> torch.Tensor:
        """ΔW_e (out × in), dense; for tests and export."""
        return self.scale[e] * self.B[e] @ self.A[e]

    def mix(self, x: torch.Tensor, g: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Σ_e g_e ΔW_e x (or the factor mix) for weights g [..., E]: the update alone."""
        return stacked_delta(x, self.A, self.B, weights=g, bias=self.bias, scale=self.scale,
                             mode=mode or self.mode)

    def add_delta(self, x: torch.Tensor, out: torch.Tensor, ctx: AdapterContext | None) -> torch.Tensor:
        if self.gate is not None:
            g = self.gate(x, ctx)
        elif ctx is not None and ctx.target is not None and ctx.target == self.key:
            g = ctx.mixing_weights(x, self.num_experts)
        else:
            g = None
        if g is None:
            return out
        return out + self.mix(x, g).to(out.dtype)


def _wrapped(model: nn.Module, path: str):
    from lorakit.core.layer import AdaptedLayer

    module = model.get_submodule(path)
    if isinstance(module, AdaptedLayer):
        return module
    layer = AdaptedLayer(module).train(module.training)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)
    return layer


def add_source(model: nn.Module, path: str, key: str, source: DeltaSource) -> nn.Module:
    """Put ``source`` under ``key`` into the adapted layer at ``path`` (wrapping the base module if needed)."""
    layer = _wrapped(model, path)
    if key in layer.sources:
        raise ValueError(f"{path}: a source {key!r} is already installed; remove it first")
    source.key = key
    layer.sources[key] = source
    return layer


def remove_source(model: nn.Module, path: str, key: str) -> DeltaSource | None:
    """Take source ``key`` out of the layer at ``path``; the original module returns when the layer
    holds nothing else. Returns the removed source (None if there was none)."""
    from lorakit.core.layer import AdaptedLayer

    layer = model.get_submodule(path)
    if not isinstance(layer, AdaptedLayer) or key not in layer.sources:
        return None
    source = layer.sources[key]
    del layer.sources[key]
    if not layer.sources and not layer.adapters:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    return source


def sources(model: nn.Module, key: str) -> Iterator[tuple[str, nn.Module, DeltaSource]]:
    """(path, base layer, source) of every layer of ``model`` holding a source under ``key``."""
    from lorakit.core.layer import AdaptedLayer

    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer) and key in module.sources:
            yield path, module.base_layer, module.sources[key]
