"""Quantized base layers (bitsandbytes ``Linear4bit`` nf4/fp4 and ``Linear8bitLt`` int8): recognise them,
read their weight back in floating point, and turn a quantized model back into a dense one.

QLoRA (Dettmers et al., 2023, arXiv 2305.14314, eq. 5): Y = X·doubleDequant(c1, c2, W_nf4) + s·X·A·B,
i.e. the frozen base runs quantized and the adapter adds its delta in the compute dtype; the base weight
is never written. lorakit's AdaptedLayer wraps the quantized linear as it wraps nn.Linear (both are
``nn.Linear`` subclasses); code that reads W (weight-guided forms, data-driven inits) gets the dequantized
weight through :func:`dequantized_weight`; code that writes W (merges, base-rewriting inits) is refused on
a quantized layer (:class:`QuantizedBaseError`), see ``AdaptedLayer.merge``.

bitsandbytes is only touched when it is already imported (a quantized model was loaded through it), so
this module costs nothing for dense models.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4", "int8")


class QuantizedBaseError(ValueError):
    """An operation that would rewrite a quantized (4-/8-bit) base weight."""


def _bnb():
    return sys.modules.get("bitsandbytes")


def quant_type(layer: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a bitsandbytes quantized linear, else None."""
    bnb = _bnb()
    if bnb is None:
        return None
    if isinstance(layer, bnb.nn.Linear4bit):
        state = getattr(layer.weight, "quant_state", None)
        return getattr(state, "quant_type", None) or getattr(layer.weight, "quant_type", "fp4")
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def is_quantized(layer: nn.Module) -> bool:
    return quant_type(layer) is not None


def has_quantized_layers(model: nn.Module) -> bool:
    return any(is_quantized(m) for m in model.modules())


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype the quantized layer computes in (and that its dequantized weight has)."""
    kind = quant_type(layer)
    if kind in ("nf4", "fp4"):
        dtype = getattr(layer, "compute_dtype", None)
        return dtype or getattr(layer.weight.quant_state, "dtype", torch.float32)
    if kind == "int8":
        return torch.float16 if layer.weight.device.type == "cuda" else torch.float32
    return layer.weight.dtype


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) floating-point weight the quantized layer computes with, on its device, in the dtype
    it was quantized from (4-bit: ``quant_state.dtype``; int8: fp32). A dense layer's own weight.

    4-bit: ``bitsandbytes.functional.dequantize_4bit`` (block-wise absmax · codebook, the inverse of
    QLoRA's eq. 1-3). int8 (LLM.int8(), Dettmers et al., 2022, arXiv 2208.07339): W = CB · SCB / 127 per
    output row (``int8_vectorwise_dequant``)."""
    kind = quant_type(layer)
    if kind is None:
        return layer.weight
    bnb = _bnb()
    w = layer.weight
    with torch.no_grad():
        if kind in ("nf4", "fp4"):
            state = w.quant_state
            if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference layout
                data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data.clone(),
                                                                                    copy.deepcopy(state))
                return bnb.functional.dequantize_4bit(data, state)
            return bnb.functional.dequantize_4bit(w.data, state)
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(layer, "state", None), "SCB", None)
        if scb is None or w.dtype != torch.int8:  # not quantized yet (an fp16 Int8Params before .to(device))
            return w.data.float()
        return bnb.functional.int8_vectorwise_dequant(w.data, scb).float()


def keep_training_layout(layer: nn.Module) -> None:
    """Keep a 4-bit layer in its standard layout on CPU. bitsandbytes (>= 0.48) repacks a ``Linear4bit`` for
    AVX512-BF16 CPUs on its first no-grad eval forward and rounds its absmax statistics to bf16 then, so eval
    outputs would differ from training outputs (and from the dequantized W inits read); lorakit's choice:
    the quantized base computes the same in training and in evaluation. A no-op for other layers."""
    if quant_type(layer) in ("nf4", "fp4") and getattr(layer, "support_avx512bf16_for_cpu", False):
        layer.support_avx512bf16_for_cpu = False


def dense_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` holding the dequantized weight (and the bias) of a quantized layer."""
    w = dequantized_weight(layer)
    dtype = dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
    bias = getattr(layer, "bias", None)
    dense = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(w.to(dtype))
        if bias is not None:
            dense.bias.copy_(bias.detach().to(dtype))
    dense.weight.requires_grad_(False)
    if dense.bias is not None:
        dense.bias.requires_grad_(False)
    return dense.train(layer.training)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None, *, warn: bool = True) -> nn.Module:
    """Replace every quantized linear of ``model`` (inside adapted layers too) by a dense ``nn.Linear``
    with its dequantized weight, in place; returns the model. The dense weights are the quantized ones
    read back, not the pretrained originals (the rounding of the quantization stays): merging an adapter
    afterwards is exact for this dense base. Warns (``warn``) because memory grows to the dense size."""
    replaced = []
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if is_quantized(child):
                setattr(module, child_name, dense_linear(child, dtype))
                replaced.append(f"{path}.{child_name}" if path else child_name)
    if replaced and warn:
        warnings.warn(f"dequantized {len(replaced)} quantized base layers to dense weights (the quantized values, "
                      "rounding included; memory grows to the dense size)", UserWarning, stacklevel=2)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if replaced and getattr(model, attr, False):
            with contextlib.suppress(AttributeError):  # a read-only property on some transformers versions
                setattr(model, attr, False)
    if replaced and getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the base weights as stored (packed 4-/8-bit data plus their quantization statistics for
    quantized layers; the tensors themselves for the rest), adapters excluded."""
    total = 0
    seen: set[int] = set()
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if "adapters." in name or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            for t in (state.absmax, state.code, getattr(state.state2, "absmax", None) if state.nested else None,
                      getattr(state.state2, "code", None) if state.nested else None):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        scb = getattr(p, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total
