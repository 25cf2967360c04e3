"""AdaptedLayer: the one adapted layer. A frozen base layer plus named adapters (forms) and delta sources.

Forward, for the per-forward context c (``core.context``; None outside any context):

    out = base(x)
    out += Σ_{a active, unmerged} Δ_a(x)                        (no context, or a context without names)
    out[rows of a] += Δ_a(x[rows of a])                         (c.names + per-row c.ids: mixed batch)
                                                                (rows of each adapter contiguous: sliced, one cat)
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
from lorakit.core.quant import QuantizedBaseError, is_quantized, keep_training_layout, quant_type
from lorakit.forms.base import Form, weight_out_in, write_weight


class AdaptedLayer(nn.Module):
    """Wraps a frozen base layer and holds ``{adapter_name: Form}`` and ``{key: DeltaSource}``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        keep_training_layout(base_layer)  # a bitsandbytes 4-bit base computes alike in train and eval
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
            segments = ctx.row_segments()
            if segments is not None:
                return self._segments_forward(x, out, segments)
            return self._rows_forward(x, out, ctx.row_groups())
        # a Conv2d's input and output are channels-first ([N, C, H, W]): weights broadcast over the output's
        # channels-last view, then move back, so per-row weights reach every channel and pixel
        channels_first = isinstance(self.base_layer, nn.Conv2d)
        w = ctx.mixing_weights(out.movedim(1, -1) if channels_first else x, len(ctx.names))
        if w is None:
            raise ContextError("a context with adapter names needs ids or weights")
        result = out
        for e, name in enumerate(ctx.names):
            if name is None or name not in self.adapters:
                continue
            delta = _apply(self.adapters[name], x, out) - out
            we = w[..., e, None].movedim(-1, 1) if channels_first else w[..., e, None]
            result = result + we.to(out.dtype) * delta
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

    def _segments_forward(self, x: torch.Tensor, out: torch.Tensor, segments) -> torch.Tensor:
        # Contiguous per-adapter rows: slice views and one cat instead of a full-size index_copy per adapter
        # (the copies cost the batching gain a multi-job step is after; LATER-ROWS §6.6).
        parts = []
        for name, start, stop in segments:
            part = out[start:stop]
            if name is not None and name in self.adapters:
                part = _apply(self.adapters[name], x[start:stop], part)
            parts.append(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    # -- merging ---------------------------------------------------------------------------
    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters into the base weight. Refused on a quantized base (``QuantizedBaseError``): W + ΔW
        requantized to 4/8 bits loses most of ΔW to rounding and unmerge could not restore W; lorakit's
        choice (PEFT requantizes with a warning): dequantize first (``core.quant.dequantize_model``, which
        warns), then merge exactly into the dense base."""
        for name in names if names is not None else list(self.active):
            if name in self.merged or name not in self.adapters:
                continue
            form = self.adapters[name]
            if is_quantized(self.base_layer):
                raise QuantizedBaseError(
                    f"cannot merge adapter {name!r} into the quantized ({quant_type(self.base_layer)}) base layer: "
                    "requantizing W + ΔW loses the update to rounding; dequantize the base first "
                    "(lorakit.core.quant.dequantize_model(model), dense weights with a warning) and merge there")
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
        return w if is_quantized(self.base_layer) else w.to(self.base_layer.weight.dtype)

    def rewrite_base(self, form: Form, sign: float = -1.0) -> None:
        """W ← W + sign·ΔW0 (and the bias), ΔW0 = the form's update at its initial tensors: a
        base-rewriting init keeps the model's output unchanged at init this way (W_res = W − ΔW0)."""
        offset = initial_delta(form)
        if offset is None:
            return
        if is_quantized(self.base_layer):
            raise QuantizedBaseError(
                f"adapter {form.name!r} comes from a base-rewriting init (W_res = W - ΔW0), which cannot rewrite "
                f"a quantized ({quant_type(self.base_layer)}) base; load the base unquantized")
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
    """Run a form in its own dtype (fp32 unless asked) and return in the base output's dtype; under
    autocast, in the autocast dtype for matmuls."""
    dtype = _dtype(form)
    if x.dtype == dtype and out.dtype == dtype:
        return form.apply(x, out)
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        # under autocast the form's matmuls run in the autocast dtype anyway (as PEFT's): skip the fp32
        # round trip of x and of the full-width base output; elementwise maths with the fp32 weights
        # still promotes to fp32
        return form.apply(x, out).to(out.dtype)
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
