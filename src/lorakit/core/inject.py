"""Find target modules, wrap them in AdaptedLayer, manage named adapters on a model in place.

Also PEFT's ``modules_to_save`` (``AdapterSpec.modules_to_save``): such a module is replaced by a
:class:`SavedModule` holding the frozen original and one trainable full copy per adapter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.core import registry
from lorakit.core.caps import Cap, require
from lorakit.core.context import AdapterContext, current_context, use_context
from lorakit.core.layer import AdaptedLayer
from lorakit.core.quant import is_quantized
from lorakit.core.spec import AdapterSpec, build_args
from lorakit.forms.base import LAYER_CAPS, Form, layer_kind

_SPECS = "_lorakit_specs"
# layer kinds "all-linear" selects (as PEFT: linear maps only, never Conv2d or Embedding)
_LINEAR_KINDS = ("linear", "conv1d")


# -- target selection ---------------------------------------------------------------------------
def _is_adaptable(module: nn.Module, form: type[Form] | None = None) -> bool:
    """Whether lorakit can put an adapter on ``module``: Linear and HF Conv1D always; Conv2d and
    Embedding when ``form`` declares the capability for that layer kind (any form if ``form`` is None)."""
    kind = layer_kind(module)
    if kind is None:
        return False
    if kind in _LINEAR_KINDS or form is None:
        return True
    return LAYER_CAPS[kind] in form.caps


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
    """Module paths selected by ``spec.targets`` minus ``spec.exclude``.

    ``"all-linear"`` selects Linear/Conv1D layers (not the output head). Names and regexes may also
    select Conv2d and Embedding layers; the spec's form must declare the capability for them
    (``Cap.CONV2D_OK``, ``Cap.EMBEDDING_OK``), else the selection is refused naming the layers.
    """
    form = form_class(spec)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found, refused = [], []
    for path, module in _base_modules(model):
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        if not path or not _adaptable_or_wrapped(module):
            continue
        kind = layer_kind(base)
        if spec.targets == "all-linear":
            if kind not in _LINEAR_KINDS:
                continue
            if head is not None and head in (module, base):  # the head may already be wrapped
                continue
        elif not _matches(path, spec.targets):
            continue
        if spec.exclude and _matches(path, spec.exclude):
            continue
        if not _is_adaptable(base, form):
            refused.append((path, type(base).__name__, LAYER_CAPS[kind or ""]))
            continue
        found.append(path)
    if refused:
        path, type_name, cap = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise ValueError(f"targets {spec.targets!r} select {type_name} layer {path!r}{more}, but form {form.name!r} "
                         f"does not support {type_name} layers (it does not declare Cap.{cap.name}); "
                         f"exclude them or choose a form that does")
    if not found:
        sample = [p for p, m in _base_modules(model) if p and _adaptable_or_wrapped(m)
                  and _is_adaptable(m.base_layer if isinstance(m, AdaptedLayer) else m, form)][:12]
        others = [t for t, cap in (("Conv2d", Cap.CONV2D_OK), ("Embedding", Cap.EMBEDDING_OK)) if cap in form.caps]
        extra = f" (nor {'/'.join(others)} module)" if others else ""
        raise ValueError(f"targets {spec.targets!r} match no Linear/Conv1D module{extra}; "
                         f"some candidates: {sample}")
    if any(is_quantized(_base_of(model.get_submodule(p))) for p in found):
        require([("form", form)], "quantized")  # a form that writes or needs a dense W refuses here
    return found


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def _adaptable_or_wrapped(module: nn.Module) -> bool:
    return isinstance(module, AdaptedLayer) or _is_adaptable(module)


# -- modules_to_save ----------------------------------------------------------------------------
class SavedModule(nn.Module):
    """PEFT's ``modules_to_save``: the frozen original module plus one trainable full copy per adapter.

    Forward runs the copy of the first active adapter that has one, the original when none has one or
    adapters are disabled; in a mixed batch each row goes through its adapter's copy (the module's first
    input must then be batch-first). Children are named ``base_layer`` and ``adapters`` like AdaptedLayer,
    so target search never looks inside them. Saved as PEFT does: ``<module path>.<param>``.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.base_layer = original
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False

    def current(self) -> nn.Module:
        """The module forward runs: the active adapter's copy, or the original."""
        if not self.disabled:
            for name in self.active:
                if name in self.adapters:
                    return self.adapters[name]
        return self.base_layer

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = current_context()
        if self.disabled or ctx is None or ctx.names is None or ctx.ids is None or ctx.ids.dim() != 1:
            return self.current()(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        for name, rows in ctx.row_groups():
            if name in self.adapters:
                rows = rows.to(x.device)
                out = out.index_copy(0, rows, self.adapters[name](x.index_select(0, rows), *args, **kwargs))
        return out

    def __getattr__(self, name: str) -> Any:
        # model code may read attributes of the module it replaced (e.g. a head's out_features)
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")  # absent while copy/pickle rebuilds the object
            if not modules or "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], name)

    def extra_repr(self) -> str:
        return f"active={list(self.active)}"


def _saved_wrappers(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for path, module in _base_modules(model):
        if isinstance(module, SavedModule):
            yield path, module


def find_saved_modules(model: nn.Module, names: Sequence[str], forms: Sequence[str] = ()) -> list[str]:
    """Module paths that ``modules_to_save`` ``names`` select (matched as PEFT: the full path or its last
    dotted parts); refuses names that match nothing, and modules that hold or are adapter targets."""
    paths: list[str] = []
    for n in names:
        hits = [p for p, _ in _base_modules(model) if p and (p == n or p.endswith("." + n))]
        # a match nested in another match is part of that copy already
        hits = [p for p in hits if not any(p.startswith(q + ".") for q in hits)]
        if not hits:
            sample = [p for p, m in _base_modules(model) if p and not list(m.children())][:8]
            raise ValueError(f"modules_to_save {n!r} matches no module of the model; some modules: {sample}")
        paths += [p for p in hits if p not in paths]
    for path in paths:
        module = model.get_submodule(path)
        inner = [p for p in (*forms, *(q for q, _ in adapted_layers(model))) if p == path or p.startswith(path + ".")]
        if isinstance(module, AdaptedLayer) or inner:
            raise ValueError(f"modules_to_save module {path!r} is (or contains) an adapter target {inner[:1]}; "
                             "a module is either adapted or saved as a full copy, not both")
    return paths


def saved_modules(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """module path -> adapter ``name``'s trainable full copy of that module (``modules_to_save``)."""
    return {path: w.adapters[name] for path, w in _saved_wrappers(model) if name in w.adapters}


def saved_module_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s full copies as tensors keyed ``<module path>.<param>`` (CPU, floats in fp32):
    ``AdapterState.saved_modules``, PEFT's key layout without the ``base_model.model.`` prefix."""
    out = {}
    for path, module in saved_modules(model, name).items():
        for key, t in module.state_dict().items():
            t = t.detach().to("cpu")
            out[f"{path}.{key}"] = (t.float() if t.is_floating_point() else t).clone()
    return out


def _check_saved_tensors(model: nn.Module, paths: Sequence[str], tensors: dict[str, torch.Tensor]) -> None:
    """Refuse saved full-copy tensors that do not fit the modules at ``paths`` exactly."""
    expected = {}
    for path in paths:
        module = model.get_submodule(path)
        original = module.base_layer if isinstance(module, SavedModule) else module
        expected.update({f"{path}.{k}": tuple(v.shape) for k, v in original.state_dict().items()})
    problems = [f"missing {k}" for k in sorted(set(expected) - set(tensors))]
    problems += [f"unexpected {k}" for k in sorted(set(tensors) - set(expected))]
    problems += [f"{k}: shape {tuple(tensors[k].shape)} in the adapter, {shape} in the model"
                 for k, shape in expected.items() if k in tensors and tuple(tensors[k].shape) != shape]
    if problems:
        raise ValueError("modules_to_save tensors do not fit this model: " + "; ".join(problems[:4])
                         + (f"; ... ({len(problems)} problems)" if len(problems) > 4 else ""))


def _check_base_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse base weights carried by an adapter file that differ from the model's (PEFT saves the
    embedding with an adapted embedding layer; it differs when the vocabulary was resized or trained)."""
    for key, t in tensors.items():
        path, _, pname = key.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the adapter carries base weight {key!r} of a module the model does not have") from None
        module = module.base_layer if isinstance(module, (AdaptedLayer, SavedModule)) else module
        own = getattr(module, pname, None)
        if not isinstance(own, torch.Tensor) or tuple(own.shape) != tuple(t.shape) or not torch.allclose(
                own.detach().float().cpu(), t.float(), rtol=1e-5, atol=1e-6):
            shape = tuple(own.shape) if isinstance(own, torch.Tensor) else None
            raise ValueError(f"the adapter carries its own base weight {key!r} {tuple(t.shape)} (PEFT's "
                             f"save_embedding_layers) and it differs from the model's ({shape}): resized or trained "
                             "embeddings; load those weights into the base model first")


def _add_saved_copies(model: nn.Module, name: str, paths: Sequence[str],
                      tensors: dict[str, torch.Tensor] | None) -> None:
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, SavedModule):
            module = SavedModule(module).train(module.training)
            _set_submodule(model, path, module)
        module.adapters[name] = copy.deepcopy(module.base_layer)  # starts as the original, trains on its own
        if tensors is not None:
            prefix = path + "."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            ref = module.adapters[name].state_dict()
            module.adapters[name].load_state_dict({k: v.to(ref[k].device, ref[k].dtype) for k, v in own.items()})
        module.active = active_adapters(model)


def _remove_saved_copy(model: nn.Module, name: str) -> None:
    for path, wrapper in list(_saved_wrappers(model)):
        if name in wrapper.adapters:
            del wrapper.adapters[name]
        if not len(wrapper.adapters):
            _set_submodule(model, path, wrapper.base_layer)


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
            activate: bool = True, trainable: bool = True,
            saved_tensors: dict[str, torch.Tensor] | None = None,
            base_tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Put prepared forms into the model under adapter ``name``, and a full copy of each module of
    ``spec.modules_to_save`` (loaded from ``saved_tensors``, keys ``<module path>.<param>``, when given:
    ``AdapterState.saved_modules``; else copied from the original module).

    ``base_tensors`` (``AdapterState.base_layers``: base weights a PEFT file carries, e.g. of an adapted
    embedding) must equal the model's own: lorakit adds adapters and never replaces base weights."""
    if name in specs(model):
        raise ValueError(f"adapter {name!r} already exists on this model; delete it or choose another name")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"adapter name {name!r} must use letters, digits, '_' or '-' only")
    # everything about the full copies is checked before the model changes
    saved_paths = find_saved_modules(model, spec.modules_to_save, list(forms)) if spec.modules_to_save else []
    if saved_tensors and not saved_paths:
        raise ValueError(f"the adapter holds modules_to_save tensors ({sorted(saved_tensors)[:2]}...) but its spec "
                         "lists no modules_to_save")
    if saved_tensors is not None and saved_paths:
        _check_saved_tensors(model, saved_paths, saved_tensors)
    if base_tensors:
        _check_base_tensors(model, base_tensors)
    for path, form in forms.items():
        module = model.get_submodule(path)
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module).train(module.training)
            _set_submodule(model, path, module)
        _to_base_device(form, module.base_layer)
        module.adapters[name] = form.train(module.training)  # a new adapter follows the model's mode
        module.active = active_adapters(model)
    _add_saved_copies(model, name, saved_paths, saved_tensors or None)
    specs(model)[name] = spec
    if activate:
        set_active(model, [name])
    if trainable:
        mark_trainable(model, name)
    return model


def _to_base_device(form: Form, base: nn.Module) -> None:
    """Put a form where its base layer computes (a CUDA base gets CUDA adapters; no form stays behind on
    the CPU because it built a tensor without a device). Its dtype is kept (fp32 master weights)."""
    ref = next(iter(base.parameters()), None)
    if ref is not None and any(t.device != ref.device for t in [*form.parameters(), *form.buffers()]):
        form.to(ref.device)


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
        if not len(layer.adapters) and not len(layer.sources):  # a router or serving bank may remain
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
        for module in saved_modules(model, n).values():  # full copies train whole
            for p in module.parameters():
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
    for _, wrapper in _saved_wrappers(model):
        wrapper.active = names


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
        if not len(layer.adapters) and not len(layer.sources):  # a router or serving bank may remain
            _set_submodule(model, path, layer.base_layer)
    _remove_saved_copy(model, name)
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
    """Return a plain model: active adapters merged in (if asked), every wrapper removed. A module of
    ``modules_to_save`` becomes the active adapter's copy when merging (as PEFT), else the original."""
    if merge_active:
        merge(model)
    else:
        unmerge(model)
    for path, layer in list(adapted_layers(model)):
        _set_submodule(model, path, layer.base_layer)
    for path, wrapper in list(_saved_wrappers(model)):
        _set_submodule(model, path, wrapper.current() if merge_active else wrapper.base_layer)
    model.__dict__.pop(_SPECS, None)
    model.__dict__.pop("_lorakit_active", None)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone (merged adapters are unmerged for the duration)."""
    layers = [layer for _, layer in adapted_layers(model)]
    wrappers = [w for _, w in _saved_wrappers(model)]  # full copies give way to the originals
    merged = {id(layer): list(layer.merged) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    for w in wrappers:
        w.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(merged[id(layer)])
        for w in wrappers:
            w.disabled = False


@contextlib.contextmanager
def mixed_batch(model: nn.Module, row_adapters: Sequence[str | None]) -> Iterator[nn.Module]:
    """Give each batch row its own adapter (``None`` = base model) for the duration.

    Writes per-row ids over the named adapters into the per-forward context (``core.context``): every
    adapted layer groups the rows once per forward and runs each group through that adapter's
    ``apply`` (the serving engine has the fast kernels).
    """
    names: list[str] = []
    ids = []
    for name in row_adapters:
        if name is None:
            ids.append(-1)
            continue
        _require(model, name)
        if name not in names:
            names.append(name)
        ids.append(names.index(name))
    with use_context(AdapterContext(names=tuple(names), ids=torch.tensor(ids, dtype=torch.long))):
        yield model
