"""Public functions over a model with adapters: attach, save, load (extraction lives in ``core.extract``)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.core import registry
from lorakit.core.extract import extract_state, fingerprint
from lorakit.core.inject import (
    _base_modules,
    adapter_modules,
    build_forms,
    delete,
    find_targets,
    form_class,
    install,
    mark_trainable,
    specs,
)
from lorakit.core.layer import AdaptedLayer, set_initial_tensors
from lorakit.core.spec import AdapterSpec, build_args
from lorakit.core.state import AdapterState, BaseMismatchError, check_base, check_state
from lorakit.forms.base import layer_dims, layer_kind, skip_init
from lorakit.inits.base import initialize
from lorakit.io.export import original_base_state
from lorakit.io.peft import load_state, save_state


def attach(model: nn.Module, spec: AdapterSpec | None = None, name: str = "default", *,
           seed: int | None = None, activate: bool = True, trainable: bool = True,
           batches: Iterable[Any] | None = None, loss_fn: Any = None) -> nn.Module:
    """Add adapter ``name`` described by ``spec`` to ``model`` in place and return the model.

    The base model is frozen; only the new adapter's trainable tensors require grad (when
    ``trainable``). ``seed`` makes the adapter's random init reproducible. Data-driven inits read
    ``batches`` (calibration data) and ``loss_fn(model, batch)`` (default: causal-LM loss).
    """
    spec = spec or AdapterSpec()
    if name in specs(model):
        raise ValueError(f"adapter {name!r} already exists on this model; delete it or choose another name")
    init = registry.get("init", spec.init)(**spec.init_args)
    init.check_form(form_class(spec))
    paths = find_targets(model, spec)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        install(model, name, spec, build_forms(model, spec, paths), activate=activate, trainable=False)
        if init.name != "default":
            try:
                initialize(model, name, init, batches, loss_fn=loss_fn)
            except BaseException:
                delete(model, name)  # a failed init leaves the model as it was
                raise
    if trainable:
        mark_trainable(model, name)
    return model


def save(model: nn.Module, out_dir: str | Path, name: str = "default", *,
         base_model_name: str | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Save adapter ``name`` of ``model`` to ``out_dir`` in PEFT layout (+ lorakit.json).

    If the adapter's init rewrote the base weights (PiSSA, LoRA-GA, ...), the PEFT files hold the
    equivalent adapter for the ORIGINAL base (``lorakit.io.export.original_base_state``, exact
    up to float error), and lorakit's own files keep the adapter and its initial tensors. ``meta``
    entries are added to ``lorakit.json``'s meta (e.g. what rebuilds a classification head).
    """
    state = extract_state(model, name)
    if meta:
        state = dataclasses.replace(state, meta={**state.meta, **meta})
    peft_state = original_base_state(adapter_modules(model, name), state)[0] if state.initial else None
    return save_state(state, out_dir, base_model_name=base_model_name, peft_state=peft_state)


def apply_state(model: nn.Module, state: AdapterState, name: str = "default", *,
                activate: bool = True, trainable: bool = False, where: str = "adapter") -> nn.Module:
    """Install ``state`` as adapter ``name``; validates everything before touching the model."""
    check_base(state, fingerprint(model), where)
    cls = form_class(state.spec)
    by_module = state.by_module()
    problems = []
    present = {p for p, m in _base_modules(model) if p}
    missing = [p for p in by_module if p not in present]
    if missing:
        problems.append(f"{len(missing)} module(s) not in the model, e.g. {missing[:3]}")
    paths = [p for p in by_module if p in present]
    not_linear = [p for p in paths if not (isinstance(model.get_submodule(p), AdaptedLayer)
                                           or layer_kind(model.get_submodule(p)) is not None)]
    if not_linear:
        problems.append(f"module(s) {not_linear[:3]} are not Linear/Conv1D/Conv2d/Embedding layers")
    if problems:
        raise BaseMismatchError(f"{where}: adapter does not fit this model: " + "; ".join(problems))
    check_state(state, where)  # dtypes and rank bounds that need no model (states built in memory too)
    problems += _oversized(cls, state, model, paths)
    if problems:  # before build_forms: a config asking for r = 10**9 must not allocate r-sized tensors
        raise BaseMismatchError(f"{where}: adapter does not fit this model: " + "; ".join(problems[:5]))
    try:
        with skip_init():  # every saved tensor is loaded below: no form runs its init (SVD, LU, ...)
            forms = build_forms(model, state.spec, paths)
    except (ValueError, TypeError, OverflowError, RuntimeError) as e:  # RuntimeError: e.g. a seed torch rejects
        raise BaseMismatchError(f"{where}: {e}") from e
    initial_by_module = dataclasses.replace(state, tensors=state.initial).by_module() if state.initial else {}
    for path, form in forms.items():
        expected = form.save_tensors()
        got = by_module[path]
        if set(expected) != set(got):
            problems.append(f"{path}: tensors {sorted(got)} but form {cls.name!r} expects {sorted(expected)}")
            continue
        for tname, ref in expected.items():
            if tuple(got[tname].shape) != tuple(ref.shape):
                problems.append(f"{path}.{tname}: shape {tuple(got[tname].shape)} in the file, "
                                f"{tuple(ref.shape)} expected by the model")
            elif (got[tname].is_floating_point() != ref.is_floating_point() or got[tname].is_complex()
                  or (got[tname].dtype == torch.bool) != (ref.dtype == torch.bool)):
                # a cast would silently turn ints/bools into weights (or truncate floats into indices)
                problems.append(f"{path}.{tname}: dtype {got[tname].dtype} in the file, {ref.dtype} expected")
        if not problems:
            initial = initial_by_module.get(path)
            if initial is not None:  # a base-rewriting init: the form remembers where it started
                set_initial_tensors(form, {k: v.to(expected[k].device, expected[k].dtype)
                                           for k, v in initial.items()})
            form.load_tensors({k: v.to(expected[k].device, expected[k].dtype) for k, v in got.items()})
    shared, given = (next(iter(forms.values())).shared if forms else None), state.shared_tensors()
    if given:  # model-level tensors (Cap.SHARED_TENSORS); without them they stay as built from the args
        expected = shared.tensors() if shared is not None else {}
        problems += [f"shared tensor {n}: shape {tuple(t.shape)} in the file, "
                     f"{tuple(expected[n].shape) if n in expected else 'none'} expected by the model"
                     for n, t in given.items() if n not in expected or t.shape != expected[n].shape]
        if not problems:
            shared.load({n: t.to(expected[n].device, expected[n].dtype) for n, t in given.items()})
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise BaseMismatchError(f"{where}: adapter does not fit this model: {shown}")
    if not trainable:  # an inference load: the new tensors must not build autograd graphs
        for form in forms.values():
            form.requires_grad_(False)
    spec = dataclasses.replace(state.spec)
    try:
        install(model, name, spec, forms, activate=activate, trainable=trainable,
                saved_tensors=state.saved_modules, base_tensors=state.base_layers)
    except ValueError as e:  # modules_to_save or carried base weights that do not fit the model
        raise BaseMismatchError(f"{where}: {e}") from e
    for path, form in forms.items():  # redo the init's base rewrite W ← W − ΔW0 on the original base
        model.get_submodule(path).rewrite_base(form)
    return model


# A config may ask for at most this many times the values its file holds per module (or PREBUILD_FLOOR
# values) before build_forms allocates anything; beyond, config and tensors cannot match.
PREBUILD_FACTOR = 8
PREBUILD_FLOOR = 1 << 20


def _oversized(cls: type, state: AdapterState, model: nn.Module, paths: list[str]) -> list[str]:
    """Modules whose config asks for far more trainable values than the file holds for them (every form
    saves its trainable tensors, so a larger count means config and tensors disagree), computed from the
    closed-form ``num_trainable`` before anything is allocated."""
    shared = sum(t.numel() for t in state.shared_tensors().values())
    by_module = state.by_module()
    out = []
    for path in paths:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        try:
            args = build_args(cls.Args, state.spec.args_for(path), owner=f"form {cls.name!r}")
            need = cls.num_trainable(*layer_dims(base), args)
        except (ValueError, TypeError, NotImplementedError, OverflowError) as e:
            out.append(f"{path}: {e}")
            continue
        held = sum(t.numel() for t in by_module[path].values()) + shared
        # only a config far beyond the file is refused here (a small mismatch gets the exact per-tensor
        # shape message after build_forms); the margin keeps that build cheap relative to the file
        if need > max(PREBUILD_FACTOR * held, PREBUILD_FLOOR):
            out.append(f"{path}: the config ({state.spec.args_for(path)}) makes {need} trainable values on this "
                       f"layer but the file holds {held}")
    return out


def load(model: nn.Module, adapter_dir: str | Path, name: str = "default", *,
         activate: bool = True, trainable: bool = False) -> nn.Module:
    """Load a lorakit or PEFT adapter folder onto ``model`` as adapter ``name``."""
    return apply_state(model, load_state(adapter_dir), name, activate=activate, trainable=trainable,
                       where=str(adapter_dir))
