"""Helpers of the merge tests: seeded adapters on a tiny Llama, and ΔW recomputed independently of the
merge code (through the LoRA form that lorakit installs on a model)."""

from __future__ import annotations

import torch

import lorakit
from lorakit.api import extract_state
from lorakit.core.inject import adapter_modules
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterState
from lorakit.models import tiny_llama

try:  # tests/ may or may not be a package
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]


def base_model(seed: int = 0, hidden: int = 32):
    return tiny_llama(hidden=hidden, layers=2, heads=4, kv_heads=2, vocab=128, seed=seed)


def make_state(r: int = 4, alpha: float | None = None, seed: int = 0, *, targets=TARGETS, base_seed: int = 0,
               hidden: int = 32, rslora: bool = False, bias: bool = False, module_args=None,
               form: str = "lora", std: float = 0.2) -> AdapterState:
    """A trained-looking adapter (all tensors random, seeded) for the tiny Llama ``base_seed``."""
    model = base_model(base_seed, hidden)
    form_args = {"r": r, "alpha": float(alpha if alpha is not None else 2 * r)}
    if rslora:
        form_args["rslora"] = True
    if bias:
        form_args["bias"] = True
    spec = AdapterSpec(form=form, form_args=form_args, targets=list(targets), module_args=module_args or {})
    lorakit.attach(model, spec, seed=seed)
    randomize_adapter(model, seed=seed + 100, std=std)
    return extract_state(model)


def deltas(state: AdapterState, base_seed: int = 0, hidden: int = 32):
    """{module: (ΔW, Δbias or None)} of ``state`` installed on a fresh base (the form's own math)."""
    model = base_model(base_seed, hidden)
    lorakit.apply_state(model, state)
    with torch.no_grad():
        return {p: (f.delta_weight().detach().clone(), None if f.delta_bias() is None else f.delta_bias().clone())
                for p, f in adapter_modules(model, "default").items()}


def weighted_sum(states, weights):
    """Σ_n w_n ΔW_n per module (and the biases), computed densely."""
    per = [deltas(s) for s in states]
    out = {}
    for path in per[0]:
        dw = sum(w * d[path][0] for w, d in zip(weights, per))
        biases = [(w, d[path][1]) for w, d in zip(weights, per) if d[path][1] is not None]
        out[path] = (dw, sum(w * b for w, b in biases) if biases else None)
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits
