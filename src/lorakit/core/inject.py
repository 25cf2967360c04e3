"""Find target modules, wrap them in AdaptedLayer, manage named adapters on a model in place."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.core import registry
from lorakit.core.caps import Cap
from lorakit.core.layer import AdaptedLayer
from lorakit.core.spec import AdapterSpec, build_args
from lorakit.forms.base import Form, is_conv1d

_SPECS = "_lorakit_specs"


# -- target selection ---------------------------------------------------------------------------
def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of the original model: AdaptedLayer shows up under its own path."""
    for path, module in model.named_modules():
        if ".base_layer" in f".{path}" or ".adapters." in f".{path}.":
            continue
        yield path, module


def _matches(path: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Module paths selected by ``spec.targets`` minus ``spec.exclude``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for path, module in _base_modules(model):
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        if not path or not _adaptable_or_wrapped(module):
            continue
        if spec.targets == "all-linear":
            if head is not None and head in (module, base):  # the head may already be wrapped
                continue
        elif not _matches(path, spec.targets):
            continue
        if spec.exclude and _matches(path, spec.exclude):
            continue
        found.append(path)
    if not found:
        sample = [p for p, m in _base_modules(model) if p and _adaptable_or_wrapped(m)][:12]
        raise ValueError(f"targets {spec.targets!r} match no Linear/Conv1D module; some candidates: {sample}")
    return found


def _adaptable_or_wrapped(module: nn.Module) -> bool:
    return isinstance(module, AdaptedLayer) or _is_adaptable(module)


# -- attach / detach ----------------------------------------------------------------------------
def specs(model: nn.Module) -> dict[str, AdapterSpec]:
    """The adapters attached to ``model`` (name -> spec)."""
    return model.__dict__.setdefault(_SPECS, {})


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for path, module in _base_modules(model):
        if isinstance(module, AdaptedLayer):
            yield path, module


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def form_class(spec: AdapterSpec) -> type[Form]:
    return registry.get("form", spec.form)


def build_forms(model: nn.Module, spec: AdapterSpec, paths: Sequence[str]) -> dict[str, Form]:
    """One new form per module path (not yet installed), with per-module args from ``spec``."""
    cls = form_class(spec)
    forms = {}
    for path in paths:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        args = build_args(cls.Args, spec.args_for(path), owner=f"form {cls.name!r}")
        forms[path] = cls(base, args)
        forms[path].bind_path(path)
    if Cap.SHARED_TENSORS in cls.caps and forms:  # one set of model-level tensors for all the layers
        shared = cls.build_shared(forms)
        for form in forms.values():
            form.bind_shared(shared)
    return forms


def install(model: nn.Module, name: str, spec: AdapterSpec, forms: dict[str, Form], *,
            activate: bool = True, trainable: bool = True) -> nn.Module:
    """Put prepared forms into the model under adapter ``name``."""
    if name in specs(model):
        raise ValueError(f"adapter {name!r} already exists on this model; delete it or choose another name")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"adapter name {name!r} must use letters, digits, '_' or '-' only")
    for path, form in forms.items():
        module = model.get_submodule(path)
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module).train(module.training)
            _set_submodule(model, path, module)
        module.adapters[name] = form.train(module.training)  # a new adapter follows the model's mode
        module.active = active_adapters(model)
    specs(model)[name] = spec
    if activate:
        set_active(model, [name])
    if trainable:
        mark_trainable(model, name)
    return model


def adapter_modules(model: nn.Module, name: str) -> dict[str, Form]:
    """module path -> the form of adapter ``name`` on that module."""
    _require(model, name)
    return {path: layer.adapters[name] for path, layer in adapted_layers(model) if name in layer.adapters}


def exact_pattern(path: str) -> str:
    """A ``module_args`` pattern that matches exactly the module ``path`` (and PEFT reads the same way)."""
    return "^" + re.escape(path)


def override_modules(model: nn.Module, name: str, overrides: dict[str, dict[str, Any] | None]) -> AdapterSpec:
    """Change adapter ``name`` per module: ``{path: {arg: value}}`` rebuilds that module's form with
    those args (fresh tensors), ``{path: None}`` removes the adapter from that module. The spec records
    it (exact-path ``module_args``; removed paths go to ``exclude``) so save/load and the PEFT export
    (rank/alpha patterns) reproduce the new shapes. Returns the new spec."""
    _require(model, name)
    spec = specs(model)[name]
    layers = {path: layer for path, layer in adapted_layers(model) if name in layer.adapters}
    unknown = sorted(set(overrides) - set(layers))
    if unknown:
        raise KeyError(f"adapter {name!r} is not on module(s) {unknown[:3]}; it is on {sorted(layers)[:3]}...")
    if any(name in layers[p].merged for p in overrides):
        raise ValueError(f"adapter {name!r} is merged; unmerge it before changing its modules")
    if Cap.SHARED_TENSORS in form_class(spec).caps and any(overrides.values()):
        raise ValueError(f"form {spec.form!r} shares tensors across layers: per-module args cannot change")
    removed = [p for p, over in overrides.items() if over is None]
    if len(removed) == len(layers):
        raise ValueError(f"the overrides would remove adapter {name!r} from every module")
    module_args = dict(spec.module_args)
    for path, over in overrides.items():
        if over:
            key = exact_pattern(path)  # last in order: it wins over earlier patterns (args_for)
            module_args[key] = {**module_args.pop(key, {}), **over}
    new = dataclasses.replace(spec, module_args=module_args, exclude=[*spec.exclude, *removed])
    changed = [p for p, over in overrides.items() if over]
    forms = build_forms(model, new, changed)  # validates the new args before anything changes
    specs(model)[name] = new
    for path in removed:
        layer = layers[path]
        del layer.adapters[name]
        if not len(layer.adapters):
            _set_submodule(model, path, layer.base_layer)
    for path, form in forms.items():
        layers[path].adapters[name] = form.train(layers[path].training)
    return new


def _require(model: nn.Module, name: str) -> None:
    if name not in specs(model):
        known = ", ".join(specs(model)) or "(none)"
        raise KeyError(f"no adapter named {name!r} on this model; attached: {known}")


def mark_trainable(model: nn.Module, name: str | Sequence[str]) -> list[nn.Parameter]:
    """Freeze everything except the named adapters' trainable tensors; return those tensors."""
    names = [name] if isinstance(name, str) else list(name)
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for n in names:
        for form in adapter_modules(model, n).values():
            for pname, p in form.named_parameters():
                if pname not in form.frozen:
                    p.requires_grad_(True)
                    params.append(p)
    return params


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    names = (names,) if isinstance(names, str) else tuple(names)
    for n in names:
        _require(model, n)
    model.__dict__["_lorakit_active"] = names
    for _, layer in adapted_layers(model):
        layer.active = names


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    return model.__dict__.get("_lorakit_active", ())


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first if merged)."""
    _require(model, name)
    for path, layer in list(adapted_layers(model)):
        if name in layer.merged:
            layer.unmerge([name])
        if name in layer.adapters:
            del layer.adapters[name]
        if not len(layer.adapters):
            _set_submodule(model, path, layer.base_layer)
    del specs(model)[name]
    set_active(model, [n for n in active_adapters(model) if n != name])


def merge(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights; forward stays the same."""
    for _, layer in adapted_layers(model):
        layer.merge(list(names) if names is not None else None)


def unmerge(model: nn.Module, names: Sequence[str] | None = None) -> None:
    for _, layer in adapted_layers(model):
        layer.unmerge(list(names) if names is not None else None)


def unload(model: nn.Module, merge_active: bool = True) -> nn.Module:
    """Return a plain model: active adapters merged in (if asked), every wrapper removed."""
    if merge_active:
        merge(model)
    else:
        unmerge(model)
    for path, layer in list(adapted_layers(model)):
        _set_submodule(model, path, layer.base_layer)
    model.__dict__.pop(_SPECS, None)
    model.__dict__.pop("_lorakit_active", None)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone (merged adapters are unmerged for the duration)."""
    layers = [layer for _, layer in adapted_layers(model)]
    merged = {id(layer): list(layer.merged) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(merged[id(layer)])


@contextlib.contextmanager
def mixed_batch(model: nn.Module, row_adapters: Sequence[str | None]) -> Iterator[nn.Module]:
    """Give each batch row its own adapter (``None`` = base model) for the duration.

    Reference implementation: rows are grouped per adapter and each group goes through that
    adapter's ``apply``; the serving engine has the fast kernels.
    """
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(row_adapters):
        if name is not None:
            _require(model, name)
            groups.setdefault(name, []).append(row)
    row_groups = [(n, torch.tensor(rows, dtype=torch.long)) for n, rows in groups.items()]
    layers = [layer for _, layer in adapted_layers(model)]
    for layer in layers:
        layer.row_groups = row_groups
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_groups = None
