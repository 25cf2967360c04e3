"""AdaptedLayer: the one adapted layer. A frozen base layer plus named adapters (forms) and delta sources.

Forward, for the per-forward context c (``core.context``; None outside any context):

    out = base(x)
    out += Σ_{a active, unmerged} Δ_a(x)                        (no context, or a context without names)
    out[rows of a] += Δ_a(x[rows of a])                         (c.names + per-row c.ids: mixed batch)
    out += Σ_e w_e · Δ_{names[e]}(x)                            (c.names + c.weights [..., E], or per-token ids)
    out = source.add_delta(x, out, c)   for each delta source  (stacked/paged banks: routers, serving)

Δ_a(x) is the form's ``apply`` (the fast factored path); adapters a layer does not hold add nothing.
Merged adapters are already in the base weight and are skipped; per-row or weighted contexts refuse
merged adapters (the merged update would reach every row).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.context import AdapterContext, ContextError, current_context
from lorakit.forms.base import Form, weight_out_in, write_weight


class AdaptedLayer(nn.Module):
    """Wraps a frozen base layer and holds ``{adapter_name: Form}`` and ``{key: DeltaSource}``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.sources = nn.ModuleDict()  # key -> core.sources.DeltaSource (router stacks, serving banks)
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.disabled = False
        self._bias_added = False  # merge gave a bias-free base layer a bias; unmerge takes it away

    # Some model code reads `.weight`/`.bias` of its projections (dtype checks, weight tying).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)  # an Embedding has none

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        ctx = current_context()
        if ctx is not None and ctx.names is not None:
            out = self._context_forward(x, out, ctx)
        else:
            for name in self.active:
                if name in self.adapters and name not in self.merged:
                    out = _apply(self.adapters[name], x, out)
        for source in self.sources.values():
            out = source.add_delta(x, out, ctx)
        return out

    def _context_forward(self, x: torch.Tensor, out: torch.Tensor, ctx: AdapterContext) -> torch.Tensor:
        if self.merged:
            raise RuntimeError(f"per-row or weighted adapters while adapters {self.merged} are merged; unmerge first")
        if ctx.weights is None and ctx.ids is not None and ctx.ids.dim() == 1:
            return self._rows_forward(x, out, ctx.row_groups())
        w = ctx.mixing_weights(x, len(ctx.names))
        if w is None:
            raise ContextError("a context with adapter names needs ids or weights")
        result = out
        for e, name in enumerate(ctx.names):
            if name is None or name not in self.adapters:
                continue
            delta = _apply(self.adapters[name], x, out) - out
            result = result + w[..., e, None].to(out.dtype) * delta
        return result

    def _rows_forward(self, x: torch.Tensor, out: torch.Tensor, groups) -> torch.Tensor:
        if self.merged:
            raise RuntimeError(f"mixed-adapter batch while adapters {self.merged} are merged; unmerge first")
        result = out
        for name, rows in groups:
            if name not in self.adapters:
                continue
            rows = rows.to(x.device)
            adapted = _apply(self.adapters[name], x.index_select(0, rows), out.index_select(0, rows))
            result = result.index_copy(0, rows, adapted)
        return result

    # -- merging ---------------------------------------------------------------------------
    def merge(self, names: list[str] | None = None) -> None:
        for name in names if names is not None else list(self.active):
            if name in self.merged or name not in self.adapters:
                continue
            form = self.adapters[name]
            if Cap.MERGEABLE not in form.caps:
                raise ValueError(f"adapter {name!r} ({form.name}) is input-dependent and cannot be merged")
            with torch.no_grad():
                if not form.merge_into(self._weight_out_in(), 1.0):  # in place where the form can
                    self._write_weight(form.merged_weight(self._weight_out_in().to(_dtype(form))))
                self._add_bias(form.delta_bias(), sign=1.0)
            self.merged.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        for name in reversed(list(self.merged)):
            if names is not None and name not in names:
                continue
            form = self.adapters[name]
            with torch.no_grad():
                if not form.merge_into(self._weight_out_in(), -1.0):
                    self._write_weight(form.unmerged_weight(self._weight_out_in().to(_dtype(form))))
                self._add_bias(form.delta_bias(), sign=-1.0)
            self.merged.remove(name)
        if self._bias_added and all(self.adapters[n].delta_bias() is None for n in self.merged):
            self.base_layer.bias = None  # back to the original bias-free layer (same state_dict keys)
            self._bias_added = False

    def base_weight_out_in(self, original: bool = False) -> torch.Tensor:
        """The base weight (out, in) without the merged adapters; with ``original``, also without the
        rewrites of base-rewriting inits (the pretrained weight). The base layer is not modified."""
        w = self._weight_out_in()
        with torch.no_grad():
            for name in reversed(self.merged):
                form = self.adapters[name]
                w = form.unmerged_weight(w.to(_dtype(form)))
            for form in self.adapters.values() if original else ():
                offset = initial_delta(form)
                if offset is not None:
                    w = w + offset[0].to(w.dtype)
        return w.to(self.base_layer.weight.dtype)

    def rewrite_base(self, form: Form, sign: float = -1.0) -> None:
        """W ← W + sign·ΔW0 (and the bias), ΔW0 = the form's update at its initial tensors: a
        base-rewriting init keeps the model's output unchanged at init this way (W_res = W − ΔW0)."""
        offset = initial_delta(form)
        if offset is None:
            return
        with torch.no_grad():
            self._write_weight(self._weight_out_in() + sign * offset[0].to(self.base_layer.weight.dtype))
            self._add_bias(offset[1], sign=sign)

    def _weight_out_in(self) -> torch.Tensor:
        return weight_out_in(self.base_layer)  # the layout ΔW uses, per layer kind (forms.base)

    def _write_weight(self, weight_out_in: torch.Tensor) -> None:
        write_weight(self.base_layer, weight_out_in)

    def _add_bias(self, delta: torch.Tensor | None, sign: float) -> None:
        if delta is None:
            return
        if self.base_layer.bias is None:
            w = self.base_layer.weight
            self.base_layer.bias = nn.Parameter(torch.zeros(delta.shape, dtype=w.dtype, device=w.device),
                                                requires_grad=False)
            self._bias_added = True
        self.base_layer.bias.data.add_(sign * delta.to(self.base_layer.bias.dtype))

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={self.merged}"


def _dtype(form: Form) -> torch.dtype:
    for p in form.parameters():
        return p.dtype
    for b in form.buffers():
        return b.dtype
    return torch.float32


def _apply(form: Form, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Run a form in its own dtype (fp32 unless asked) and return in the base output's dtype."""
    dtype = _dtype(form)
    if x.dtype == dtype and out.dtype == dtype:
        return form.apply(x, out)
    x = x.to(dtype) if x.is_floating_point() else x  # token ids (Embedding) stay integers
    return form.apply(x, out.to(dtype)).to(out.dtype)


def initial_delta(form: Form) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(ΔW0, Δb0) of a form at the tensors a base-rewriting init gave it (``form.initial_tensors``),
    or None. Computed by loading those tensors for a moment, so any form works."""
    initial = getattr(form, "initial_tensors", None)
    if not initial:
        return None
    current = {k: v.detach().clone() for k, v in form.save_tensors().items()}
    with torch.no_grad():
        form.load_tensors(initial)
        try:
            delta = form.delta_weight().detach().clone()
            bias = form.delta_bias()
            bias = None if bias is None else bias.detach().clone()
        finally:
            form.load_tensors(current)
    return delta, bias


def set_initial_tensors(form: Form, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Record the form's initial tensors (default: its current ones) as a plain attribute: they are
    saved with the adapter (``AdapterState.initial``) but are not parameters or buffers."""
    snapshot = tensors if tensors is not None else form.save_tensors()
    object.__setattr__(form, "initial_tensors", {k: v.detach().clone() for k, v in snapshot.items()})
