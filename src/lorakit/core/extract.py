"""The model → AdapterState reader: an installed adapter's tensors, spec, base fingerprint and meta.

Core machinery (no axis): ``api.save``, ``io.export`` and every axis that snapshots an adapter use it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.core.inject import adapted_layers, adapter_modules, find_targets, saved_module_tensors, specs
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterState
from lorakit.forms.base import is_conv1d, stored_layout


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Cheap identity of a base model (architecture + a hash of a few weights).

    Merged adapters and base rewrites of inits are taken out of the weights for the duration (the
    base's identity must not depend on them); the weight tensors are put back untouched.
    """
    from lorakit.models import model_fingerprint

    swapped = []
    try:
        for _, layer in adapted_layers(model):
            rewritten = any(getattr(f, "initial_tensors", None) for f in layer.adapters.values())
            if layer.merged or rewritten:
                w = layer.base_layer.weight
                base = layer.base_weight_out_in(original=True)
                swapped.append((w, w.data))
                w.data = stored_layout(layer.base_layer, base)
        return model_fingerprint(model)
    finally:
        for w, data in swapped:
            w.data = data


def _leaf_targets(model: nn.Module, modules: list[str]) -> list[str] | None:
    """Leaf names (e.g. ["q_proj", "v_proj"]) if they select exactly ``modules`` in ``model``."""
    leaves = sorted({p.rpartition(".")[2] for p in modules})
    try:
        selected = find_targets(model, AdapterSpec(targets=leaves))
    except ValueError:
        return None
    return leaves if sorted(selected) == sorted(modules) else None


def extract_state(model: nn.Module, name: str = "default") -> AdapterState:
    """The adapter ``name`` of ``model`` as an AdapterState (tensors copied to CPU, fp32)."""
    forms = adapter_modules(model, name)
    tensors = {}
    for path, form in forms.items():
        for tname, tensor in form.save_tensors().items():
            t = tensor.detach().to("cpu")
            tensors[f"{path}.{form.tensor_key(tname)}"] = (t.float() if t.is_floating_point() else t).clone()
    shared = next(iter(forms.values())).shared if forms else None
    if shared is not None and shared.saved:  # model-level tensors (Cap.SHARED_TENSORS): stored once
        for tname, tensor in shared.tensors().items():
            tensors[tname] = tensor.detach().to("cpu").float().clone()
            for path in forms if shared.layer_copies else ():  # PEFT's layout also has per-layer copies
                tensors[f"{path}.{forms[path].tensor_key(tname)}"] = tensors[tname].clone()
    initial = {f"{path}.{form.tensor_key(tname)}": tensor.detach().to("cpu").clone()
               for path, form in forms.items() for tname, tensor in (getattr(form, "initial_tensors", None)
                                                                      or {}).items()}
    modules = sorted(forms)
    conv1d = {is_conv1d(model.get_submodule(p).base_layer) for p in modules}
    meta = {"peft_target_modules": _leaf_targets(model, modules), "fan_in_fan_out": conv1d == {True}}
    base = fingerprint(model)
    base["name_or_path"] = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return AdapterState(spec=specs(model)[name], tensors=tensors, base=base, meta=meta, initial=initial,
                        saved_modules=saved_module_tensors(model, name))
